"""The headless batch example (Resources/Examples/batch_segment.py) with slicer-core MRML."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

EXAMPLE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "DeepGMMSegment", "Resources",
                                       "Examples", "batch_segment.py"))


def _loadExample():
    spec = importlib.util.spec_from_file_location("batch_segment_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _writeVolume(scene, helpers, array, path, className="vtkMRMLScalarVolumeNode"):
    node = helpers.addVolume(scene, array, helpers.ijkToRasMatrix((1.0, 1.0, 2.0), (5.0, 6.0, 7.0),
                                                                  helpers.obliqueDirection()), "tmp", className)
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    scene.RemoveNode(node)


def test_segment_files_writes_segmentation_probabilities_and_summary(mrmlScene, helpers, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    channel1, channel2, truth = helpers.phantom()
    mask = np.zeros(truth.shape, np.uint8)
    mask[:, 2:18, :] = 1
    _writeVolume(mrmlScene, helpers, channel1, tmp_path / "t1.nrrd")
    _writeVolume(mrmlScene, helpers, channel2, tmp_path / "t2.nii.gz")
    _writeVolume(mrmlScene, helpers, mask, tmp_path / "mask.nrrd", "vtkMRMLLabelMapVolumeNode")
    messages = []

    summary = _loadExample().segmentFiles(
        mrmlScene, [str(tmp_path / "t1.nrrd"), str(tmp_path / "t2.nii.gz")], str(tmp_path / "out"),
        numberOfClasses=3, method="em-gmm", maskPath=str(tmp_path / "mask.nrrd"), progress=messages.append)

    with open(tmp_path / "out" / "summary.json", encoding="utf-8") as file:
        assert json.load(file) == json.loads(json.dumps(summary))
    assert [c["name"] for c in summary["classes"]] == ["Class 1", "Class 2", "Class 3"]
    inside = mask.astype(bool)
    for classIndex, stats in enumerate(summary["classes"], start=1):
        assert abs(stats["voxelCount"] - int((truth[inside] == classIndex).sum())) <= 0.02 * inside.sum()
        assert stats["volumeMl"] == pytest.approx(stats["voxelCount"] * 2.0 / 1000.0)
    assert "fitting" not in messages and any(m.startswith("iteration") for m in messages)

    segmentation = slicerio.read_segmentation(summary["files"]["segmentation"])
    assert sorted(s["name"] for s in segmentation["segments"]) == ["Class 1", "Class 2", "Class 3"]
    assert len(summary["files"]["probabilities"]) == 3
    probabilityNode = mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "p1")
    reader = mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    reader.SetFileName(summary["files"]["probabilities"][0])
    assert reader.ReadData(probabilityNode)
    import slicer.util

    probability = slicer.util.arrayFromVolume(probabilityNode)
    assert probability.dtype == np.float32 and (probability[~inside] == 0).all()
    assert 0.0 <= probability.min() and probability.max() <= 1.0


def test_command_line_main_and_exit_codes(mrmlScene, helpers, tmp_path, capsys):
    channel1, _, _ = helpers.phantom((4, 12, 12))
    _writeVolume(mrmlScene, helpers, channel1, tmp_path / "t1.nrrd")
    # In-process, as inside Slicer: main() uses slicer.mrmlScene (set by the fixture).
    exitCode = _loadExample().main(["--input", str(tmp_path / "t1.nrrd"), "--output", str(tmp_path / "out"),
                                    "--classes", "3", "--method", "em-gmm", "--max-iter", "30"])
    assert exitCode == 0
    assert "Class 3:" in capsys.readouterr().out and (tmp_path / "out" / "segmentation.seg.nrrd").exists()
    assert mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1
    # As a script (its __main__ block), a bad input ends with exit code 1 and a clear message.
    missing = subprocess.run([sys.executable, EXAMPLE, "--input", str(tmp_path / "nothing.nrrd"), "--output",
                              str(tmp_path / "out2")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "Input file not found" in missing.stderr


def test_without_torch_and_without_a_window_it_fails_with_a_clear_message(mrmlScene, helpers, tmp_path, capsys,
                                                                             monkeypatch):
    """Slicer --no-main-window --python-script batch_segment.py ... in a Slicer without PyTorch: no
    question can be answered there, so the run must end with the fix instead of waiting for a click."""
    import types

    import slicer
    import slicer.util

    from DeepGMMSegmentLib.slicer_adapter import dependencies

    channel1, _, _ = helpers.phantom((4, 12, 12))
    _writeVolume(mrmlScene, helpers, channel1, tmp_path / "t1.nrrd")
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(slicerHome="/opt/Slicer", testingEnabled=lambda: False),
                        raising=False)
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: None, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: pytest.fail("asked a question"),
                        raising=False)
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: None)
    monkeypatch.setattr(dependencies.TorchDependency, "_pyTorchUtils",
                        lambda self: pytest.fail("PyTorchUtils must not be used"))
    exitCode = _loadExample().main(["--input", str(tmp_path / "t1.nrrd"), "--output", str(tmp_path / "out"),
                                    "--method", "em-gmm"])
    assert exitCode == 1
    error = capsys.readouterr().err
    assert "PyTorch is not installed" in error and "no main window" in error and "PyTorch Util" in error
    assert not (tmp_path / "out").exists()


def test_bias_field_and_reference_segments_from_the_command_line(mrmlScene, helpers, tmp_path, capsys):
    from DeepGMMSegmentLib.slicer_adapter import geometry

    channel1, _, truth = helpers.phantom((4, 12, 12))
    _writeVolume(mrmlScene, helpers, channel1, tmp_path / "t1.nrrd")
    # Strokes painted on the same grid, saved as Slicer saves a segmentation.
    grid = helpers.addVolume(mrmlScene, channel1, helpers.ijkToRasMatrix((1.0, 1.0, 2.0), (5.0, 6.0, 7.0),
                                                                         helpers.obliqueDirection()), "grid")
    strokes = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "strokes")
    for name, tissue, color in (("Bright", 3, (1.0, 0.0, 0.0)), ("Dark", 1, (0.0, 0.0, 1.0))):
        marked = np.zeros(truth.shape, bool)
        marked.flat[np.flatnonzero(truth == tissue)[::5]] = True
        strokes.AddSegmentFromBinaryLabelmapRepresentation(geometry.volumeGeometry(grid).orientedImage(marked), name,
                                                          color)
    storage = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "strokes.seg.nrrd"))
    assert storage.WriteData(strokes)
    mrmlScene.RemoveNode(strokes)
    mrmlScene.RemoveNode(grid)

    exitCode = _loadExample().main(["--input", str(tmp_path / "t1.nrrd"), "--output", str(tmp_path / "out"),
                                    "--classes", "3", "--method", "em-gmm", "--bias-field",
                                    "--reference-segments", str(tmp_path / "strokes.seg.nrrd")])
    assert exitCode == 0, capsys.readouterr().err
    with open(tmp_path / "out" / "summary.json", encoding="utf-8") as file:
        summary = json.load(file)
    assert [c["name"] for c in summary["classes"]] == ["Bright", "Dark", "Class 3"]
    assert summary["biasField"] == "auto" and summary["referenceSegments"] == str(tmp_path / "strokes.seg.nrrd")
    assert [os.path.basename(p) for p in summary["files"]["bias_field"] + summary["files"]["corrected"]] == [
        "bias_field_channel1.nrrd", "corrected_channel1.nrrd"]
    assert all(os.path.exists(p) for p in summary["files"]["bias_field"] + summary["files"]["corrected"])

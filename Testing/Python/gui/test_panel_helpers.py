"""The panel's Qt-free helpers (DeepGMMSegmentLib/slicer_adapter/panel.py)."""

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from DeepGMMSegmentLib import options
from DeepGMMSegmentLib.slicer_adapter import panel


class Node:
    """A minimal node with an ID (the helpers only call GetID)."""

    def __init__(self, nodeId):
        self.nodeId = nodeId

    def GetID(self):
        return self.nodeId


def test_widget_side_loads_without_torch():
    # The widget imports the panel, the logic and the device query before PyTorch is installed.
    code = ("import sys; import DeepGMMSegmentLib.slicer_adapter.panel, DeepGMMSegmentLib.logic, "
            "DeepGMMSegmentLib.slicer_adapter.runner; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'SimpleITK')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_method_labels_and_enum_names_follow_the_one_method_list():
    assert tuple(panel.METHOD_LABELS) == options.METHODS  # combo box order = options.METHODS
    assert set(panel.METHOD_SHORT_NAMES) == set(panel.METHOD_ENUM_NAMES) == set(options.METHODS)
    assert panel.METHOD_LABELS[options.DEFAULT_METHOD].endswith("(default)")
    assert set(panel.TRAINED_MODEL_METHODS) == set(options.DEEP_METHODS)


def test_reload_order_puts_the_vocabulary_first_and_deeper_modules_before_their_users():
    loaded = ["DeepGMMSegmentLib", "DeepGMMSegmentLib.logic", "DeepGMMSegmentLib.options", "numpy",
              "DeepGMMSegmentLib.slicer_adapter", "DeepGMMSegmentLib.slicer_adapter.panel",
              "DeepGMMSegmentLib.result", "DeepGMMSegmentLibExtra"]
    assert panel.reloadOrder(loaded, "DeepGMMSegmentLib") == [
        "DeepGMMSegmentLib.options", "DeepGMMSegmentLib.result", "DeepGMMSegmentLib.slicer_adapter.panel",
        "DeepGMMSegmentLib.logic", "DeepGMMSegmentLib.slicer_adapter", "DeepGMMSegmentLib"]


@pytest.mark.parametrize("selected, expected", [
    ([False, False, False, False], [True, False, False, False]),
    ([True, False, False, False], [True, True, False, False]),
    ([True, True, True, False], [True, True, True, True]),
    ([True, False, True, False], [True, True, True, True]),  # a chosen volume is never hidden
    ([False, False, False, True], [True, False, False, True]),
])
def test_channel_selector_visibility(selected, expected):
    assert panel.channelSelectorVisibility(selected) == expected


def test_input_channels_problems():
    t1, t2, t2copy = Node("volume1"), Node("volume2"), Node("volume2")
    assert "first channel" in panel.inputChannelsProblem([None, None, None, None])
    assert panel.inputChannelsProblem([t1, None, None, None]) is None
    assert panel.inputChannelsProblem([t1, t2, None, None]) is None
    gap = panel.inputChannelsProblem([t1, None, t2, None])
    assert "Channel 2 is empty but channel 3 is set" in gap
    repeat = panel.inputChannelsProblem([t1, t2, t2copy, None])
    assert "Channel 3 repeats channel 2" in repeat
    assert panel.chosenChannels([t1, t2, None, None]) == [t1, t2]


def test_inputs_problem_requires_a_segment_when_a_mask_is_chosen():
    t1, masks = Node("v1"), Node("s1")
    assert panel.inputsProblem([t1, None], None, "") is None
    assert "Choose a segment" in panel.inputsProblem([t1, None], masks, "")
    assert panel.inputsProblem([t1, None], masks, "Segment_1") is None
    assert "first channel" in panel.inputsProblem([None, None], masks, "Segment_1")


def test_the_panel_prior_means_text_is_the_one_syntax():
    # The widget parses its "Prior class means" field with options.parse_prior_means (as the CLI does).
    assert options.parse_prior_means("", 3, 2) is None
    assert options.parse_prior_means("   ", 3, 2) is None
    assert options.parse_prior_means("10,20;30,40", 2, 2).tolist() == [[10.0, 20.0], [30.0, 40.0]]
    assert options.parse_prior_means(" 10, 20 ; 30, 40 ;", 2, 2).tolist() == [[10.0, 20.0], [30.0, 40.0]]
    assert options.parse_prior_means("1e2;-5.5;0", 3, 1).tolist() == [[100.0], [-5.5], [0.0]]


@pytest.mark.parametrize("text, classes, channels, message", [
    ("10,20;30,40", 3, 2, "2 rows but there are 3 classes"),
    ("10,20;30", 2, 2, "has 1 value(s) but there are 2 channel(s)"),
    ("10,abc;30,40", 2, 2, "'10,abc' is not a number"),
    ("10,inf;30,40", 2, 2, "use finite numbers"),
    ("10;nan", 2, 1, "use finite numbers"),
])
def test_prior_means_errors_name_problem_and_fix(text, classes, channels, message):
    with pytest.raises(ValueError) as error:
        options.parse_prior_means(text, classes, channels)
    assert message in str(error.value)


def test_engine_options_leave_defaults_to_the_engine():
    assert panel.engineOptions() == {"covariance_type": "full"}
    options = panel.engineOptions(maxIterations=40, tolerance=1e-6, covarianceType="diag", priorMeans=[[1.0], [2.0]])
    assert options == {"covariance_type": "diag", "max_iter": 40, "tol": 1e-6, "prior_means": [[1.0], [2.0]]}
    # smoothness 0 is a choice (the published loss), not "default": it is passed on
    assert panel.engineOptions(smoothness=0.0) == {"covariance_type": "full", "smoothness": 0.0}
    # label_mrf too: 0 is the posterior without neighbours, "off" the network's output
    assert panel.engineOptions(labelMrf=0.0) == {"covariance_type": "full", "label_mrf": 0.0}
    assert panel.engineOptions(labelMrf="off") == {"covariance_type": "full", "label_mrf": "off"}
    assert panel.engineOptions(None, None, "full", None, None, 1.5)["label_mrf"] == 1.5  # the widget's order


def test_smoothness_goes_to_deepsvg_only():
    assert panel.smoothnessFor("deepsvg", 0.5) == 0.5
    assert panel.smoothnessFor("deepsvg", 0.0) == 0.0
    assert panel.smoothnessFor("deepsvg", panel.AUTOMATIC_SMOOTHNESS) is None  # the engine's choice from the noise
    assert [panel.smoothnessFor(m, 0.5) for m in ("deepg", "em-gmm", "em-svgmm")] == [None] * 3
    assert "smoothness" in options.resolve_options("deepsvg")  # the name the engine takes


def test_label_smoothing_goes_to_deepsvg_only():
    assert panel.labelMrfFor("deepsvg", 0.5) == 0.5
    assert panel.labelMrfFor("deepsvg", 0.0) == 0.0  # the posterior without neighbours, not "off"
    assert panel.labelMrfFor("deepsvg", panel.LABEL_MRF_OFF) == "off"  # the network's output
    assert [panel.labelMrfFor(m, 0.5) for m in ("deepg", "em-gmm", "em-svgmm")] == [None] * 3
    assert [panel.labelMrfFor(m, panel.LABEL_MRF_OFF) for m in ("deepg", "em-gmm", "em-svgmm")] == [None] * 3
    assert panel.LABEL_MRF_OFF < 0 <= options.LABEL_MRF  # "off" is below every strength, the default above it
    # The engine takes what the panel sends, under that name (options.PARAMETER_CONSTRAINTS).
    for value in (panel.labelMrfFor("deepsvg", panel.LABEL_MRF_OFF), panel.labelMrfFor("deepsvg", 0.0),
                  panel.labelMrfFor("deepsvg", options.LABEL_MRF)):
        given = panel.engineOptions(labelMrf=value)
        assert options.resolve_options("deepsvg", **given)["label_mrf"] == value


def test_engine_options_and_enum_values_are_the_engines_names():
    given = panel.engineOptions(5, 1e-3, "diag", [[1.0], [2.0]])
    assert set(given) <= set(options.resolve_options("em-gmm"))
    assert set(panel.METHOD_LABELS) == set(options.METHODS) == set(panel.METHOD_SHORT_NAMES)
    assert set(panel.COVARIANCE_LABELS) == set(options.COVARIANCE_TYPES)


@pytest.mark.parametrize("seconds, text", [
    (0, "0 s"), (42.4, "42 s"), (59.6, "1 min 00 s"), (185, "3 min 05 s"), (3725, "1 h 02 min"),
    (None, "unknown"), (float("nan"), "unknown"), (-1, "unknown"),
])
def test_format_duration(seconds, text):
    assert panel.formatDuration(seconds) == text


def test_format_progress_with_the_runner_progress_info():
    from DeepGMMSegmentLib.slicer_adapter import runner
    percent, text = panel.formatProgress(runner.ProgressInfo("starting"))
    assert percent is None and text.startswith("Starting")
    percent, text = panel.formatProgress(runner.ProgressInfo("fitting", 30, 120, 1.23456, 12.0, 36.4))
    assert percent == 25
    assert text == "Fitting \u00b7 iteration 30/120 \u00b7 NLL 1.2346 \u00b7 about 36 s left"
    percent, text = panel.formatProgress(runner.ProgressInfo("fitting", 3, 150, None, 61.0, None))
    assert percent == 2 and text.endswith("1 min 01 s elapsed")
    percent, _ = panel.formatProgress({"stage": "fitting", "iteration": 500, "maxIterations": 150})
    assert percent == 100


def test_result_rows_and_session_results_with_the_logic_dataclasses():
    from DeepGMMSegmentLib import logic

    def outputs(finalNll, volumes):
        statistics = [logic.ClassStatistics(index, f"Class {index}", 10 * index, volume, [100.0 * index, 7.25])
                      for index, volume in enumerate(volumes, start=1)]
        return logic.DeepGMMSegmentOutputs(segmentationNode=None, probabilityVolumes=[], probabilityFolderItemId=0,
                                           classStatistics=statistics, finalNll=finalNll, method="em-gmm",
                                           device="cpu", seconds=1.0)

    rows = panel.resultRows("T1 EM", "EM-GMM", outputs(0.5, [1.234, 2.0]).classStatistics, 0.5)
    assert rows == [("T1 EM", "EM-GMM", "Class 1", "1.23", "100 / 7.25", "0.5000"),
                    ("T1 EM", "EM-GMM", "Class 2", "2.00", "200 / 7.25", "0.5000")]
    assert all(len(row) == len(panel.RESULT_COLUMNS) for row in rows)

    names = {"seg1": "EM", "seg2": "deep"}
    session = panel.SessionResults()
    session.add("seg1", "EM-GMM", outputs(0.9, [1.0, 2.0, 3.0]))
    session.add("seg2", "deepSVG", outputs(0.7, [1.5, 2.5, 2.0]))
    assert [row[0] for row in session.rows(names.get)] == ["EM"] * 3 + ["deep"] * 3  # comparison keeps both
    session.add("seg1", "EM-GMM", outputs(0.8, [3.0, 3.0]))  # re-run into seg1 replaces its rows
    rows = session.rows(names.get)
    assert [(row[0], row[5]) for row in rows] == [("deep", "0.7000")] * 3 + [("EM", "0.8000")] * 2
    del names["seg2"]  # the node was deleted from the scene
    assert [row[0] for row in session.rows(names.get)] == ["EM", "EM"] and len(session) == 1
    session.clear()
    assert session.rows(names.get) == []


def test_nan_mean_and_nll_are_shown_as_such():
    rows = panel.resultRows("o", "m", [{"name": "Class 1", "volumeMl": 0.0, "meanIntensities": [math.nan]}], None)
    assert rows == [("o", "m", "Class 1", "0.00", "nan", "")]


def test_describe_compute_devices_with_real_torch_on_cpu():
    import torch

    from DeepGMMSegmentLib.slicer_adapter import worker

    text = panel.describeComputeDevices(worker.deviceFacts())  # what the device query's worker reports
    if torch.cuda.is_available():
        assert text.startswith("GPU: cuda:0")
    else:
        assert text == "No CUDA GPU found: Automatic runs on the CPU."


def test_describe_compute_devices_lists_each_gpu():
    # No GPU on the CI machine: the worker's facts for two GPUs exercise the GPU branch.
    facts = {"torchVersion": "2.13.0", "cudaAvailable": True,
             "cuda": [{"name": "RTX A", "totalMemoryBytes": 8 * 1024**3},
                      {"name": "RTX B", "totalMemoryBytes": 24 * 1024**3}]}
    assert panel.describeComputeDevices(facts) == "GPU: cuda:0 RTX A (8 GB), cuda:1 RTX B (24 GB)"
    assert panel.describeComputeDevices({**facts, "cudaAvailable": False}).startswith("No CUDA GPU found")


def test_user_facing_texts():
    assert panel.completionText("deepSVG", "cpu", 65, 1.5) == "Done: deepSVG on cpu in 1 min 05 s, final NLL 1.5000."
    assert panel.completionText("EM-GMM", "cuda", 2, None) == "Done: EM-GMM on cuda in 2 s."
    assert "inside the ROI box" in panel.replaceQuestion("Seg", withRoi=True)
    assert "Create new segmentation" in panel.replaceQuestion("Seg", withRoi=False)


# ---------------------------------------------------------------------------------------------
# Trained model files (real files written by DeepGMMSegmentLib.train, see Testing/Python/conftest.py)


@pytest.fixture(scope="module")
def modelIo():
    from DeepGMMSegmentLib.trained import model_file

    return model_file


def test_trained_model_summary_shows_the_metadata(trainedModelFile, modelIo):
    path = trainedModelFile(("T1", "PD"))
    text = panel.trainedModelSummary(path, modelIo, {})
    lines = text.splitlines()
    assert lines[0] == "classes: 3   method: deepsvg   covariance: full"
    assert lines[1] == "channels (2): T1, PD"  # names in channel order
    assert "image dimension: 3D   normalisation: zscore-in-mask" in text
    assert "trained on 3 cases (+1 held out), best epoch" in text and "held-out NLL" in text
    assert "package version: " in text and "created: " in text
    assert f"file: {path.resolve()} (" in text and " parameters)" in text
    assert lines[-1] == "Segment uses the model's method (deepSVG) and its 3 classes."
    assert text.startswith(modelIo.format_description(modelIo.describe_model(path)))  # model_io's own text


def test_trained_model_settings_come_from_the_metadata(trainedModelFile, modelIo):
    info, error = panel.describeTrainedModel(trainedModelFile(("T1",), method="deepg"), modelIo)
    assert error is None and panel.trainedModelSettings(info) == ("deepg", 3)
    assert panel.trainedModelSettings(dict(info, method="em-gmm")) is None
    assert panel.trainedModelSettings(dict(info, n_classes=13)) is None  # beyond the panel's 2..12
    assert panel.trainedModelSettings(None) is None


def test_unusable_model_paths_and_files_get_a_clear_text(tmp_path, modelIo):
    import torch

    assert panel.trainedModelSummary("", modelIo) == (
        "Choose a trained model file (.pt, written by deepgmm-train) or uncheck 'Use trained model'.")
    missing = tmp_path / "gone.pt"
    assert panel.trainedModelSummary(missing, modelIo) == (
        f"The trained model file {str(missing)!r} does not exist: choose another file or uncheck 'Use trained model'.")
    assert "is not a file" in panel.trainedModelSummary(tmp_path, modelIo)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    assert panel.trainedModelSummary(corrupt, modelIo).startswith(
        "This file cannot be used as a trained model: ") and "not a PyTorch archive" in \
        panel.trainedModelSummary(corrupt, modelIo)
    otherTorchFile = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, otherTorchFile)
    assert "not a DeepGMMSegment model" in panel.trainedModelSummary(otherTorchFile, modelIo)
    # Each problem also blocks Segment, whatever the inputs.
    for path in ("", missing, corrupt, otherTorchFile):
        assert panel.trainedModelProblem(path, 2, modelIo) == panel.trainedModelSummary(path, modelIo)


class _CreatesAFile:
    """A pickled object that would create ``marker`` when unpickled (what a malicious model file does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_model_file_carrying_code_is_refused_without_running_it(tmp_path, modelIo):
    import torch

    marker = tmp_path / "created-by-the-file"
    path = tmp_path / "malicious.pt"
    torch.save({"format": "deepgmm-model", "format_version": 1, "payload": _CreatesAFile(marker)}, path)
    text = panel.trainedModelSummary(path, modelIo, {})
    assert text.startswith("This file cannot be used as a trained model: Refusing to load")
    assert panel.trainedModelProblem(path, 1, modelIo) == text
    assert not marker.exists()


def test_without_pytorch_only_the_path_is_checked(trainedModelFile, tmp_path):
    path = trainedModelFile(("T1", "PD"))
    assert panel.trainedModelSummary(path, None) == panel.TORCH_NEEDED_TEXT
    assert panel.trainedModelProblem(path, 1, None) is None  # the logic checks it once PyTorch is there
    assert "does not exist" in panel.trainedModelProblem(tmp_path / "gone.pt", 1, None)


def test_a_model_with_other_channels_is_refused_with_the_fix(trainedModelFile, modelIo):
    path = trainedModelFile(("T1", "PD"))
    problem = panel.trainedModelProblem(path, 1, modelIo, {}, ["MNI T1"], 3)
    assert problem == ("The trained model does not match the input: the model expects 2 channel(s) (T1, PD) but "
                       "the input has 1. Choose 2 input volumes in the order T1, PD, or uncheck 'Use trained model'.")
    assert "expects 2 channel(s)" in panel.trainedModelProblem(path, 3, modelIo, {}, ["T1", "PD", "T2"], 3)
    # Volumes named like the model's channels are checked for their order too ...
    reordered = panel.trainedModelProblem(path, 2, modelIo, {}, ["pd", "t1"], 3)
    assert "the channels are in a different order" in reordered and "in the order T1, PD" in reordered
    assert panel.trainedModelProblem(path, 2, modelIo, {}, ["t1", "PD"], 3) is None
    # ... other volume names are free text and are not compared.
    assert panel.trainedModelProblem(path, 2, modelIo, {}, ["MNI T1 2mm", "proton density"], 3) is None
    assert panel.trainedModelProblem(path, 2, modelIo, {}, ["PD", "FLAIR"], 3) is None
    assert "segments into 3 classes but 4 were requested" in panel.trainedModelProblem(path, 2, modelIo, {}, None, 4)


def test_a_2d_model_is_refused_in_slicer(trainedModelFile, modelIo):
    problem = panel.trainedModelProblem(trainedModelFile(("T1",), spatialDims=2), 1, modelIo, {}, ["T1"], 3)
    assert "the model was trained on 2D images but the input is 3D" in problem
    assert "Slicer volumes are 3D, so this model (trained on 2D images) cannot be used here" in problem


def test_model_files_are_read_once_per_file_version(trainedModelFile, modelIo, tmp_path):
    import os
    import shutil

    path = tmp_path / "copy.pt"
    shutil.copy(trainedModelFile(("T1", "PD")), path)
    calls = []
    counting = SimpleNamespace(describe_model=lambda p: calls.append(p) or modelIo.describe_model(p),
                               format_description=modelIo.format_description,
                               check_compatible=modelIo.check_compatible)
    cache = {}
    for _ in range(3):
        panel.trainedModelSummary(path, counting, cache)
        panel.trainedModelProblem(path, 2, counting, cache, ["T1", "PD"], 3)
    assert len(calls) == 1
    os.utime(path, ns=(0, 1_000_000_000))  # the file changed (e.g. a training run rewrote it)
    panel.trainedModelSummary(path, counting, cache)
    assert len(calls) == 2


def test_trained_model_options_are_what_the_logic_forwards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert panel.trainedModelOptions("brain.pt", 20) == {"model": str(tmp_path / "brain.pt"), "fine_tune": 20}
    assert panel.trainedModelOptions(tmp_path / "brain.pt", 0) == {"model": str(tmp_path / "brain.pt"), "fine_tune": 0}
    assert panel.trainedModelOptions("brain.pt", 0, "off") == {"model": str(tmp_path / "brain.pt"), "fine_tune": 0,
                                                              "label_mrf": "off"}
    assert panel.trainedModelOptions("brain.pt", 0, 1) == {"model": str(tmp_path / "brain.pt"), "fine_tune": 0,
                                                          "label_mrf": 1.0}


def test_bias_field_option_from_the_check_box_and_the_order():
    assert panel.biasFieldOption(False, 4) == "none"  # unchecked: no field, whatever the order
    assert panel.biasFieldOption(True, 0) == "detect"  # the spin box's "when detected", the default
    assert panel.biasFieldOption(True, 2) == 2
    for value in ("none", "auto", 2):  # each is a value the engine accepts
        options.resolve_bias_field_order(value)

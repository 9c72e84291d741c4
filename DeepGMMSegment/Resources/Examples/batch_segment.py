"""Headless batch segmentation with DeepGMMSegment inside 3D Slicer.

Run (one case per call; loop in your shell for many cases)::

    Slicer --no-main-window --python-script batch_segment.py \\
        --input T1.nii.gz --input T2.nii.gz --mask brainmask.nii.gz \\
        --classes 3 --method deepsvg --output results/case01

It writes ``<output>/segmentation.seg.nrrd`` (one segment per class, "Class 1".. in the engine's
stable order), ``<output>/probability_class<k>.nrrd`` (float32, 0..1) and ``<output>/summary.json``
(per-class volume in mL and mean intensities, final NLL, method, seed, device, run time).
``--bias-field [ORDER]`` also writes ``bias_field_channel<c>.nrrd`` and ``corrected_channel<c>.nrrd``
per input; ``--reference-segments strokes.seg.nrrd`` (a few painted strokes per tissue, one segment
each) fixes the classes: class n is the n-th segment's tissue, with its name and colour.
The exit code is 0 on success, 1 on failure (the message is printed). Without PyTorch the run
fails at once with instructions: a Slicer without a main window never asks to install it. Outside Slicer the same
command works with any Python that has the ``slicer-core`` wheel and torch:
``python batch_segment.py --input T1.nii.gz --output out``.

:func:`segmentFiles` is the reusable part: it needs only an MRML scene, so it also runs in plain
Python with the ``slicer-core`` wheel (that is how the project's tests exercise it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _ensureModuleOnPath() -> None:
    """Make ``DeepGMMSegmentLib`` importable when this script is run from the source tree."""
    try:
        import DeepGMMSegmentLib.logic  # noqa: F401 - installed extension: already on the path
    except ImportError:
        moduleFolder = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
        sys.path.insert(0, moduleFolder)


def _readNode(scene, className: str, storageClassName: str, path: str, name: str, failure: str):
    """Read ``path`` into a new ``className`` node of ``scene`` with a ``storageClassName`` storage node."""
    if not os.path.exists(path):
        raise ValueError(f"Input file not found: {path}")
    node = scene.AddNewNodeByClass(className, name)
    storageNode = scene.AddNewNodeByClass(storageClassName)
    storageNode.SetFileName(path)
    if not storageNode.ReadData(node):
        scene.RemoveNode(node)
        raise ValueError(failure)
    node.SetAndObserveStorageNodeID(storageNode.GetID())
    return node


def loadVolume(scene, path: str, name: str, labelmap: bool = False):
    """Read a volume file (NRRD, NIfTI, MHA, ...) into a new node of ``scene``."""
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = _readNode(scene, className, "vtkMRMLVolumeArchetypeStorageNode", path, name,
                     f"Could not read the volume {path}. Use NRRD, NIfTI or MHA.")
    node.CreateDefaultDisplayNodes()
    return node


def loadSegmentation(scene, path: str, name: str):
    """Read a segmentation file (.seg.nrrd) into a new segmentation node of ``scene``."""
    return _readNode(scene, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode", path, name,
                     f"Could not read the segmentation {path}. Save it from Slicer as .seg.nrrd.")


def _writeNode(scene, node, path: str) -> None:
    storageNode = node.CreateDefaultStorageNode()
    storageNode.SetFileName(path)
    if not storageNode.WriteData(node):
        raise RuntimeError(f"Could not write {path}.")


def loadSegmentation(scene, path: str, name: str):
    """Read a segmentation file (.seg.nrrd) into a new segmentation node of ``scene``."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storageNode = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storageNode.SetFileName(path)
    if not storageNode.ReadData(node):
        scene.RemoveNode(node)
        raise ValueError(f"Could not read the segmentation {path}. Save it from Slicer as .seg.nrrd.")
    node.SetAndObserveStorageNodeID(storageNode.GetID())
    return node


def segmentFiles(scene, inputPaths, outputFolder: str, numberOfClasses: int = 3, method: str = "deepsvg",
                 maskPath: str | None = None, device: str = "auto", seed: int = 0, options: dict | None = None,
                 logic=None, progress=print, biasField="none", referenceSegmentsPath: str | None = None) -> dict:
    """Segment the volumes in ``inputPaths`` (channel order; the first defines the grid) and write
    the results into ``outputFolder``. Returns the summary written to ``summary.json``."""
    if not inputPaths:
        raise ValueError("Give at least one --input volume.")
    for path in list(inputPaths) + [p for p in (maskPath, referenceSegmentsPath) if p]:
        if not os.path.exists(path):
            raise ValueError(f"Input file not found: {path}")
    _ensureModuleOnPath()
    from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic

    volumes = [loadVolume(scene, path, f"channel{n}") for n, path in enumerate(inputPaths, start=1)]
    mask = loadVolume(scene, maskPath, "mask", labelmap=True) if maskPath else None
    strokes = loadSegmentation(scene, referenceSegmentsPath, "reference") if referenceSegmentsPath else None
    logic = logic or DeepGMMSegmentLogic()

    lastPrinted = []  # iteration numbers already printed; the logic may skip some of them

    def report(info):
        if progress is not None and info.stage == "fitting" and info.maxIterations:
            if not lastPrinted or info.iteration - lastPrinted[-1] >= 10 or info.iteration == info.maxIterations:
                lastPrinted.append(info.iteration)
                left = "" if info.remainingSeconds is None else f", about {info.remainingSeconds:.0f} s left"
                progress(f"iteration {info.iteration}/{info.maxIterations}, NLL {info.nll:.4f}{left}")
        elif progress is not None and info.stage != "fitting":
            progress(info.stage)

    outputs = logic.process(volumes, numberOfClasses=numberOfClasses, method=method, mask=mask, device=device,
                            seed=seed, options=options, progressCallback=report, biasField=biasField,
                            seedSegmentation=strokes)
    os.makedirs(outputFolder, exist_ok=True)
    files = {"segmentation": os.path.join(outputFolder, "segmentation.seg.nrrd"), "probabilities": []}
    _writeNode(scene, outputs.segmentationNode, files["segmentation"])
    for classIndex, volume in enumerate(outputs.probabilityVolumes, start=1):
        path = os.path.join(outputFolder, f"probability_class{classIndex}.nrrd")
        _writeNode(scene, volume, path)
        files["probabilities"].append(path)
    for kind, nodes in (("bias_field", outputs.biasFieldVolumes), ("corrected", outputs.correctedVolumes)):
        for channel, volume in enumerate(nodes, start=1):
            path = os.path.join(outputFolder, f"{kind}_channel{channel}.nrrd")
            _writeNode(scene, volume, path)
            files.setdefault(kind, []).append(path)
    summary = {
        "inputs": [os.path.abspath(p) for p in inputPaths],
        "mask": os.path.abspath(maskPath) if maskPath else None,
        "referenceSegments": os.path.abspath(referenceSegmentsPath) if referenceSegmentsPath else None,
        "biasField": outputs.segmentationNode.GetAttribute("DeepGMMSegment.BiasField"),
        "method": outputs.method,
        "numberOfClasses": numberOfClasses,
        "seed": outputs.seed,
        "device": outputs.device,
        "seconds": outputs.seconds,
        "iterations": outputs.numberOfIterations,
        "finalNll": outputs.finalNll,
        "classes": [{"name": s.name, "voxelCount": s.voxelCount, "volumeMl": s.volumeMl,
                     "meanIntensities": [None if math.isnan(m) else m for m in s.meanIntensities]}
                    for s in outputs.classStatistics],
        "files": files,
    }
    with open(os.path.join(outputFolder, "summary.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
    return summary


def main(argv=None) -> int:
    _ensureModuleOnPath()
    from DeepGMMSegmentLib import options

    parser = argparse.ArgumentParser(description="DeepGMMSegment batch segmentation (run inside Slicer).")
    parser.add_argument("--input", action="append", required=True,
                        help="input volume; repeat for more channels (first = output grid)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--classes", type=int, default=3, help="number of tissue classes (default 3)")
    parser.add_argument("--method", default=options.DEFAULT_METHOD, choices=options.METHODS)
    parser.add_argument("--mask", help="labelmap file: only nonzero voxels are segmented")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-iter", type=int, help="iteration limit (method default otherwise)")
    parser.add_argument("--bias-field", nargs="?", const="auto", default="none", metavar="ORDER",
                        help="correct a smooth bias field: 'auto' (when given without a value) or a basis order "
                             "1..6; writes bias_field_channel<c>.nrrd and corrected_channel<c>.nrrd")
    parser.add_argument("--reference-segments", metavar="SEG_NRRD",
                        help="segmentation (.seg.nrrd) with a few painted strokes per tissue, one segment each: "
                             "class n is the n-th segment's tissue, with its name and colour")
    arguments = parser.parse_args(argv)
    import slicer

    scene = getattr(slicer, "mrmlScene", None)
    keepAlive = None
    if scene is None:
        # Plain Python with the slicer-core wheel (no Slicer application): a scene of our own, with
        # the Segmentations logic that registers the segmentation converters.
        scene = slicer.vtkMRMLScene()
        keepAlive = slicer.vtkSlicerSegmentationsModuleLogic()
        keepAlive.SetMRMLScene(scene)
    options = {"max_iter": arguments.max_iter} if arguments.max_iter else None
    try:
        biasField = int(arguments.bias_field) if arguments.bias_field.isdigit() else arguments.bias_field
        summary = segmentFiles(scene, arguments.input, arguments.output, arguments.classes,
                               arguments.method, arguments.mask, arguments.device, arguments.seed, options,
                               biasField=biasField, referenceSegmentsPath=arguments.reference_segments)
    except Exception as error:  # noqa: BLE001 - a batch run reports and exits non-zero
        print(f"DeepGMMSegment failed: {error}", file=sys.stderr)
        return 1
    for stats in summary["classes"]:
        print(f"{stats['name']}: {stats['volumeMl']:.1f} mL")
    print(f"Wrote {summary['files']['segmentation']}")
    return 0


if __name__ == "__main__":
    exitCode = main(sys.argv[1:])
    slicerModule = sys.modules.get("slicer")
    if slicerModule is not None and getattr(slicerModule, "app", None) is not None:
        slicerModule.util.exit(exitCode)  # ends the headless Slicer session with this code
    else:
        sys.exit(exitCode)

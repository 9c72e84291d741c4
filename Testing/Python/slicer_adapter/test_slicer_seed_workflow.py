"""The "paint a few strokes per tissue, then click Segment" workflow on the SYNTHETIC cardiac phantom.

Three co-registered sequences (LGE, T2, bSSFP) and an LV mask go into the scene; a reference
segmentation holds a few strokes per tissue on one short-axis slice, one segment each, named and
coloured as a radiologist would; the logic segments with them. Set
``DEEPGMMSEGMENT_SEED_WORKFLOW_PNG=<path>`` to also keep the picture of the run (that is how
``docs/images/slicer-seed-workflow.png`` is made).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic
from DeepGMMSegmentLib.slicer_adapter import geometry as sceneGeometry
from DeepGMMSegmentLib.slicer_adapter import outputs as sceneOutputs

REPOSITORY = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
if REPOSITORY not in sys.path:
    sys.path.insert(0, REPOSITORY)  # evaluation/ is a scripts' folder, not an installed package

from evaluation.cardiac_phantom import generate_case, seed_strokes  # noqa: E402

# Reference segments in the order the radiologist adds them (= the phantom's labels 1..4).
TISSUES = (("Blood pool", (0.85, 0.15, 0.15)), ("Myocardium", (0.6, 0.4, 0.25)), ("Edema", (1.0, 0.85, 0.1)),
           ("Scar", (0.1, 0.85, 0.95)))
CASE_SEED, PAINTED_SLICE = 1, 5  # a case with an infarct on slices 2..8


def test_painted_strokes_name_and_fix_the_cardiac_classes(mrmlScene, helpers):
    case = generate_case(CASE_SEED)
    assert PAINTED_SLICE in case.infarct_slices
    thickness, pixel, _ = case.spacing
    ijkToRas = helpers.ijkToRasMatrix((pixel, pixel, thickness), (0.0, 0.0, 0.0))
    sequences = [helpers.addVolume(mrmlScene, channel.astype(np.float32), ijkToRas, name)
                 for channel, name in zip(case.channels, case.channel_names)]
    grid = sceneGeometry.volumeGeometry(sequences[0])
    masks = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LV mask")
    maskId = masks.AddSegmentFromBinaryLabelmapRepresentation(grid.orientedImage(case.mask), "LV")
    # Strokes on one slice only: 5 % of that slice's LV, under 1 % of the whole mask.
    onOneSlice = np.zeros_like(case.labels)
    onOneSlice[PAINTED_SLICE] = case.labels[PAINTED_SLICE]
    painted = seed_strokes(onOneSlice, seed=0, max_fraction=0.05)
    assert 0 < np.count_nonzero(painted) < 0.01 * case.mask.sum()
    strokes = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Strokes")
    for label, (name, color) in enumerate(TISSUES, start=1):
        strokes.AddSegmentFromBinaryLabelmapRepresentation(grid.orientedImage(painted == label), name, color)

    outputs = DeepGMMSegmentLogic().process(sequences, numberOfClasses=4, method="em-gmm", mask=(masks, maskId),
                                            seedSegmentation=strokes)
    segmentation = outputs.segmentationNode.GetSegmentation()
    segments = [segmentation.GetNthSegment(n) for n in range(segmentation.GetNumberOfSegments())]
    assert [(s.GetName(), tuple(np.round(s.GetColor(), 3))) for s in segments] == \
        [(name, tuple(np.round(color, 3))) for name, color in TISSUES]
    labels = sceneOutputs.readClassLabels(outputs.segmentationNode, grid)
    np.testing.assert_array_equal(labels[painted > 0], painted[painted > 0])  # the strokes keep their tissue
    dice = [2 * np.sum((labels == k) & (case.labels == k)) / (np.sum(labels == k) + np.sum(case.labels == k))
            for k in range(1, 5)]
    # Class k is the tissue of the k-th segment with no matching: the blood pool is found well, and
    # every class overlaps its own tissue (the evaluation measures the accuracy, docs/evaluation.md).
    assert dice[0] > 0.8 and min(dice) > 0.2, dice

    outputPath = os.environ.get("DEEPGMMSEGMENT_SEED_WORKFLOW_PNG")
    if outputPath:
        savePicture(outputPath, case, painted, labels, segments, dice)


def savePicture(path, case, painted, labels, segments, dice):
    """Three panels of the painted slice: LGE with the strokes, the output classes (names and colours
    read from the output segments), the phantom's truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows, columns = np.nonzero(case.mask[PAINTED_SLICE])
    margin = 10
    crop = (slice(rows.min() - margin, rows.max() + margin), slice(columns.min() - margin, columns.max() + margin))
    lge = case.channels[0, PAINTED_SLICE][crop]
    colors = ListedColormap([(0, 0, 0, 0)] + [(*s.GetColor(), 1.0) for s in segments])
    panels = (("1. Paint a few strokes per tissue\n(reference segments, one slice)", painted, 1.0),
              ("2. Segment (EM-GMM): classes named\nand coloured after the segments", labels, 0.45),
              ("Truth of the synthetic phantom", case.labels, 0.45))
    figure, axes = plt.subplots(1, 3, figsize=(11, 4.3))
    for axis, (title, layer, alpha) in zip(axes, panels):
        axis.imshow(lge, cmap="gray", interpolation="nearest")
        axis.imshow(layer[PAINTED_SLICE][crop], cmap=colors, vmin=0, vmax=len(segments), alpha=alpha,
                    interpolation="nearest")
        axis.set_title(title, fontsize=10)
        axis.set_axis_off()
    handles = [Patch(color=s.GetColor(), label=f"{s.GetName()} (Dice {d:.2f})") for s, d in zip(segments, dice)]
    figure.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False)
    figure.suptitle("SYNTHETIC cardiac phantom (LGE shown; LGE + T2 + bSSFP used), short-axis slice "
                    f"{PAINTED_SLICE}; Dice over the whole stack", fontsize=9)
    figure.tight_layout(rect=(0, 0.07, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)

"""Slicer adapter, class identity from painted voxels: reference segments -> the engine's ``seeds``.

The user paints a few strokes per tissue in the Segment Editor, one segment per tissue (for
example "Blood pool", "Myocardium", "Scar"). :func:`referenceSegments` turns that segmentation
into the engine's seed label array on the first input's grid (resampled like every input):
segment n (in the segmentation's order) marks class n, 0 is unmarked. The output segments take
the reference segments' names and colours in the same order (:mod:`.outputs`). Nothing in the
scene is created or modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import VolumeGeometry, maskFromSegment


@dataclass
class ReferenceSegments:
    """The seeds of a run: labels on the grid and, per label 1..L, the segment's name and colour."""

    segmentationNode: object  # the reference segmentation (vtkMRMLSegmentationNode), never modified
    labels: np.ndarray  # uint8 (K, J, I) on the first input's grid: 0 unmarked, n = n-th reference segment
    names: list[str]
    colors: list[tuple[float, float, float]]


def referenceSegmentIds(seedSegmentation, excludeSegmentId: str = "") -> list[str]:
    """The segment ids that mark classes, in the segmentation's order. ``excludeSegmentId`` is the
    mask segment when the strokes were painted into the mask's own segmentation: it is not a class."""
    segmentation = seedSegmentation.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    return [segmentId for segmentId in ids if segmentId != excludeSegmentId]


def segmentCountProblem(seedSegmentation, numberOfClasses: int, excludeSegmentId: str = "") -> str | None:
    """Why these reference segments cannot fix the classes (too few, more than classes), or None."""
    count = len(referenceSegmentIds(seedSegmentation, excludeSegmentId))
    name = seedSegmentation.GetName()
    if count < 2:
        return (f"The reference segmentation '{name}' has {count} segment(s) to use; paint at least two tissues, "
                "one segment each (Segment Editor), or clear Reference segments.")
    if count > numberOfClasses:
        return (f"The reference segmentation '{name}' has {count} segments but the number of classes is "
                f"{numberOfClasses}: raise the number of classes to at least {count} (classes beyond the "
                "segments are found freely), or remove segments.")
    return None


def referenceSegments(seedSegmentation, geometry: VolumeGeometry, validMask: np.ndarray, numberOfClasses: int,
                      region: tuple | None = None, excludeSegmentId: str = "") -> ReferenceSegments:
    """Rasterise the reference segments on ``geometry`` and check them; ``ValueError`` names the
    segment and the fix (empty, overlapping another segment, painted outside the mask, or with no
    voxel inside the ROI box)."""
    problem = segmentCountProblem(seedSegmentation, numberOfClasses, excludeSegmentId)
    if problem is not None:
        raise ValueError(problem)
    segmentation = seedSegmentation.GetSegmentation()
    segmentIds = referenceSegmentIds(seedSegmentation, excludeSegmentId)
    names = [segmentation.GetSegment(segmentId).GetName() for segmentId in segmentIds]
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    for label, (segmentId, name) in enumerate(zip(segmentIds, names), start=1):
        painted = maskFromSegment(seedSegmentation, segmentId, geometry)
        where = f"Segment '{name}' of '{seedSegmentation.GetName()}'"
        if not painted.any():
            raise ValueError(f"{where} is empty on the grid of the first input: paint a few strokes of that "
                             "tissue into it (Segment Editor), or delete the segment.")
        overlap = painted & (labels > 0)
        if overlap.any():
            other = names[int(labels[overlap][0]) - 1]
            raise ValueError(f"{where} overlaps segment '{other}' in {int(overlap.sum())} voxel(s): a voxel can "
                             "mark one tissue only. Erase the overlap (Segment Editor: Erase, or Masking: "
                             "Modify other segments: Overwrite all).")
        outside = painted & ~validMask
        if outside.any():
            raise ValueError(f"{where} has {int(outside.sum())} painted voxel(s) outside the mask (or outside the "
                             "area every input covers): erase them (Segment Editor, Masking: Editable area "
                             "inside the mask segment) or change the mask.")
        if region is not None and not painted[region].any():
            raise ValueError(f"{where} has no painted voxel inside the ROI box: paint that tissue inside the "
                             "box, enlarge the box, or clear Reference segments.")
        labels[painted] = label
    colors = [tuple(float(c) for c in segmentation.GetSegment(segmentId).GetColor()) for segmentId in segmentIds]
    return ReferenceSegments(segmentationNode=seedSegmentation, labels=labels, names=names, colors=colors)

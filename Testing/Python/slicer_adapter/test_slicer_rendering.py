"""What the radiologist sees: the result over the first input in the Red slice view.

Rendered without OpenGL through ``vtkMRMLSliceLogic`` (the slice reslicing and layer blending
that feeds Slicer's Red view), on the bundled MNI152 2 mm T1 with its brain mask, EM in a thin
ROI slab over one hemisphere (fast). Set ``DEEPGMMSEGMENT_SLICE_VIEW_PNG=<path>`` to also keep
the picture (that is how ``docs/images/slicer-slice-view.png`` is made).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import slicer
import slicer.util
import vtk
from vtk.util import numpy_support

from DeepGMMSegmentLib.slicer_adapter import geometry as sceneGeometry
from DeepGMMSegmentLib.slicer_adapter import outputs as sceneOutputs
from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic

REPOSITORY = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SAMPLE_T1 = os.path.join(REPOSITORY, "data", "sample", "mni152_2009_t1_2mm.nii.gz")
SAMPLE_MASK = os.path.join(REPOSITORY, "data", "sample", "mni152_2009_brainmask_2mm.nii.gz")
VIEW_SIZE = 320


def exportClassLabelmap(scene, segmentationNode, referenceVolume):
    """The segments as a labelmap volume (segment n -> label n + 1) coloured like the segments."""
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "classes")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentationNode, segmentIds, labelmap, referenceVolume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    colorTable = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "class colours")
    colorTable.SetTypeToUser()
    colorTable.SetNumberOfColors(len(segmentIds) + 1)
    colorTable.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for n, segmentId in enumerate(segmentIds, start=1):
        segment = segmentation.GetSegment(segmentId)
        colorTable.SetColor(n, segment.GetName(), *segment.GetColor(), 1.0)
    labelmap.CreateDefaultDisplayNodes()
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colorTable.GetID())
    return labelmap


def renderRedSliceView(environment, background, labelmap, rasOffset: float) -> np.ndarray:
    """RGBA (rows top to bottom) of an axial Red slice view at S = ``rasOffset``."""
    sliceLogic = slicer.vtkMRMLSliceLogic()
    sliceLogic.SetMRMLApplicationLogic(environment.applicationLogic)
    sliceLogic.SetMRMLScene(environment.scene)
    sliceNode = sliceLogic.AddSliceNode("Red")
    sliceNode.SetOrientation("Axial")
    sliceNode.SetDimensions(VIEW_SIZE, VIEW_SIZE, 1)
    composite = sliceLogic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(background.GetID())
    composite.SetLabelVolumeID(labelmap.GetID())
    composite.SetLabelOpacity(0.5)
    sliceLogic.FitSliceToBackground(VIEW_SIZE, VIEW_SIZE)
    sliceLogic.SetSliceOffset(rasOffset)
    connection = sliceLogic.GetImageDataConnection()
    connection.GetProducer().Update()
    image = connection.GetProducer().GetOutputDataObject(connection.GetIndex())
    width, height, _ = image.GetDimensions()
    components = image.GetPointData().GetScalars().GetNumberOfComponents()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, components)
    outputPath = os.environ.get("DEEPGMMSEGMENT_SLICE_VIEW_PNG")
    if outputPath:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(outputPath)
        writer.SetInputConnection(connection)
        writer.Write()
    return pixels[::-1].copy()  # VTK rows go bottom-up


def test_red_slice_view_shows_the_classes_over_the_input(slicerEnvironment, tmp_path):
    if not (os.path.exists(SAMPLE_T1) and os.path.exists(SAMPLE_MASK)):
        pytest.skip("bundled MNI152 sample not present")
    scene = slicerEnvironment.scene
    volumesLogic = slicerEnvironment.moduleLogics["volumes"]
    t1 = volumesLogic.AddArchetypeVolume(SAMPLE_T1, "MNI152 T1", 0)
    brainMask = volumesLogic.AddArchetypeVolume(SAMPLE_MASK, "brain mask", 1)
    assert t1 is not None and brainMask is not None and brainMask.IsA("vtkMRMLLabelMapVolumeNode")
    t1.GetDisplayNode().AutoWindowLevelOn()

    # The ROI: a 6 mm slab through the basal ganglia, over one hemisphere only, so the view shows
    # the classes beside the untouched T1 (and EM stays fast).
    geometry = sceneGeometry.volumeGeometry(t1)
    centre = geometry.ijkToRas @ np.array([(geometry.shape[2] - 1) / 2, (geometry.shape[1] - 1) / 2, 40.0, 1.0])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "slab")
    roi.SetCenter(centre[0] + 50.0, centre[1], centre[2])
    roi.SetSize(100.0, 400.0, 6.0)
    outputs = DeepGMMSegmentLogic().process([t1], numberOfClasses=3, method="em-gmm", mask=brainMask, roi=roi,
                                            probabilityMaps=False)
    labels = sceneOutputs.readClassLabels(outputs.segmentationNode, geometry)
    assert all(s.voxelCount > 500 for s in outputs.classStatistics)
    # CSF < grey matter < white matter in T1: the class means must follow that order.
    means = [s.meanIntensities[0] for s in outputs.classStatistics]
    assert means == sorted(means)
    assert not labels[:35].any()  # nothing outside the slab

    labelmap = exportClassLabelmap(scene, outputs.segmentationNode, t1)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap), labels)
    pixels = renderRedSliceView(slicerEnvironment, t1, labelmap, float(centre[2]))

    rgb = pixels[..., :3].astype(float) / 255.0
    assert rgb.std() > 0.05  # not blank
    assert (rgb.max(axis=2) < 0.02).mean() > 0.2  # black outside the head, as in Slicer
    # The hemisphere outside the ROI shows the T1 alone: grey pixels of many brightness levels.
    greyscale = (rgb.max(axis=2) - rgb.min(axis=2) < 0.02) & (rgb.max(axis=2) > 0.15)
    assert greyscale.sum() > 2000 and len(np.unique(rgb[greyscale][:, 0])) > 20
    # Blending a colour with grey (the T1 under it) keeps its "chroma direction": the colour with
    # its grey part removed and its range scaled to 1. Each class colour must be visible.
    low, high = rgb.min(axis=2, keepdims=True), rgb.max(axis=2, keepdims=True)
    chroma = high[..., 0] - low[..., 0]
    direction = (rgb - low) / np.maximum(high - low, 1e-6)
    segmentation = outputs.segmentationNode.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        color = np.array(segmentation.GetNthSegment(n).GetColor())
        classDirection = (color - color.min()) / (color.max() - color.min())
        matches = (chroma > 0.1) & (np.abs(direction - classDirection).max(axis=2) < 0.1)
        assert matches.sum() > 200, f"class {n + 1} colour not visible"

"""Fixtures for the MRML adapter / logic tests: a real MRML scene from the ``slicer-core`` wheel.

``mrmlScene`` builds what the Slicer application would provide for a module logic: a scene, an
application logic, and the Colors, Volumes, Segmentations, Crop Volume, Markups and Subject
Hierarchy module logics registered on it (the Segmentations logic also registers the segmentation
converter rules). ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` point at them for the
duration of the test, as inside Slicer. No ``slicer.app`` is faked, so code that checks for the
Slicer application still sees plain Python.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest

MODULE_FOLDER = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "DeepGMMSegment"))
if MODULE_FOLDER not in sys.path:
    sys.path.insert(0, MODULE_FOLDER)

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402


def _trainedModels():
    """../trained_models.py, loaded by path (Testing/Python must stay off sys.path, see there)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "trained_models.py")
    spec = importlib.util.spec_from_file_location("_trained_models_loader_slicer", path)
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    return loader.load()


trainedModelFile = _trainedModels().trainedModelFile  # fixture: real model files from DeepGMMSegmentLib.train

# Module logics registered on every test scene: (name used by slicer.modules, class name).
_MODULE_LOGICS = (
    ("colors", "Colors", "vtkSlicerColorLogic"),
    ("volumes", "Volumes", "vtkSlicerVolumesLogic"),
    ("segmentations", "Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("cropvolume", "CropVolume", "vtkSlicerCropVolumeLogic"),
    ("markups", "Markups", "vtkSlicerMarkupsLogic"),
    ("subjecthierarchy", "SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
)


class SlicerTestEnvironment:
    """A scene with its application logic and module logics (kept alive for the test)."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        self.applicationLogic.SetMRMLScene(self.scene)
        self.moduleLogics = {}
        for attributeName, moduleName, className in _MODULE_LOGICS:
            logic = getattr(slicer, className)()
            logic.SetMRMLApplicationLogic(self.applicationLogic)
            logic.SetMRMLScene(self.scene)
            self.applicationLogic.SetModuleLogic(moduleName, logic)
            self.moduleLogics[attributeName] = logic

    def modulesNamespace(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(**{name: types.SimpleNamespace(logic=(lambda logic=logic: logic))
                                        for name, logic in self.moduleLogics.items()})

    def close(self):
        for logic in self.moduleLogics.values():
            logic.SetMRMLScene(None)
        self.scene.Clear(1)


@pytest.fixture
def slicerEnvironment(monkeypatch):
    """The test's MRML environment; ``slicer.mrmlScene`` and ``slicer.modules`` are set."""
    environment = SlicerTestEnvironment()
    monkeypatch.setattr(slicer, "mrmlScene", environment.scene, raising=False)
    monkeypatch.setattr(slicer, "modules", environment.modulesNamespace(), raising=False)
    yield environment
    environment.close()


@pytest.fixture
def mrmlScene(slicerEnvironment):
    """A real ``vtkMRMLScene`` with the module logics registered."""
    return slicerEnvironment.scene


def ijkToRasMatrix(spacing, origin, direction=None) -> np.ndarray:
    """4x4 IJK->RAS from spacing (I, J, K), origin (RAS) and a 3x3 direction (columns = I, J, K axes)."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def obliqueDirection(angleDegrees=20.0) -> np.ndarray:
    """A rotation about an oblique axis (no axis-aligned direction left), with a flipped I axis."""
    axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
    angle = np.radians(angleDegrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    return rotation @ np.diag([-1.0, 1.0, 1.0])


def addVolume(scene, array, ijkToRas, name, className="vtkMRMLScalarVolumeNode"):
    """A volume node holding ``array`` (K, J, I) with the given IJK->RAS matrix, with display nodes."""
    import slicer.util

    node = scene.AddNewNodeByClass(className, name)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    from vtk.util import numpy_support

    vtkArray = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True,
                                          array_type=numpy_support.get_vtk_array_type(array.dtype))
    imageData.GetPointData().SetScalars(vtkArray)
    node.SetAndObserveImageData(imageData)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
    node.CreateDefaultDisplayNodes()
    return node


def phantom(shape=(6, 20, 24), seed=0, classes=3):
    """A small two-channel phantom with ``classes`` blocky tissues and mild noise.

    Returns (channel1, channel2, trueLabels 1..classes); channel 1 increases with the class.
    """
    random = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    labels = 1 + ((i * classes) // shape[2])
    labels = np.clip(labels, 1, classes).astype(np.uint8)
    labels[(j < shape[1] // 3) & (labels == 1)] = 2
    means1 = np.linspace(100, 300, classes)
    means2 = np.array([200, 50, 120, 260, 20, 310][:classes], dtype=float)
    channel1 = means1[labels - 1] + random.normal(0, 8, shape)
    channel2 = means2[labels - 1] + random.normal(0, 8, shape)
    return channel1.astype(np.float32), channel2.astype(np.float32), labels


def volumeState(volume):
    """A volume's voxels, modification times and IJK->RAS matrix: any change to the input shows here."""
    import slicer.util

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return (slicer.util.arrayFromVolume(volume).copy(), volume.GetMTime(), volume.GetImageData().GetMTime(),
            slicer.util.arrayFromVTKMatrix(matrix).copy())


def assertVolumeUnchanged(volume, state):
    """Fail unless ``volume`` is exactly as :func:`volumeState` saw it."""
    array, nodeMTime, imageMTime, matrix = volumeState(volume)
    np.testing.assert_array_equal(array, state[0])
    assert (nodeMTime, imageMTime) == (state[1], state[2])
    np.testing.assert_array_equal(matrix, state[3])


@pytest.fixture
def helpers():
    """The helper functions above, for tests (conftest modules cannot be imported by name)."""
    return types.SimpleNamespace(ijkToRasMatrix=ijkToRasMatrix, obliqueDirection=obliqueDirection,
                                 addVolume=addVolume, phantom=phantom, volumeState=volumeState,
                                 assertVolumeUnchanged=assertVolumeUnchanged)

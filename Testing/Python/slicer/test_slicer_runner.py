"""Worker process runner (process-tree cancel, protocol) and the torch dependency check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from DeepGMMSegmentLib import dependencies, runner, worker
from DeepGMMSegmentLib.dependencies import MissingDependencyError, TorchDependency
from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic

psutil = pytest.importorskip("psutil")

# A stand-in worker that starts a grandchild (as PythonSlicer -> python does inside Slicer),
# reports both process ids with the worker protocol, and then sleeps.
_TREE_SCRIPT = f"""
import json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print({worker.MESSAGE_PREFIX!r} + json.dumps({{"event": "child", "pid": child.pid}}), flush=True)
print("plain log line", flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("withPsutil", [True, False], ids=["psutil", "no-psutil"])
def test_cancel_kills_the_whole_process_tree(monkeypatch, tmp_path, withPsutil):
    if not withPsutil:
        monkeypatch.setattr(runner, "_optionalPsutil", lambda: None)  # as in Slicer, where psutil is absent
    process = runner.WorkerProcess([sys.executable, "-c", _TREE_SCRIPT], stderrPath=str(tmp_path / "err.txt"))
    process.start()
    events = []
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "child" for e in events):
        assert time.monotonic() < deadline and process.isRunning()
        events += process.poll()
        time.sleep(0.02)
    childPid = next(e["pid"] for e in events if e.get("event") == "child")
    assert psutil.pid_exists(childPid) and not _gone(childPid)

    assert process.cancel() is True
    assert process.cancelled and not process.isRunning()
    assert _gone(process.pid) and _gone(childPid)
    events += process.poll()
    assert {"event": "log", "line": "plain log line"} in events


def test_segmentation_job_round_trip_and_progress(tmp_path):
    random = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 200)
    channel = (labels * 50.0 + random.normal(0, 3, 400)).reshape(4, 10, 10).astype(np.float32)
    job = runner.SegmentationJob([channel], None, numberOfClasses=2, method="em-gmm", spacing=(2.0, 1.0, 1.0),
                                 options={"max_iter": 20})
    job.start()
    folder = job.jobFolder
    with open(f"{folder}/{worker.JOB_FILE}", encoding="utf-8") as file:
        assert json.load(file)["spacing"] == [2.0, 1.0, 1.0]
    updates = []
    while job.isRunning():
        updates += job.progressUpdates()
        time.sleep(0.02)
    updates += job.progressUpdates()
    result = job.result()
    job.cleanup()
    assert [u.stage for u in updates][:2] == ["loading", "fitting"] and updates[-1].stage == "saving"
    fitting = [u for u in updates if u.stage == "fitting" and u.maxIterations]
    assert fitting and fitting[-1].iteration == result.numberOfIterations
    assert result.labels.shape == (4, 10, 10) and result.probabilities.shape == (2, 4, 10, 10)
    np.testing.assert_array_equal(result.labels.ravel(), labels + 1)
    assert result.method == "em-gmm" and result.device == "cpu"
    assert not os.path.exists(folder)


def test_worker_crash_is_reported_with_its_output(tmp_path):
    # A worker that dies without writing error.json (e.g. a crash in a native library).
    crash = runner.SegmentationJob([np.zeros((2, 2, 2), np.float32)], None, 2, "em-gmm")
    crash.jobFolder = str(tmp_path)
    crash.worker = runner.WorkerProcess([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); "
                                         "sys.exit(7)"], stderrPath=str(tmp_path / "worker-stderr.txt"))
    crash.worker.start()
    crash.worker.wait()
    with pytest.raises(runner.WorkerError, match=r"exit code 7(.|\n)*boom"):
        crash.result()


class _FakePyTorchUtilsLogic:
    """Stand-in for the PyTorch extension's PyTorchUtilsLogic (it cannot run outside Slicer)."""

    installed = False
    installResult = "torch-module"
    calls: list = []

    def torchInstalled(self):
        return type(self).installed

    def installTorch(self, askConfirmation=False, torchVersionRequirement=None, **kwargs):
        type(self).calls.append({"askConfirmation": askConfirmation,
                                 "torchVersionRequirement": torchVersionRequirement})
        return type(self).installResult


def _fakePyTorchUtils(installed=False, installResult="torch-module"):
    logicClass = type("PyTorchUtilsLogic", (_FakePyTorchUtilsLogic,),
                      {"installed": installed, "installResult": installResult, "calls": []})
    return types.SimpleNamespace(PyTorchUtilsLogic=logicClass)


def test_outside_slicer_only_checks_torch(monkeypatch):
    assert not dependencies.isSlicerApplication()
    TorchDependency()()  # torch is installed in the test environment
    realFindSpec = dependencies.importlib.util.find_spec
    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else realFindSpec(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install torch"):
        TorchDependency()()


def test_torch_too_old_is_reported(monkeypatch):
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: (1, 13, 1))
    with pytest.raises(MissingDependencyError, match="1.13.1 is too old"):
        TorchDependency(insideSlicer=False)()


def test_inside_slicer_without_pytorch_extension():
    assert "PyTorchUtils" not in sys.modules
    with pytest.raises(MissingDependencyError, match="Extensions Manager"):
        TorchDependency(insideSlicer=True, confirm=lambda question: pytest.fail("must not ask"))()


def test_inside_slicer_with_torch_installed_asks_nothing():
    utils = _fakePyTorchUtils(installed=True)
    TorchDependency(pyTorchUtilsModule=utils, insideSlicer=True, confirm=lambda q: pytest.fail("must not ask"))()
    assert utils.PyTorchUtilsLogic.calls == []


def test_inside_slicer_installs_through_pytorchutils_after_asking_once():
    utils = _fakePyTorchUtils(installed=False)
    questions = []
    dependency = TorchDependency(pyTorchUtilsModule=utils, insideSlicer=True,
                                 confirm=lambda question: questions.append(question) or True)
    dependency()
    assert len(questions) == 1 and "PyTorch" in questions[0]
    assert utils.PyTorchUtilsLogic.calls == [{"askConfirmation": False,
                                              "torchVersionRequirement": dependencies.TORCH_VERSION_REQUIREMENT}]


def test_inside_slicer_declined_install_is_not_asked_again():
    utils = _fakePyTorchUtils(installed=False)
    questions = []
    dependency = TorchDependency(pyTorchUtilsModule=utils, insideSlicer=True,
                                 confirm=lambda question: questions.append(question) or False)
    with pytest.raises(MissingDependencyError, match="declined"):
        dependency()
    with pytest.raises(MissingDependencyError, match="declined"):
        dependency()
    assert len(questions) == 1 and utils.PyTorchUtilsLogic.calls == []


def test_inside_slicer_failed_install_points_to_pytorch_util():
    utils = _fakePyTorchUtils(installed=False, installResult=None)
    with pytest.raises(MissingDependencyError, match="PyTorch Util module"):
        TorchDependency(pyTorchUtilsModule=utils, insideSlicer=True, confirm=lambda q: True)()


def test_logic_checks_dependencies_before_starting_a_worker(mrmlScene, helpers):
    volume = helpers.addVolume(mrmlScene, helpers.phantom((3, 6, 6))[0], helpers.ijkToRasMatrix((1, 1, 1), (0, 0, 0)),
                               "T1")
    nodesBefore = mrmlScene.GetNumberOfNodes()

    def missingTorch():
        raise MissingDependencyError("PyTorch is needed")

    logic = DeepGMMSegmentLogic(dependencyInstaller=missingTorch,
                                runnerFactory=lambda **kwargs: pytest.fail("no worker may start"))
    with pytest.raises(MissingDependencyError, match="PyTorch is needed"):
        logic.process([volume], numberOfClasses=2, method="em-gmm")
    assert not logic.isProcessing() and mrmlScene.GetNumberOfNodes() == nodesBefore


_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # as in a Slicer where the PyTorch extension has not installed torch yet
from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic
from DeepGMMSegmentLib.dependencies import MissingDependencyError, TorchDependency
try:
    TorchDependency()()
except MissingDependencyError as error:
    print("missing:", error)
"""


def test_logic_imports_without_torch():
    completed = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": runner.moduleFolder()})
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "missing:" in completed.stdout and "pip install torch" in completed.stdout

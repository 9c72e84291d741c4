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

from DeepGMMSegmentLib.result import SegmentationResult
from DeepGMMSegmentLib.slicer_adapter import dependencies, runner, worker
from DeepGMMSegmentLib.slicer_adapter.dependencies import MissingDependencyError, TorchDependency
from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic

psutil = pytest.importorskip("psutil")

# A stand-in worker that starts a grandchild (as PythonSlicer -> python does inside Slicer), prints a
# plain log line, reports the grandchild's id with the worker protocol, and then sleeps. The log line
# comes first: once the "child" event has arrived, the pipe's order guarantees the line has too.
_TREE_SCRIPT = f"""
import json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("plain log line", flush=True)
print({worker.MESSAGE_PREFIX!r} + json.dumps({{"event": "child", "pid": child.pid}}), flush=True)
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
    # Plain lines become log events, in the order written (the line was printed before the event).
    assert events.index({"event": "log", "line": "plain log line"}) < events.index({"event": "child", "pid": childPid})

    # Events, not speed: both processes are gone when cancel returns (60 s only guards against a hang;
    # the default 2 s is for Slicer's GUI, and a loaded machine can take longer to reap a process).
    assert process.cancel(timeout=60) is True
    assert process.cancelled and not process.isRunning()
    assert _gone(process.pid) and _gone(childPid)
    assert process.poll() == []  # nothing more after the cancel


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
    assert fitting and fitting[-1].iteration == result.n_iter
    assert result.labels.shape == (4, 10, 10) and result.probabilities.shape == (2, 4, 10, 10)
    np.testing.assert_array_equal(result.labels.ravel(), labels + 1)
    assert result.method == "em-gmm" and result.device == "cpu"
    assert not os.path.exists(folder)


def test_worker_imports_this_copy_of_the_package(tmp_path):
    """The worker runs from slicer_adapter/, two folders below the module folder: it must import the
    package it belongs to, not another copy on PYTHONPATH (or an installed one)."""
    import DeepGMMSegmentLib

    assert os.path.join(runner.moduleFolder(), "DeepGMMSegmentLib") == os.path.dirname(DeepGMMSegmentLib.__file__)
    decoy = tmp_path / "decoy" / "DeepGMMSegmentLib"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text('raise ImportError("the worker imported another copy of DeepGMMSegmentLib")\n')
    channel = np.repeat(np.arange(2.0), 50).reshape(1, 10, 10).astype(np.float32)
    job = runner.SegmentationJob([channel], None, numberOfClasses=2, method="em-gmm", options={"max_iter": 5},
                                 environment={**os.environ, "PYTHONPATH": str(decoy.parent)})
    job.start()
    job.wait(timeout=120)
    try:
        result = job.result()  # a WorkerError with the decoy's message if the wrong copy was imported
    finally:
        job.cleanup()
    assert isinstance(result, SegmentationResult) and result.labels.shape == (1, 10, 10)


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


def test_inside_slicer_without_pytorch_extension(torchMissing):
    assert "PyTorchUtils" not in sys.modules
    with pytest.raises(MissingDependencyError, match="Extensions Manager"):
        TorchDependency(insideSlicer=True, testingMode=False, canAsk=True,
                        confirm=lambda question: pytest.fail("must not ask"))()


@pytest.fixture
def torchMissing(monkeypatch):
    """torch absent from the package metadata until the stand-in PyTorchUtils installs it."""
    state = {"installed": False}
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: (2, 13, 0) if state["installed"] else None)
    return state


def _insideSlicer(utils, questions, answer=True, **options):
    """A TorchDependency as inside a Slicer with a main window, not in testing mode (unless overridden)."""
    return TorchDependency(pyTorchUtilsModule=utils, insideSlicer=True,
                           confirm=lambda question: questions.append(question) or answer,
                           **{"testingMode": False, "canAsk": True, **options})


def test_inside_slicer_with_torch_installed_asks_nothing_and_does_not_import_torch(monkeypatch):
    # Installed (package metadata): neither PyTorchUtils (whose torchInstalled() imports torch) nor torch is used.
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: (2, 13, 0))
    TorchDependency(pyTorchUtilsModule=types.SimpleNamespace(), insideSlicer=True,
                    confirm=lambda q: pytest.fail("must not ask"))()


def test_inside_slicer_installs_through_pytorchutils_after_asking_once(torchMissing):
    utils = _fakePyTorchUtils(installed=False)
    utils.PyTorchUtilsLogic.installTorch = lambda self, **kwargs: (
        type(self).calls.append(kwargs), torchMissing.update(installed=True))[0] or "torch-module"
    questions = []
    _insideSlicer(utils, questions)()
    assert len(questions) == 1 and "PyTorch" in questions[0] and "restart" not in questions[0]
    assert utils.PyTorchUtilsLogic.calls == [{"askConfirmation": False,
                                              "torchVersionRequirement": dependencies.TORCH_VERSION_REQUIREMENT}]


def test_torch_floor_suits_numpy_2_of_slicer_5_10():
    # Slicer 5.10 ships NumPy 2 and Python 3.12: torch 2.3 is the first release built for NumPy 2.
    assert dependencies.MINIMUM_TORCH_VERSION == (2, 3) and dependencies.TORCH_VERSION_REQUIREMENT == ">=2.3"
    pyproject = open(os.path.join(runner.moduleFolder(), "..", "pyproject.toml"), encoding="utf-8").read()
    assert '"torch>=2.3"' in pyproject


def test_inside_slicer_declined_install_is_not_asked_again(torchMissing):
    utils = _fakePyTorchUtils(installed=False)
    questions = []
    dependency = _insideSlicer(utils, questions, answer=False)
    with pytest.raises(MissingDependencyError, match="declined"):
        dependency()
    with pytest.raises(MissingDependencyError, match="declined"):
        dependency()
    assert len(questions) == 1 and utils.PyTorchUtilsLogic.calls == []


def test_inside_slicer_failed_install_points_to_pytorch_util(torchMissing):
    utils = _fakePyTorchUtils(installed=False, installResult=None)
    with pytest.raises(MissingDependencyError, match="PyTorch Util module"):
        _insideSlicer(utils, [])()


def test_inside_slicer_install_error_is_a_clear_message(torchMissing):
    def failingInstall(self, **kwargs):
        raise subprocess.CalledProcessError(1, ["light-the-torch", "install"])

    utils = _fakePyTorchUtils(installed=False)
    utils.PyTorchUtilsLogic.installTorch = failingInstall
    with pytest.raises(MissingDependencyError, match="could not be installed.*PyTorch Util.*light-the-torch"):
        _insideSlicer(utils, [])()


def test_testing_mode_never_installs_anything(torchMissing, monkeypatch):
    """ctest and the extensions factory run Slicer with --testing, where the install question would be
    answered OK by itself (slicer.util._messageDisplay returns testingReturnValue)."""
    utils = _fakePyTorchUtils(installed=False)
    application = types.SimpleNamespace(slicerHome="/opt/Slicer", testingEnabled=lambda: True)
    monkeypatch.setattr(sys.modules["slicer"], "app", application, raising=False)
    dependency = TorchDependency(pyTorchUtilsModule=utils, confirm=lambda q: pytest.fail("must not ask"))
    assert dependency.insideSlicer
    with pytest.raises(dependencies.TorchNotInstalledInTestingMode, match="testing mode.*never installs"):
        dependency()
    assert utils.PyTorchUtilsLogic.calls == [] and not torchMissing["installed"]


def test_without_a_main_window_nothing_is_asked(torchMissing, monkeypatch):
    utils = _fakePyTorchUtils(installed=False)
    application = types.SimpleNamespace(slicerHome="/opt/Slicer", testingEnabled=lambda: False)
    monkeypatch.setattr(sys.modules["slicer"], "app", application, raising=False)
    monkeypatch.setattr(sys.modules["slicer"].util, "mainWindow", lambda: None, raising=False)
    with pytest.raises(MissingDependencyError, match="no main window.*PyTorch Util"):
        TorchDependency(pyTorchUtilsModule=utils, confirm=lambda q: pytest.fail("must not ask"))()
    assert utils.PyTorchUtilsLogic.calls == []


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
from DeepGMMSegmentLib.slicer_adapter.dependencies import MissingDependencyError, TorchDependency
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


# ---------------------------------------------------------------------------------------------
# Launch, progress throttling, orphans, device query (audit R1, R2, R3, R4, R12)


def test_missing_python_executable_is_a_clear_error(monkeypatch, tmp_path):
    # Inside Slicer, sys.executable is "" when PythonSlicer was not found next to Slicer.
    monkeypatch.setattr(sys, "executable", "")
    monkeypatch.setattr(runner.shutil, "which", lambda name: None)
    job = runner.SegmentationJob([np.zeros((2, 3, 3), np.float32)], None, 2, "em-gmm")
    with pytest.raises(runner.WorkerError, match="no Python executable found.*PythonSlicer"):
        job.start()
    assert job.jobFolder is None  # nothing written
    monkeypatch.setattr(runner.shutil, "which", lambda name: "/usr/bin/true" if name == "PythonSlicer" else None)
    assert runner.workerPython() == "/usr/bin/true"


def test_cancel_on_windows_hides_the_taskkill_console(monkeypatch):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    calls = []
    monkeypatch.setattr(runner.os, "name", "nt")
    monkeypatch.setattr(runner.subprocess, "run", lambda command, **options: calls.append((command, options)))
    try:
        assert runner.killProcessTree(process, timeout=5.0)
    finally:
        process.kill()
    assert calls[0][0][:4] == ["taskkill", "/F", "/T", "/PID"]
    assert calls[0][1]["creationflags"] & runner.CREATE_NO_WINDOW


def test_progress_throttle_reports_first_last_and_ten_per_second():
    now = [0.0]
    throttle = worker.ProgressThrottle(0.1, clock=lambda: now[0])
    reported = []
    for iteration in range(1, 1001):  # 1000 iterations in 1 s: a fast EM fit
        now[0] = iteration / 1000
        if throttle.due(iteration, 1000):
            reported.append(iteration)
    assert reported[0] == 1 and reported[-1] == 1000
    assert 10 <= len(reported) <= 12


def test_fast_fit_sends_a_throttled_stream_of_progress_lines(tmp_path):
    channel = np.random.default_rng(0).normal(0, 1, (4, 16, 16)).astype(np.float32)
    job = runner.SegmentationJob([channel], None, 3, "em-gmm", device="cpu",
                                 options={"max_iter": 400, "tol": 0.0}, keepFiles=True)
    job.start()
    try:
        job.wait(timeout=120)
        updates = job.progressUpdates()
        result = job.result()
    finally:
        job.cleanup()
    fitting = [info for info in updates if info.stage == "fitting"]
    assert result.n_iter == 400 and fitting and fitting[-1].iteration == 400
    # One line per 0.1 s at most (plus first and last), not one per iteration.
    assert len(fitting) <= 2 + result.seconds / worker.PROGRESS_INTERVAL_SECONDS + 1
    assert len(fitting) < 400


_FAKE_SLICER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from DeepGMMSegmentLib.slicer_adapter.runner import SegmentationJob
job = SegmentationJob([np.random.default_rng(0).normal(0, 1, (4, 12, 12)).astype(np.float32)], None, 2, "deepsvg",
                      device="cpu", options={"max_iter": 100000, "tol": 0.0})
job.start()
while not any(info.stage == "fitting" and info.iteration > 0 for info in job.progressUpdates()):
    time.sleep(0.05)
print(json.dumps({"worker": job.worker.pid}), flush=True)
if sys.argv[2] == "crash":
    import os; os._exit(1)     # as a crashed Slicer: no atexit, no cleanup
sys.exit(0)                    # a normal exit with the run still going: atexit cancels it
"""


@pytest.mark.parametrize("how", ["crash", "exit"])
def test_worker_does_not_outlive_its_parent(how):
    parent = subprocess.run([sys.executable, "-c", _FAKE_SLICER, runner.moduleFolder(), how], capture_output=True,
                            text=True, timeout=180)
    workerPid = json.loads(parent.stdout.strip().splitlines()[-1])["worker"]
    deadline = time.monotonic() + 30
    while not _gone(workerPid):
        assert time.monotonic() < deadline, f"worker {workerPid} still runs after its parent ended ({how})"
        time.sleep(0.1)


def test_device_query_runs_in_a_worker_process():
    query = runner.DeviceQuery()
    query.start()
    assert query.worker.pid != os.getpid()
    deadline = time.monotonic() + 120
    while query.isRunning():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    facts = query.result()
    import torch

    assert facts["torchVersion"] == str(torch.__version__)
    assert facts["cudaAvailable"] == torch.cuda.is_available()
    assert len(facts["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


_DEVICE_LABEL_WITHOUT_TORCH = """
import sys, time
sys.modules["torch"] = None  # this process (the GUI) cannot import torch at all
from DeepGMMSegmentLib.slicer_adapter import panel
from DeepGMMSegmentLib.slicer_adapter.runner import DeviceQuery
query = DeviceQuery(); query.start()
while query.isRunning():
    time.sleep(0.05)
print(panel.describeComputeDevices(query.result()))
"""


def test_device_question_is_answered_without_torch_in_the_asking_process():
    completed = subprocess.run([sys.executable, "-c", _DEVICE_LABEL_WITHOUT_TORCH], capture_output=True, text=True,
                               timeout=180, env={**os.environ, "PYTHONPATH": runner.moduleFolder()})
    assert completed.returncode == 0, completed.stderr[-2000:]
    import torch

    expected = "GPU: cuda:0" if torch.cuda.is_available() else "No CUDA GPU found: Automatic runs on the CPU."
    assert completed.stdout.strip().startswith(expected)

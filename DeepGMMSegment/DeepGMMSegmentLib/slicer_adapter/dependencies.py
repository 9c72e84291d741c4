"""Make sure PyTorch can be imported by the worker.

Inside Slicer, torch comes from the PyTorch extension's ``PyTorchUtils`` module, which picks the
build that matches the GPU driver (or the CPU build). We ask once before installing, never
``pip install torch`` ourselves, and never touch Slicer's own numpy or SimpleITK. Outside Slicer
(plain Python, CI) we only check that torch is installed and say how to install it.

The check does not import torch into the calling process when it can avoid it (an installed
torch is found from its package metadata): the worker process is where torch runs, so CUDA is
never initialised inside Slicer's GUI process.

Two situations never show the install question (both end in :class:`MissingDependencyError`
with the fix): Slicer's testing mode (``--testing``, ctest, the extensions factory), where
``slicer.util.confirmOkCancelDisplay`` answers OK by itself and would download gigabytes
unattended; and a run without a main window (``--no-main-window --python-script``), where
nobody can answer a question.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from typing import Callable

#: Lowest torch release the engine supports (matches pyproject.toml). Slicer 5.10 ships NumPy 2
#: and Python 3.12: torch 2.2 is the first with Python 3.12 wheels but is built against NumPy 1
#: (its tensor <-> array conversion fails under NumPy 2); 2.3 is the first built for NumPy 2.
MINIMUM_TORCH_VERSION = (2, 3)
TORCH_VERSION_REQUIREMENT = ">=2.3"

INSTALL_QUESTION = (
    "DeepGMMSegment needs PyTorch, which is not installed yet.\n\n"
    "Install it now through the PyTorch extension? It downloads about 1-3 GB (more for GPU builds) "
    "and can take several minutes.")


class MissingDependencyError(RuntimeError):
    """A required package is missing; the message says how to install it."""


class TorchNotInstalledInTestingMode(MissingDependencyError):
    """Slicer runs in testing mode and torch is missing: nothing is installed (tests skip instead)."""


TESTING_MODE_TEXT = (
    "PyTorch is not installed and Slicer runs in testing mode (--testing), where DeepGMMSegment never installs "
    "anything (it would download several GB unattended). Install PyTorch with the PyTorch Util module first to "
    "run the parts that need it.")
NO_WINDOW_TEXT = (
    "PyTorch is not installed, and this Slicer has no main window to ask whether to install it (e.g. "
    "--no-main-window --python-script). Install PyTorch once: start Slicer with its window, open the PyTorch "
    "Util module and click Install (or click Segment in the DeepGMMSegment module), then run this again.")


def isSlicerApplication() -> bool:
    """True inside the Slicer application (not in plain Python with the ``slicer-core`` wheel)."""
    slicerModule = sys.modules.get("slicer")
    application = getattr(slicerModule, "app", None) if slicerModule is not None else None
    return application is not None and hasattr(application, "slicerHome")


def slicerTestingEnabled() -> bool:
    """True when the Slicer application runs in testing mode (``--testing``)."""
    application = getattr(sys.modules.get("slicer"), "app", None)
    return bool(application is not None and application.testingEnabled())


def slicerHasMainWindow() -> bool:
    """True when the Slicer application shows its main window (a question can be answered)."""
    import slicer.util  # Slicer application only

    return slicer.util.mainWindow() is not None


def installedTorchVersion() -> tuple[int, ...] | None:
    """The installed torch version as a tuple (e.g. (2, 13, 0)), or None when torch is missing."""
    importlib.invalidate_caches()  # torch may have been installed since the last look
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        text = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        text = getattr(sys.modules.get("torch"), "__version__", "0")
    numbers = re.findall(r"\d+", text.split("+")[0])[:3]
    return tuple(int(n) for n in numbers) if numbers else (0,)


def _versionText(version: tuple[int, ...]) -> str:
    return ".".join(str(n) for n in version)


class TorchDependency:
    """Checks (and inside Slicer offers to install) PyTorch. Call the instance before a run.

    Collaborators are injectable for tests: ``pyTorchUtilsModule`` (the PyTorch extension's
    ``PyTorchUtils`` module), ``confirm`` (a question -> bool callback; default: Slicer's
    OK/Cancel dialog), ``insideSlicer``, ``testingMode`` (default: ``slicer.app.testingEnabled()``)
    and ``canAsk`` (default: Slicer shows its main window).
    """

    def __init__(self, pyTorchUtilsModule=None, confirm: Callable[[str], bool] | None = None,
                 insideSlicer: bool | None = None, testingMode: bool | None = None, canAsk: bool | None = None):
        self._pyTorchUtilsModule = pyTorchUtilsModule
        self._confirm = confirm
        self._insideSlicer = insideSlicer
        self._testingMode = testingMode
        self._canAsk = canAsk
        self._installDeclined = False

    def __call__(self) -> None:
        self.ensureTorch()

    @property
    def insideSlicer(self) -> bool:
        return isSlicerApplication() if self._insideSlicer is None else self._insideSlicer

    def ensureTorch(self) -> None:
        """Return when torch is usable; otherwise install it (Slicer, after asking) or raise
        :class:`MissingDependencyError` with instructions."""
        if self.insideSlicer:
            self._ensureTorchInSlicer()
            return
        version = installedTorchVersion()
        if version is None:
            raise MissingDependencyError(
                f"PyTorch (torch) is not installed in this Python ({sys.executable}). Install it, e.g. the CPU "
                "build with: pip install torch --index-url https://download.pytorch.org/whl/cpu "
                "(for a GPU build see https://pytorch.org/get-started/locally/).")
        self._checkVersion(version, "pip install --upgrade torch")

    def _checkVersion(self, version: tuple[int, ...], howToUpgrade: str) -> None:
        if version < MINIMUM_TORCH_VERSION:
            raise MissingDependencyError(
                f"PyTorch {_versionText(version)} is too old; DeepGMMSegment needs torch "
                f"{TORCH_VERSION_REQUIREMENT}. Upgrade it ({howToUpgrade}).")

    def _pyTorchUtils(self):
        if self._pyTorchUtilsModule is not None:
            return self._pyTorchUtilsModule
        try:
            import PyTorchUtils
        except ImportError as error:
            raise MissingDependencyError(
                "DeepGMMSegment needs the 'PyTorch' extension to install PyTorch. Install 'PyTorch' from the "
                "Extensions Manager (View > Extensions Manager), restart Slicer, and try again.") from error
        return PyTorchUtils

    def _ensureTorchInSlicer(self) -> None:
        upgradeHint = "use the PyTorch Util module to install a newer version, then restart Slicer"
        version = installedTorchVersion()  # package metadata: torch is not imported here
        if version is not None:
            self._checkVersion(version, upgradeHint)
            return
        if self._testingMode if self._testingMode is not None else slicerTestingEnabled():
            raise TorchNotInstalledInTestingMode(TESTING_MODE_TEXT)
        if not (self._canAsk if self._canAsk is not None else slicerHasMainWindow()):
            raise MissingDependencyError(NO_WINDOW_TEXT)
        torchLogic = self._pyTorchUtils().PyTorchUtilsLogic()
        if self._installDeclined:
            raise MissingDependencyError(
                "PyTorch is not installed (installation was declined). Install it with the PyTorch Util "
                "module, or click Segment again after restarting Slicer to be asked again.")
        if not self._askConfirmation(INSTALL_QUESTION):
            self._installDeclined = True
            raise MissingDependencyError(
                "PyTorch is needed to segment; installation was declined. Install it later with the PyTorch "
                "Util module.")
        failure = ("PyTorch could not be installed. Open the PyTorch Util module to install it (pick the "
                   "computation backend there), restart Slicer, and try again.")
        try:
            # PyTorchUtils also installs torchvision (this module does not use it) through light-the-torch,
            # which picks the CUDA or CPU build for this computer.
            torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
        except Exception as error:  # subprocess.CalledProcessError from the pip run, network errors, ...
            raise MissingDependencyError(f"{failure} ({error})") from error
        if torch is None:
            raise MissingDependencyError(failure)
        self._checkVersion(installedTorchVersion() or (0,), upgradeHint)

    def _askConfirmation(self, question: str) -> bool:
        if self._confirm is not None:
            return bool(self._confirm(question))
        import slicer.util  # Slicer application only (needs Qt)

        return bool(slicer.util.confirmOkCancelDisplay(question, windowTitle="DeepGMMSegment"))

"""Make sure PyTorch can be imported by the worker.

Inside Slicer, torch comes from the PyTorch extension's ``PyTorchUtils`` module, which picks the
build that matches the GPU driver (or the CPU build). We ask once before installing, never
``pip install torch`` ourselves, and never touch Slicer's own numpy or SimpleITK. Outside Slicer
(plain Python, CI) we only check that torch is installed and say how to install it.

The check does not import torch into the calling process when it can avoid it: the worker
process is where torch runs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from typing import Callable

#: Lowest torch release the engine supports (matches pyproject.toml).
MINIMUM_TORCH_VERSION = (2, 1)
TORCH_VERSION_REQUIREMENT = ">=2.1"

INSTALL_QUESTION = (
    "DeepGMMSegment needs PyTorch, which is not installed yet.\n\n"
    "Install it now through the PyTorch extension? It downloads about 1-3 GB (more for GPU builds) "
    "and can take several minutes. Slicer may need a restart afterwards.")


class MissingDependencyError(RuntimeError):
    """A required package is missing; the message says how to install it."""


def isSlicerApplication() -> bool:
    """True inside the Slicer application (not in plain Python with the ``slicer-core`` wheel)."""
    slicerModule = sys.modules.get("slicer")
    application = getattr(slicerModule, "app", None) if slicerModule is not None else None
    return application is not None and hasattr(application, "slicerHome")


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
    OK/Cancel dialog) and ``insideSlicer``.
    """

    def __init__(self, pyTorchUtilsModule=None, confirm: Callable[[str], bool] | None = None,
                 insideSlicer: bool | None = None):
        self._pyTorchUtilsModule = pyTorchUtilsModule
        self._confirm = confirm
        self._insideSlicer = insideSlicer
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
        torchLogic = self._pyTorchUtils().PyTorchUtilsLogic()
        upgradeHint = "use the PyTorch Util module to install a newer version, then restart Slicer"
        if torchLogic.torchInstalled():
            self._checkVersion(installedTorchVersion() or (0,), upgradeHint)
            return
        if self._installDeclined:
            raise MissingDependencyError(
                "PyTorch is not installed (installation was declined). Install it with the PyTorch Util "
                "module, or click Segment again after restarting Slicer to be asked again.")
        if not self._askConfirmation(INSTALL_QUESTION):
            self._installDeclined = True
            raise MissingDependencyError(
                "PyTorch is needed to segment; installation was declined. Install it later with the PyTorch "
                "Util module.")
        torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
        if torch is None:
            raise MissingDependencyError(
                "PyTorch could not be installed. Open the PyTorch Util module to install it (pick the "
                "computation backend there), restart Slicer, and try again.")
        self._checkVersion(installedTorchVersion() or (0,), upgradeHint)

    def _askConfirmation(self, question: str) -> bool:
        if self._confirm is not None:
            return bool(self._confirm(question))
        import slicer.util  # Slicer application only (needs Qt)

        return bool(slicer.util.confirmOkCancelDisplay(question, windowTitle="DeepGMMSegment"))

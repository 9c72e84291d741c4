"""DeepGMMSegment engine: unsupervised tissue segmentation with deep and classic Gaussian mixtures.

The public names (``segment``, ``train``, ...) are loaded on first use, so importing a submodule
that does not need torch (``options``, ``result``, ``logic`` and the ``slicer_adapter`` package)
works in a Slicer whose PyTorch is not installed yet. This package never imports
``slicer``; the Slicer adapter modules are imported explicitly by the Slicer module.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "METHODS": "options",
    "SegmentationCancelled": "result",
    "SegmentationResult": "result",
    "segment": "engine",
    "train": "trained.training",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

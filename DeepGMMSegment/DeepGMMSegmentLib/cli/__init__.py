"""The console commands and their files on disk (argparse, SimpleITK); never imported by the Slicer adapter.

``deepgmm-segment`` is :mod:`.segment` (with its trained-model mode :mod:`.segment_model`),
``deepgmm-train`` is :mod:`.train`. ``main`` is re-exported so the entry point
``DeepGMMSegmentLib.cli:main`` of earlier installs still resolves.
"""

from .segment import main

__all__ = ["main"]

"""DeepGMMSegment engine: unsupervised tissue segmentation with deep and classic Gaussian mixtures.

This package's top level imports only numpy and torch; the Slicer adapter modules
(``mrml_io``, ``logic``, ``runner``, ``worker``) are imported explicitly by the Slicer module.
"""

from .engine import METHODS, SegmentationCancelled, SegmentationResult, segment
from .training import train

__version__ = "0.1.0"

__all__ = ["METHODS", "SegmentationCancelled", "SegmentationResult", "segment", "train", "__version__"]

"""``python -m DeepGMMSegmentLib.cli``: the same as ``deepgmm-segment``."""

import sys

from .segment import main

sys.exit(main())

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Import the package from the source tree even without `pip install -e .`.
sys.path.insert(0, str(HERE.parents[2] / "DeepGMMSegment"))

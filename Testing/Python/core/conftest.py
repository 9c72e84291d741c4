import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))
# Import the package from the source tree even without `pip install -e .`.
sys.path.insert(0, str(REPO / "DeepGMMSegment"))
# benchmarks/ and evaluation/ are scripts' folders, not installed packages: the stress tests share
# the benchmark's case generator and scoring (appended, so they never shadow the package).
for folder in (REPO / "benchmarks", REPO):
    if str(folder) not in sys.path:
        sys.path.append(str(folder))

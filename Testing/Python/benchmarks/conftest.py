import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# benchmarks/ and evaluation/ are scripts' folders, not installed packages
for folder in (REPO, REPO / "benchmarks", REPO / "DeepGMMSegment"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

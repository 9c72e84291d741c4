"""Run one method on one case in this (fresh) process and measure it.

    python -m evaluation.worker CASE.npz METHOD RESULT.npz [--seed S] [--fast-seconds T]

Memory: ``ru_maxrss`` after the run minus ``ru_maxrss`` after the imports and the input are
loaded, i.e. the extra peak resident memory the method needed.  Time: wall clock of the
method call; when the first run takes less than ``--fast-seconds`` it is repeated twice more
and the median is reported (the slow ones run once, and the report says so).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import methods  # noqa: E402


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", type=Path)
    parser.add_argument("method", choices=sorted(methods.SPECS))
    parser.add_argument("result", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-classes", type=int, default=3)
    parser.add_argument("--fast-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)

    with np.load(args.case) as stored:
        channels = stored["channels"]
        mask = stored["mask"]
        spacing = tuple(float(s) for s in stored["spacing"])
    methods.prepare(args.method)
    baseline_mb = _max_rss_mb()

    times, outputs = [], []
    while True:
        start = time.perf_counter()
        output = methods.run(args.method, channels, mask, spacing, args.n_classes, args.seed)
        times.append(time.perf_counter() - start)
        outputs.append(output)
        if len(times) == 3 or times[0] >= args.fast_seconds:
            break
    peak_mb = _max_rss_mb() - baseline_mb

    final = outputs[-1]
    summary = {
        "method": args.method,
        "seconds": float(np.median(times)),
        "all_seconds": times,
        "runs": len(times),
        "peak_mb": peak_mb,
        "baseline_mb": baseline_mb,
        "nll": final.nll,
        "nll_note": final.nll_note,
        "n_iter": final.n_iter,
        "converged": final.converged,
        "repeatable": all(np.array_equal(o.labels, final.labels) for o in outputs),
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.result, labels=final.labels)
    args.result.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run one method on one case in this (fresh) process and measure it.

    python -m evaluation.worker CASE.npz METHOD RESULT.npz [--seed S] [--fast-seconds T]

Memory: the extra peak resident memory the method needed: peak RSS after the runs minus the
RSS once the imports and the input are loaded.  On Linux the peak (``VmHWM``, what
``ru_maxrss`` reports) is first reset through ``/proc/self/clear_refs`` so that a transient
peak during the imports cannot hide the method's own; elsewhere ``ru_maxrss`` is used as is.  Time: wall clock of the
method call; when the first run takes less than ``--fast-seconds`` it is repeated twice more
and the median is reported (the slow ones run once, and the report says so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import methods  # noqa: E402

# A first run shorter than this is repeated twice more and the median reported: a scheduler hiccup
# matters most to the fastest methods. From 10 s down to 3 s (engine ea19981): the repeats of the
# runs of 3-10 s were 6.7 of the 57 job-minutes of make evaluate. From 3 s down to 1 s (engine
# b594d2a's run): the repeats of the runs of 1-3 s were 1.2 of its 28.9 job-minutes.
FAST_SECONDS = 1.0


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _start_memory_baseline() -> tuple[float, str]:
    """(baseline MB, how the peak will be read): reset the peak to the current RSS if possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS (Linux >= 4.0)
        current, peak = _status_mb("VmRSS"), _status_mb("VmHWM")
        if current is not None and peak is not None and peak <= current * 1.05 + 1:
            return current, "VmHWM"
    except OSError:
        pass
    return _max_rss_mb(), "ru_maxrss"


def _peak_mb(how: str) -> float:
    return _status_mb("VmHWM") if how == "VmHWM" else _max_rss_mb()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", type=Path)
    parser.add_argument("method", choices=sorted(methods.SPECS))
    parser.add_argument("result", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-classes", type=int, default=3)
    parser.add_argument("--fast-seconds", type=float, default=FAST_SECONDS)
    parser.add_argument("--options", type=json.loads, default={},
                        help="JSON object of segment() options for our methods, e.g. '{\"max_iter\": 10}'")
    args = parser.parse_args(argv)

    with np.load(args.case) as stored:
        channels = stored["channels"]
        mask = stored["mask"]
        spacing = tuple(float(s) for s in stored["spacing"])
    methods.prepare(args.method)
    engine = None
    if args.method in methods.ALL_OURS:
        engine = methods.engine_revision()  # the engine may change between jobs
    baseline_mb, peak_source = _start_memory_baseline()

    load_at_start = os.getloadavg()[0]
    times, cpu_times, outputs = [], [], []
    while True:
        start, cpu_start = time.perf_counter(), time.process_time()
        output = methods.run(args.method, channels, mask, spacing, args.n_classes, args.seed, **args.options)
        times.append(time.perf_counter() - start)
        # CPU time of all this process's threads: less sensitive to other load on the machine
        cpu_times.append(time.process_time() - cpu_start)
        outputs.append(output)
        if len(times) == 3 or times[0] >= args.fast_seconds:
            break
    peak_mb = _peak_mb(peak_source) - baseline_mb

    final = outputs[-1]
    summary = {
        "method": args.method,
        "options": args.options,
        "engine": engine,
        "seconds": float(np.median(times)),
        "all_seconds": times,
        "cpu_seconds": float(np.median(cpu_times)),
        "runs": len(times),
        "load_at_start": load_at_start,
        "peak_mb": peak_mb,
        "baseline_mb": baseline_mb,
        "peak_source": peak_source,
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

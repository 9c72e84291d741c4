"""``deepgmm-segment --model MODEL``: segment one case or a whole cohort with a trained model.

Single case: ``deepgmm-segment --model brain.pt t1.nii.gz [t2.nii.gz ...] [--mask m.nii.gz] -o labels.nii.gz``.
Cohort (batch): ``deepgmm-segment --model brain.pt COHORT -o OUTDIR`` where COHORT is a folder or
CSV of cases (layouts in :mod:`.cohort`). For every case it writes ``OUTDIR/<case>_labels.nii.gz``
(and ``<case>_probabilities.nii.gz`` with ``--probabilities``), prints one line per case, skips
cases whose outputs exist (so an interrupted run resumes where it stopped), continues past a case
that fails with the error for that case, and exits 1 if any case failed. Every output is written
to a temporary file and renamed into place, so an existing output is always complete.
``--workers N`` segments N cases at once in separate processes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

import numpy as np

from . import images
from .common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, print_error, set_threads

PROG = "deepgmm-segment"
EXIT_FAILED = 1  # some case failed (the others were segmented)
LOG_NAME = "deepgmm-batch-log.tsv"


def wants_model_mode(argv: Sequence[str]) -> bool:
    """True when a ``deepgmm-segment`` command line uses a trained model (``--model``)."""
    return any(a == "--model" or a.startswith("--model=") for a in argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} --model",
        description="Segment one case, or a folder / CSV of cases (batch), with a model trained by deepgmm-train: "
                    "one forward pass per case (optionally a few per-image fine-tuning steps).",
        epilog="Cohort layouts: a CSV with a header (case,<channel>...,mask), a folder of case folders "
               "(<case>/<channel>.nii.gz + mask.nii.gz), or a flat folder (<case>.nii.gz + <case>_mask.nii.gz). "
               "Exit status: 0 all cases done or skipped, 1 some case failed, 2 bad options or model.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="a cohort folder or CSV (batch), or the channel images of one case")
    parser.add_argument("--model", required=True, metavar="MODEL", help="model file written by deepgmm-train")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="batch: output folder; single case: label map file")
    parser.add_argument("--mask", metavar="MASK", help="single case: mask image")
    parser.add_argument("-p", "--probabilities", nargs="?", const=True, default=None, metavar="PROBS",
                        help="also write class probabilities (batch: flag; single case: file name)")
    parser.add_argument("-k", "--classes", type=int, metavar="K",
                        help="number of classes; optional, must equal the model's")
    parser.add_argument("--fine-tune", type=int, default=0, metavar="N",
                        help="per-image optimisation steps after the forward pass (default 0)")
    parser.add_argument("--channels", metavar="NAMES",
                        help="comma-separated channel names to pick in case folders (default: the model's)")
    parser.add_argument("--mask-name", default="mask", help="file name (stem) of masks in a cohort (default: mask)")
    parser.add_argument("--overwrite", action="store_true", help="segment cases whose outputs already exist")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="cases segmented at once, each in its own process (default 1)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of fine-tuning (default 0)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads per process")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors and failed cases")
    return parser


@dataclass
class CaseOutcome:
    case_id: str
    status: str  # "done" | "skipped" | "failed"
    seconds: float = 0.0
    message: str = ""
    outputs: list[str] = field(default_factory=list)


@dataclass
class BatchSummary:
    outcomes: list[CaseOutcome]

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def output_paths(output_dir: str | os.PathLike, case_id: str, probabilities: bool) -> list[Path]:
    out = [Path(output_dir) / f"{case_id}_labels.nii.gz"]
    if probabilities:
        out.append(Path(output_dir) / f"{case_id}_probabilities.nii.gz")
    return out


def segment_case(case, model: str, outputs: Sequence[Path], fine_tune: int = 0, device: str = "auto",
                 seed: int = 0, n_classes: int | None = None) -> CaseOutcome:
    """Read, check, segment and write one case (:class:`.cohort.CaseFiles`); raises on failure."""
    from .. import segment
    from ..trained import model_file
    from .cohort import load_case
    from ..trained.inference import load_trained_model

    start = time.perf_counter()
    _, meta = load_trained_model(model)
    loaded = load_case(case)
    model_file.check_compatible(meta, len(loaded.channels), loaded.channels[0].ndim, n_classes=n_classes)
    result = segment(loaded.channels, int(meta["n_classes"]), method=meta["method"], mask=loaded.mask,
                     spacing=loaded.spacing, device=device, seed=seed, model=str(model), fine_tune=int(fine_tune),
                     covariance_type=meta.get("covariance_type", "full"))
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    with images.StagedOutputs() as staging:
        if len(outputs) > 1:  # probabilities first: the label map's existence marks a finished case
            images.write_image(images.probability_image(result.probabilities, loaded.reference),
                               staging.path_for(str(outputs[1])), "probabilities")
        images.write_image(images.label_image(result.labels, loaded.reference), staging.path_for(str(outputs[0])),
                           "label map")
    counts = np.bincount(result.labels.ravel(), minlength=result.n_classes + 1)[1:]
    names = [f"{name} " for name in result.class_names] if result.class_names else [""] * len(counts)
    shares = " ".join(f"{name}{100 * c / max(counts.sum(), 1):.0f}%" for name, c in zip(names, counts))
    return CaseOutcome(case.case_id, "done", time.perf_counter() - start, f"classes {shares}",
                       [str(p) for p in outputs])


def _worker_init(threads: int | None) -> None:
    set_threads(threads)


def _run_one(case, model, outputs, fine_tune, device, seed, n_classes) -> CaseOutcome:
    try:
        return segment_case(case, model, outputs, fine_tune, device, seed, n_classes)
    except Exception as error:  # one bad case must not stop the cohort
        message = " ".join(str(error).split()) or type(error).__name__
        return CaseOutcome(case.case_id, "failed", 0.0, f"{type(error).__name__}: {message}")


def run_batch(cases, output_dir: str | os.PathLike, model: str, *, fine_tune: int = 0, probabilities: bool = False,
              overwrite: bool = False, workers: int = 1, threads: int | None = None, device: str = "auto",
              seed: int = 0, n_classes: int | None = None,
              say: Callable[[str], None] = print, say_error: Callable[[str], None] | None = None) -> BatchSummary:
    """Segment every case, skipping finished ones; never stops at a failed case. Logs to ``LOG_NAME``."""
    say_error = say_error or say
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    total = len(cases)
    outcomes: list[CaseOutcome] = []
    log_path = output_dir / LOG_NAME

    def record(outcome: CaseOutcome) -> None:
        outcomes.append(outcome)
        n = len(outcomes)
        if outcome.status == "done":
            say(f"[{n}/{total}] {outcome.case_id}: done in {outcome.seconds:.1f} s ({outcome.message}) -> "
                f"{outcome.outputs[0]}")
        elif outcome.status == "skipped":
            say(f"[{n}/{total}] {outcome.case_id}: skipped ({outcome.message})")
        else:
            say_error(f"[{n}/{total}] {outcome.case_id}: FAILED: {outcome.message}")
        new = not log_path.exists()
        with open(log_path, "a", encoding="utf-8") as stream:
            if new:
                stream.write("time\tcase\tstatus\tseconds\tmessage\n")
            stream.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{outcome.case_id}\t{outcome.status}\t"
                         f"{outcome.seconds:.2f}\t{outcome.message}\n")

    todo = []
    for case in cases:
        outputs = output_paths(output_dir, case.case_id, probabilities)
        if not overwrite and all(p.exists() for p in outputs):
            record(CaseOutcome(case.case_id, "skipped", message=f"{outputs[0].name} exists"))
        else:
            todo.append((case, model, outputs, fine_tune, device, seed, n_classes))
    if workers <= 1 or len(todo) <= 1:
        _worker_init(threads)
        for job in todo:
            record(_run_one(*job))
    else:
        # spawn: a fresh interpreter per worker (torch and fork do not mix well).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                                                    initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_one, *job): job[0].case_id for job in todo}
            for future in concurrent.futures.as_completed(futures):
                try:
                    record(future.result())
                except Exception as error:  # the worker process died (e.g. out of memory)
                    record(CaseOutcome(futures[future], "failed", 0.0, f"worker process failed: {error}"))
    return BatchSummary(outcomes)


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``deepgmm-segment --model ...``; returns the exit status."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)

    def error(message: str) -> int:
        return print_error(PROG, message, stderr)

    from ..trained import model_file
    from .cohort import CaseFiles, discover_cases

    if args.fine_tune < 0 or args.workers < 1:
        return error("--fine-tune must be >= 0 and --workers >= 1")
    try:
        info = model_file.describe_model(args.model)
    except ValueError as exc:
        return error(str(exc))
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=stdout, flush=True))
    say_error = lambda text: print(text, file=stderr, flush=True)  # noqa: E731
    first = Path(args.inputs[0])
    batch = len(args.inputs) == 1 and (first.is_dir() or first.suffix.lower() == ".csv")
    try:
        if batch:
            if args.mask:
                return error("--mask is for a single case; in a cohort give masks per case (mask column or mask files)")
            names = args.channels.split(",") if args.channels else None
            if names is None and first.is_dir():
                names = [n for n in info["channel_names"] if not model_file.is_generic_channel_names([n])] or None
            cases, _ = discover_cases(first, names, args.mask_name)
            if not cases:
                return error(f"no cases found in {str(first)!r}")
            say(f"{PROG}: {len(cases)} case(s) from {first}, model {args.model} "
                f"({info['n_classes']} classes, channels {', '.join(info['channel_names'])})")
            summary = run_batch(cases, args.output, args.model, fine_tune=args.fine_tune,
                                probabilities=bool(args.probabilities), overwrite=args.overwrite,
                                workers=args.workers, threads=args.threads, device=args.device, seed=args.seed,
                                n_classes=args.classes, say=say, say_error=say_error)
            say(f"{PROG}: {summary.count('done')} done, {summary.count('skipped')} skipped, "
                f"{summary.count('failed')} failed; log: {Path(args.output) / LOG_NAME}")
            return EXIT_FAILED if summary.failed else EXIT_OK
        case = CaseFiles(Path(args.output).name, list(args.inputs), args.mask)
        outputs = [Path(args.output)]
        if isinstance(args.probabilities, str):
            outputs.append(Path(args.probabilities))
        elif args.probabilities:
            return error("for a single case give the probability file name: -p PROBS")
        _worker_init(args.threads)
        outcome = segment_case(case, args.model, outputs, args.fine_tune, args.device, args.seed, args.classes)
        say(f"{PROG}: done in {outcome.seconds:.1f} s ({outcome.message}); wrote {', '.join(outcome.outputs)}")
        return EXIT_OK
    except ValueError as exc:
        return error(str(exc))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""``deepgmm-segment --model MODEL``: segment one case or a whole cohort with a trained model.

Single case: ``deepgmm-segment --model brain.pt t1.nii.gz [t2.nii.gz ...] [--mask m.nii.gz] -o labels.nii.gz``.
Cohort (batch): ``deepgmm-segment --model brain.pt COHORT -o OUTDIR`` where COHORT is a folder or
CSV of cases (layouts in :mod:`.cohort`). For every case it writes ``OUTDIR/<case>_labels.nii.gz``
(and ``<case>_probabilities.nii.gz`` with ``--probabilities``, ``<case>_bias_field.nii.gz`` /
``<case>_corrected.nii.gz`` with ``--bias-field`` / ``--corrected``), prints one line per case,
skips cases whose outputs exist (so an interrupted run resumes where it stopped), continues past a
case that fails with the error for that case, and exits 1 if any case failed. Every output is
written to a temporary file and renamed into place, so an existing output is always complete.
``--workers N`` segments N cases at once in separate processes.

The bias field (``--bias-field-order``) is the per-image one of docs/bias-field.md: the engine
estimates it jointly with a Gaussian mixture of the model's K classes, then the trained network
segments the corrected image.
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
from typing import Any, Callable, Iterator, Sequence, TextIO

import numpy as np

from . import images
from .common import (EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, add_bias_field_options,  # noqa: F401
                     add_shared_options, bias_field_option, print_error, set_threads)

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
    add_bias_field_options(parser, cohort=True)
    add_shared_options(parser, classes=dict(help="number of classes; optional, must equal the model's"))
    parser.add_argument("--fine-tune", type=int, default=0, metavar="N",
                        help="per-image optimisation steps after the forward pass (default 0)")
    add_shared_options(parser, "label_mrf")
    add_shared_options(parser, "channels", "mask_name", channels=dict(
        help="comma-separated channel names to pick in case folders (default: the model's)"))
    parser.add_argument("--overwrite", action="store_true", help="segment cases whose outputs already exist")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="cases segmented at once, each in its own process (default 1)")
    add_shared_options(parser, "device", "seed", "threads", "quiet")
    return parser


@dataclass(frozen=True)
class ModelRequest:
    """What every case of a ``--model`` run asks of the engine (crosses to the worker processes)."""

    model: str
    fine_tune: int = 0
    device: str = "auto"
    seed: int = 0
    n_classes: int | None = None  # None: the model's; otherwise it must equal the model's
    bias_field: str | int | None = None  # the engine's bias_field option; None: its default
    label_mrf: float | str | None = None  # the engine's label_mrf option; None: its default


@dataclass(frozen=True)
class CohortOutputs:
    """The files every case of a cohort gets in the output folder."""

    folder: Path
    probabilities: bool = False
    bias_field: bool = False
    corrected: bool = False

    def files(self, case_id: str) -> images.ResultFiles:
        def path(kind: str, wanted: bool = True) -> str | None:
            return str(self.folder / f"{case_id}_{kind}.nii.gz") if wanted else None

        return images.ResultFiles(path("labels"), path("probabilities", self.probabilities),
                                  path("bias_field", self.bias_field), path("corrected", self.corrected))


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


def segment_case(case, request: ModelRequest, files: images.ResultFiles) -> CaseOutcome:
    """Read, check, segment and write one case (:class:`.cohort.CaseFiles`); raises on failure."""
    from .. import segment
    from ..trained import model_file
    from .cohort import load_case
    from ..trained.inference import load_trained_model

    start = time.perf_counter()
    _, meta = load_trained_model(request.model)
    loaded = load_case(case)
    model_file.check_compatible(meta, len(loaded.channels), loaded.channels[0].ndim, n_classes=request.n_classes)
    extra = {} if request.bias_field is None else {"bias_field": request.bias_field}
    if request.label_mrf is not None:
        extra["label_mrf"] = request.label_mrf
    result = segment(loaded.channels, int(meta["n_classes"]), method=meta["method"], mask=loaded.mask,
                     spacing=loaded.spacing, device=request.device, seed=request.seed, model=str(request.model),
                     fine_tune=int(request.fine_tune), covariance_type=meta.get("covariance_type", "full"), **extra)
    for path in files.paths():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with images.StagedOutputs() as staging:
        images.write_result(result, loaded.reference, files, staging, loaded.channels)
    counts = np.bincount(result.labels.ravel(), minlength=result.n_classes + 1)[1:]
    names = [f"{name} " for name in result.class_names] if result.class_names else [""] * len(counts)
    shares = " ".join(f"{name}{100 * c / max(counts.sum(), 1):.0f}%" for name, c in zip(names, counts))
    return CaseOutcome(case.case_id, "done", time.perf_counter() - start, f"classes {shares}", files.paths())


def _worker_init(threads: int | None) -> None:
    set_threads(threads)


def _run_one(case, request: ModelRequest, files: images.ResultFiles) -> CaseOutcome:
    try:
        return segment_case(case, request, files)
    except Exception as error:  # one bad case must not stop the cohort
        message = " ".join(str(error).split()) or type(error).__name__
        return CaseOutcome(case.case_id, "failed", 0.0, f"{type(error).__name__}: {message}")


class _BatchLog:
    """One line per case on the console and in ``LOG_NAME`` (tab-separated) in the output folder."""

    def __init__(self, path: Path, total: int, say: Callable[[str], None], say_error: Callable[[str], None]):
        self.path, self.total, self.say, self.say_error = path, total, say, say_error
        self.outcomes: list[CaseOutcome] = []

    def record(self, outcome: CaseOutcome) -> None:
        self.outcomes.append(outcome)
        where = f"[{len(self.outcomes)}/{self.total}] {outcome.case_id}"
        if outcome.status == "done":
            self.say(f"{where}: done in {outcome.seconds:.1f} s ({outcome.message}) -> {outcome.outputs[0]}")
        elif outcome.status == "skipped":
            self.say(f"{where}: skipped ({outcome.message})")
        else:
            self.say_error(f"{where}: FAILED: {outcome.message}")
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as stream:
            if new:
                stream.write("time\tcase\tstatus\tseconds\tmessage\n")
            stream.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{outcome.case_id}\t{outcome.status}\t"
                         f"{outcome.seconds:.2f}\t{outcome.message}\n")


def _outcomes(jobs: list, request: ModelRequest, workers: int, threads: int | None) -> Iterator[CaseOutcome]:
    """Run the (case, files) jobs, in this process or in ``workers`` processes; outcomes as they finish."""
    if workers <= 1 or len(jobs) <= 1:
        _worker_init(threads)
        for case, files in jobs:
            yield _run_one(case, request, files)
        return
    # spawn: a fresh interpreter per worker (torch and fork do not mix well).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                                                initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_one, case, request, files): case.case_id for case, files in jobs}
        for future in concurrent.futures.as_completed(futures):
            try:
                yield future.result()
            except Exception as error:  # the worker process died (e.g. out of memory)
                yield CaseOutcome(futures[future], "failed", 0.0, f"worker process failed: {error}")


def run_batch(cases, output_dir: str | os.PathLike, model: str, *, probabilities: bool = False,
              bias_field_files: bool = False, corrected_files: bool = False, overwrite: bool = False,
              workers: int = 1, threads: int | None = None, say: Callable[[str], None] = print,
              say_error: Callable[[str], None] | None = None, **request: Any) -> BatchSummary:
    """Segment every case, skipping finished ones; never stops at a failed case. Logs to ``LOG_NAME``.

    ``request``: the other fields of :class:`ModelRequest` (``fine_tune``, ``device``, ``seed``,
    ``n_classes``, ``bias_field``).
    """
    outputs = CohortOutputs(Path(output_dir), probabilities, bias_field_files, corrected_files)
    outputs.folder.mkdir(parents=True, exist_ok=True)
    log = _BatchLog(outputs.folder / LOG_NAME, len(cases), say, say_error or say)
    jobs = []
    for case in cases:
        files = outputs.files(case.case_id)
        if not overwrite and all(Path(p).exists() for p in files.paths()):
            log.record(CaseOutcome(case.case_id, "skipped", message=f"{Path(files.labels).name} exists"))
        else:
            jobs.append((case, files))
    for outcome in _outcomes(jobs, ModelRequest(str(model), **request), workers, threads):
        log.record(outcome)
    return BatchSummary(log.outcomes)


def _request(args: argparse.Namespace) -> ModelRequest:
    """The engine request of a parsed command line; ``CliError`` for a bad value."""
    if args.fine_tune < 0 or args.workers < 1:
        raise CliError("--fine-tune must be >= 0 and --workers >= 1")
    return ModelRequest(args.model, args.fine_tune, args.device, args.seed, args.classes, bias_field_option(args),
                        args.label_mrf)


def _run_cohort(args, request: ModelRequest, info: dict, say, say_error) -> int:
    from ..trained import model_file
    from .cohort import discover_cases

    folder = Path(args.inputs[0])
    if args.mask:
        raise CliError("--mask is for a single case; in a cohort give masks per case (mask column or mask files)")
    for option, value in (("--bias-field", args.bias_field), ("--corrected", args.corrected)):
        if isinstance(value, str):
            raise CliError(f"in a cohort {option} is a flag (each case gets its own file in the output folder); "
                           f"drop the file name '{value}'")
    names = args.channels.split(",") if args.channels else None
    if names is None and folder.is_dir():
        names = [n for n in info["channel_names"] if not model_file.is_generic_channel_names([n])] or None
    cases, _ = discover_cases(folder, names, args.mask_name)
    if not cases:
        raise CliError(f"no cases found in {str(folder)!r}")
    say(f"{PROG}: {len(cases)} case(s) from {folder}, model {args.model} "
        f"({info['n_classes']} classes, channels {', '.join(info['channel_names'])})")
    summary = run_batch(cases, args.output, args.model, probabilities=bool(args.probabilities),
                        bias_field_files=bool(args.bias_field), corrected_files=bool(args.corrected),
                        overwrite=args.overwrite, workers=args.workers, threads=args.threads, say=say,
                        say_error=say_error, fine_tune=request.fine_tune, device=request.device, seed=request.seed,
                        n_classes=request.n_classes, bias_field=request.bias_field)
    say(f"{PROG}: {summary.count('done')} done, {summary.count('skipped')} skipped, "
        f"{summary.count('failed')} failed; log: {Path(args.output) / LOG_NAME}")
    return EXIT_FAILED if summary.failed else EXIT_OK


def _run_single_case(args, request: ModelRequest, say) -> int:
    from .cohort import CaseFiles

    files = images.ResultFiles(args.output, args.probabilities, args.bias_field, args.corrected)
    for option, value, metavar in (("-p", args.probabilities, "PROBS"), ("--bias-field", args.bias_field, "FIELD"),
                                   ("--corrected", args.corrected, "IMAGE")):
        if value is True:
            raise CliError(f"for a single case give the file name: {option} {metavar}")
    images.check_output_paths([*args.inputs, *([args.mask] if args.mask else [])],
                              [(option, path) for option, path in (
                                  ("--output", files.labels), ("--probabilities", files.probabilities),
                                  ("--bias-field", files.bias_field), ("--corrected", files.corrected)) if path])
    _worker_init(args.threads)
    outcome = segment_case(CaseFiles(Path(args.output).name, list(args.inputs), args.mask), request, files)
    say(f"{PROG}: done in {outcome.seconds:.1f} s ({outcome.message}); wrote {', '.join(outcome.outputs)}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``deepgmm-segment --model ...``; returns the exit status."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)
    from ..trained import model_file

    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=stdout, flush=True))
    say_error = lambda text: print(text, file=stderr, flush=True)  # noqa: E731
    first = Path(args.inputs[0])
    try:
        request = _request(args)
        info = model_file.describe_model(args.model)
        if len(args.inputs) == 1 and (first.is_dir() or first.suffix.lower() == ".csv"):
            return _run_cohort(args, request, info, say, say_error)
        return _run_single_case(args, request, say)
    except ValueError as error:
        return print_error(PROG, str(error), stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

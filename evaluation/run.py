"""``make evaluate``: every method on every case, each in a process of its own, then the report.

    python -m evaluation.run            # full run -> docs/evaluation.md, docs/images/evaluation-*.png
    python -m evaluation.run --quick    # smoke run (2 mm, two conditions) -> out/evaluation-quick/
    python -m evaluation.run --cardiac-only   # only the cardiac section again, into the same page

What runs where (the full plan) is in :func:`build_plan`; the report states it too. After the brain
jobs, the cardiac phantom evaluation (:mod:`evaluation.cardiac_run`: oracle, our methods without a
prior, with μ_data and with painted seeds, scikit-learn; then deepg and deepsvg trained on 20 other
patients with μ_data and tested on 5) runs in one fresh process; its Markdown is kept beside
results.json and becomes the page's cardiac section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from evaluation import conditions, methods, metrics  # noqa: E402
from evaluation.job_server import JobServers, JobTimeout, ServerLost  # noqa: E402
from evaluation.report import job_seconds, slug, write_report  # noqa: E402

PEERS_1D = ("sklearn-gmm", "atropos", "atropos-mrf", "sitk-kmeans", "sitk-otsu")
PEERS_MULTI = ("sklearn-gmm", "atropos", "atropos-mrf")
BIAS_PEERS = ("n4-gmm", "n4-atropos-mrf")  # the N4 pipelines, on the conditions with a bias field
SHIFTED_GRID = "shifted 2 mm grid"
BRAINWEB_CLASSES = 3  # CSF, GM, WM inside the brain region


def brainweb_case():
    """The real BrainWeb T1 + PD slice pair inside its brain region (no reference)."""
    import SimpleITK as sitk
    from scipy import ndimage
    images = [sitk.ReadImage(str(REPO_ROOT / "data" / "sample" / f"brainweb_{n}_slice.nrrd"))
              for n in ("t1", "pd")]
    channels = np.stack([sitk.GetArrayFromImage(i).astype(np.float32) for i in images])
    # brain = largest bright component of T1 (Otsu; the dark skull separates it from the scalp),
    # holes (the dark ventricles) filled
    threshold = sitk.OtsuThreshold(images[0], 0, 1)
    foreground = sitk.GetArrayFromImage(threshold).astype(bool)
    components, count = ndimage.label(foreground)
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    mask = ndimage.binary_fill_holes(components == largest)
    spacing = tuple(float(s) for s in reversed(images[0].GetSpacing()))
    return conditions.Case(name="BrainWeb T1 + PD slice (real, no reference)", channels=channels,
                           mask=mask, reference=None, spacing=spacing, channel_names=("T1", "PD"),
                           description=f"real 2D slices {channels.shape[1]}x{channels.shape[2]}; mask = "
                                       "the brain: largest connected Otsu-foreground component of T1 "
                                       "(the dark skull separates it from the scalp), holes filled")


def build_plan(quick: bool):
    """List of (group, resolution label, Case, n_classes, [methods])."""
    from mni_data import load_mni
    plan = []
    volume_2mm = load_mni(2)
    if quick:
        for case in conditions.t1_cases(volume_2mm, [c for c in conditions.T1_CONDITIONS
                                                      if c[0] in ("clean", "noise 0.10")]):
            plan.append(("T1", "2 mm", case, 3, list(methods.OURS) + list(PEERS_1D)))
        return plan, {"quick": True}

    volume_1mm = load_mni(1)
    # 1 mm: every condition with our em-gmm, both deep methods, the peers and the N4 pipelines where a
    # field is. Atropos without its MRF runs where the MRF's share is read (2 mm clean and noise 0.10,
    # the multi-channel cases): where both ran at 1 mm, it was never more than 0.0014 ahead of
    # Atropos + MRF, for up to 40 s per image. Where a field is, Atropos + MRF runs at 1 mm only after
    # N4 (the ANTs pipeline): in each of the four full runs before (engines up to b594d2a) N4 + Atropos +
    # MRF was 0.047-0.27 ahead of Atropos + MRF on the uncorrected 1 mm image (0.019-0.19 at 2 mm, where
    # both still run), and the uncorrected runs took 50-54 s each.
    for case in conditions.t1_cases(volume_1mm):
        names = [p for p in PEERS_1D if p != "atropos"] + ["em-gmm", "deepsvg", "deepg"]
        if "bias" in case.name:
            names = [p for p in names if p != "atropos-mrf"] + list(BIAS_PEERS)
        plan.append(("T1", "1 mm", case, 3, names))
    # 2 mm: every peer, our EM and deepsvg on every condition; deepg, em-svgmm, Atropos without its MRF
    # and deepsvg without the spatial prior (the paper's loss) on the two conditions the goals name,
    # where the report reads what each spatial coupling adds. Our defaults correct a
    # field where they detect one (bias_field="detect"), so the rows with the field always on
    # ("auto") run where there is none, on the same two conditions: what a field nobody needed costs
    for case in conditions.t1_cases(volume_2mm):
        coupling = case.name in DEEP_CONDITIONS
        ours = methods.OURS if coupling else ("em-gmm", "deepsvg")
        names = list(ours) + [p for p in PEERS_1D if coupling or p != "atropos"]
        if coupling:
            names += list(methods.OURS_BIAS)
        if "bias" in case.name:
            names += list(BIAS_PEERS)
        plan.append(("T1", "2 mm", case, 3, names))
    # another real image: the template block-averaged to 2 mm on a grid shifted by 1 mm along every
    # axis (a different resampling of the same anatomy, partial volume falls elsewhere)
    shifted = load_mni(2, offset_mm=1)
    for case in conditions.t1_cases(shifted, [c for c in conditions.T1_CONDITIONS if c[0] in DEEP_CONDITIONS]):
        case = dataclasses.replace(case, name=f"{case.name}, {SHIFTED_GRID}")
        plan.append(("T1 variant", "2 mm", case, 3, ["em-gmm", "deepsvg", "sklearn-gmm", "atropos-mrf"]))
    plan.append(("multi", "2 mm", conditions.phantom_case(volume_2mm), 3,
                 list(methods.OURS) + list(PEERS_MULTI)))
    plan.append(("multi", "1 mm (2D)", brainweb_case(), BRAINWEB_CLASSES,
                 list(methods.OURS) + list(PEERS_MULTI)))
    return plan, {"quick": False}


# The cardiac section: SYNTHETIC patients 0..5, the deep rows on the first 3 (each deep fit of a
# stack takes tens of seconds on one CPU core, three rows per deep method).
CARDIAC_CASES, CARDIAC_DEEP_CASES = 6, 3
CARDIAC_QUICK_CASES, CARDIAC_QUICK_DEEP_CASES = 2, 1
# The trained rows (the authors' protocol): networks trained on 20 other patients (seeds 100..119),
# tested on patients 0..4, the first of the per-image rows. Quick: 3 / 1 and a few steps.
CARDIAC_TRAIN_CASES, CARDIAC_TEST_CASES = 20, 5
CARDIAC_QUICK_TRAIN_CASES, CARDIAC_QUICK_TEST_CASES = 3, 1
QUICK_TRAINING_OPTIONS = {"max_epochs": 2, "min_epochs": 1, "warm_start_steps": 2}
CARDIAC_REPORT = "cardiac.md"

DEEP_CONDITIONS = ("clean", "noise 0.10")
# a smoke run only checks that everything runs end to end: the deep fits are cut short
QUICK_DEEP_OPTIONS = {"max_iter": 5, "min_iter": 2, "warm_start_iter": 2}


def cardiac_arguments(quick: bool) -> list[str]:
    """The options of ``python -m evaluation.cardiac_run`` in a full (or quick) run, --times included."""
    if quick:
        return ["--cases", str(CARDIAC_QUICK_CASES), "--deep-cases", str(CARDIAC_QUICK_DEEP_CASES),
                "--train-cases", str(CARDIAC_QUICK_TRAIN_CASES), "--test-cases", str(CARDIAC_QUICK_TEST_CASES),
                "--times", "--deep-options", json.dumps(QUICK_DEEP_OPTIONS),
                "--training-options", json.dumps(QUICK_TRAINING_OPTIONS)]
    return ["--cases", str(CARDIAC_CASES), "--deep-cases", str(CARDIAC_DEEP_CASES), "--train-cases",
            str(CARDIAC_TRAIN_CASES), "--test-cases", str(CARDIAC_TEST_CASES), "--times"]


def run_cardiac(work: Path, quick: bool, timeout: float) -> Path:
    """The cardiac evaluation in a fresh process -> ``work/cardiac.md`` (kept from the last run when it fails)."""
    path = work / CARDIAC_REPORT
    partial = work / f"cardiac.{os.getpid()}.partial.md"
    arguments = cardiac_arguments(quick)
    command = [sys.executable, "-m", "evaluation.cardiac_run", *arguments,
               "--threads", str(max(1, os.cpu_count() or 1)), "--out", str(partial)]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"cardiac: timed out after {timeout:.0f} s; the page keeps the last cardiac section", flush=True)
        return path
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"cardiac: failed ({tail[0][:300]}); the page keeps the last cardiac section", flush=True)
        return path
    header = (f"Run started {started}, engine at commit {methods.engine_revision()}, {os.cpu_count()} CPU cores, "
              f"one process (`python -m evaluation.cardiac_run {shlex.join(arguments)}`"
              + (", deep fits and training cut short: a smoke run" if quick else "") + ").")
    path.write_text(header + "\n\n" + partial.read_text())
    partial.unlink()
    print(f"cardiac: {' '.join(arguments[:8])} -> {path}", flush=True)
    return path


def run_job(servers: JobServers, case_path: Path, method: str, result_path: Path, n_classes: int,
            timeout: float, options: dict | None = None) -> dict:
    """One method on one case in a process of its own (:mod:`evaluation.job_server`); its summary."""
    argv = [str(case_path), method, str(result_path), "--n-classes", str(n_classes)]
    if options:
        argv += ["--options", json.dumps(options)]
    log_path = result_path.with_suffix(".log")
    start = time.perf_counter()
    try:
        exit_code = servers.run(methods.SPECS[method].modules, argv, log_path, timeout)
    except JobTimeout:
        return _failed(result_path, {"method": method, "error": f"timed out after {timeout:.0f} s",
                                     "options": options or {}})
    except ServerLost as lost:
        return _failed(result_path, {"method": method, "error": str(lost), "options": options or {}})
    if exit_code != 0:
        lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.exists() else []
        tail = lines[-1:] or [f"exit code {exit_code}, no output"]
        return _failed(result_path, {"method": method, "error": tail[0][:300], "options": options or {}})
    summary = json.loads(result_path.with_suffix(".json").read_text())
    summary["process_seconds"] = time.perf_counter() - start
    # kept with the job's result so that --resume/--collect know the job's wall time too
    result_path.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary


def _failed(result_path: Path, summary: dict) -> dict:
    """Keep a failure on disk too, so --resume/--collect report it as failed, not as not run."""
    result_path.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary


def score(case, n_classes, method, labels) -> dict:
    spec = methods.SPECS[method]
    if case.reference is None:
        return {}
    dice, mapping = metrics.matched_dice(labels, case.reference, n_classes, spec.identity_from_method)
    hungarian, _ = metrics.matched_dice(labels, case.reference, n_classes, False)
    return {"dice": dice.tolist(), "mean_dice": float(np.nanmean(dice)),
            "mean_dice_hungarian": float(np.nanmean(hungarian)),
            "identity": "method" if spec.identity_from_method else "Hungarian"}


CONDITION_PRIORITY = ("clean", "noise 0.10", "bias 40%", "noise 0.10 + bias 40%", "noise 0.05", "bias 20%")


def job_order(plan):
    """Jobs (case index, method) with the most informative first, so that a run cut short (or
    resumed) has the headline comparisons: clean and noise 0.10 at 2 mm (all methods) and 1 mm
    (peers) before the other conditions; the multi-channel cases last, the smaller first."""
    def key(item):
        index, method = item
        group, resolution, case, _, _ = plan[index]
        condition = (CONDITION_PRIORITY.index(case.name) if case.name in CONDITION_PRIORITY
                     else len(CONDITION_PRIORITY))
        if group != "T1":  # multi-channel cases last, the small (2D) one first
            return (1, 0, int(case.mask.sum()), index)
        return (0, condition, resolution != "2 mm", index)
    jobs = [(i, m) for i, entry in enumerate(plan) for m in entry[4]]
    return sorted(jobs, key=key)


def case_record(group, resolution, case, n_classes, names) -> dict:
    return {"group": group, "resolution": resolution, "name": case.name,
            "description": case.description, "n_classes": n_classes,
            "n_voxels": int(case.mask.sum()), "shape": list(case.mask.shape),
            "synthetic": case.synthetic, "channels": list(case.channel_names),
            "has_reference": case.reference is not None, "planned": list(names), "results": []}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 mm, clean + noise 0.10")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".cache" / "evaluation")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per method run")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results of jobs an interrupted run already finished")
    parser.add_argument("--only", type=lambda text: [m for m in text.split(",") if m],
                        help="comma-separated methods: run just these jobs of the plan (with "
                             "--resume, to split one run over several processes)")
    parser.add_argument("--cases", default=None,
                        help="run only the cases whose resolution and name ('1 mm clean') contain this text "
                             "(with --only/--resume)")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: gather the finished jobs of the plan into the report "
                             "(the others are listed as not run)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the last results.json")
    parser.add_argument("--no-cardiac", action="store_true",
                        help="skip the cardiac phantom evaluation (the page keeps the last cardiac section)")
    parser.add_argument("--cardiac-only", action="store_true",
                        help="run only the cardiac phantom evaluation and rebuild the page from the last "
                             "results.json")
    args = parser.parse_args(argv)
    work = args.work_dir / ("quick" if args.quick else "full")
    output_dir = REPO_ROOT / "out" / "evaluation-quick" if args.quick else REPO_ROOT / "docs"
    results_path = work / ("results.json" if not (args.only or args.cases) else
                           f"results-{slug('-'.join(args.only or []) + '-' + (args.cases or ''))}.json")

    if args.cardiac_only:
        if not results_path.exists():
            parser.error(f"--cardiac-only needs the brain results of an earlier run ({results_path}); "
                         "run without it first")
        run_cardiac(work, args.quick, args.timeout)
    elif not args.report_only:
        work.mkdir(parents=True, exist_ok=True)
        plan, info = build_plan(args.quick)
        started = time.time()
        info.update({"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
                     "python": platform.python_version(), "load_before": os.getloadavg(),
                     "resumed": bool(args.resume)})
        info["versions"] = versions()
        info["engine"] = methods.engine_revision()
        records, case_paths = [], []
        for group, resolution, case, n_classes, names in plan:
            case_dir = work / slug(f"{resolution}-{case.name}")
            case_dir.mkdir(parents=True, exist_ok=True)
            case_path = case_dir / "case.npz"
            partial = case_dir / f"case.{os.getpid()}.partial.npz"
            np.savez(partial, channels=case.channels, mask=case.mask, spacing=np.array(case.spacing))
            partial.replace(case_path)  # atomic: a worker of a parallel runner never reads half a file
            case_paths.append(case_path)
            records.append(case_record(group, resolution, case, n_classes, names))
        jobs = job_order(plan)
        if args.only:
            unknown = sorted(set(args.only) - set(methods.SPECS))
            if unknown:
                parser.error(f"unknown method(s) in --only: {', '.join(unknown)}")
            jobs = [job for job in jobs if job[1] in args.only]
        if args.cases:
            jobs = [job for job in jobs
                    if args.cases.lower() in f"{plan[job[0]][1]} {plan[job[0]][2].name}".lower()]
        info["split"] = bool(args.only or args.cases) or args.collect
        labels_by_case = [dict() for _ in plan]
        servers = JobServers()
        for done, (index, method) in enumerate(jobs, start=1):
            group, resolution, case, n_classes, _ = plan[index]
            result_path = case_paths[index].parent / f"{method}.npz"
            options = QUICK_DEEP_OPTIONS if args.quick and method.startswith("deep") else None
            previous = result_path.with_suffix(".json")
            stored_failure = previous.exists() and "error" in json.loads(previous.read_text())
            if (args.resume or args.collect) and previous.exists() and (result_path.exists() or stored_failure):
                summary = json.loads(previous.read_text())
                summary["resumed"] = True
                summary["result_file"] = str(previous)
            elif args.collect:
                continue
            else:
                previous.unlink(missing_ok=True)
                summary = run_job(servers, case_paths[index], method, result_path, n_classes, args.timeout,
                                   options)
            if "error" not in summary:
                with np.load(result_path) as stored:
                    labels = stored["labels"]
                labels_by_case[index][method] = labels
                summary.update(score(case, n_classes, method, labels))
            print(f"[{done}/{len(jobs)}] {resolution} {case.name}: {method} -> "
                  + (summary.get("error") or
                     f"{summary['seconds']:.1f} s, {summary['peak_mb']:.0f} MB, "
                     f"Dice {summary.get('mean_dice', float('nan')):.3f}"), flush=True)
            records[index]["results"].append(summary)
            if case.reference is None:
                found = labels_by_case[index]
                records[index]["agreement"] = {
                    a: {b: metrics.pairwise_agreement(found[a], found[b], case.mask, n_classes)
                        for b in found} for a in found}
            # written after every job: a run cut short still leaves a reportable partial result
            info["seconds"] = time.time() - started
            if args.collect:
                info["seconds"], first = collected_wall_time(records)
                if first is not None:
                    info["started"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(first))
            info["load_after"] = os.getloadavg()
            info["jobs_done"], info["jobs_planned"] = done, len(jobs)
            results_path.write_text(json.dumps({"info": info, "cases": records}, indent=1))
        servers.close()
        if not (args.no_cardiac or args.collect or args.only or args.cases):
            cardiac_started = time.time()
            cardiac = run_cardiac(work, args.quick, args.timeout)
            if cardiac.exists() and cardiac.stat().st_mtime >= cardiac_started:  # this run's section
                info["cardiac_seconds"] = time.time() - cardiac_started
                results_path.write_text(json.dumps({"info": info, "cases": records}, indent=1))

    data = json.loads(results_path.read_text())
    written = write_report(data, work, output_dir)
    for path in written:
        print(f"wrote {path}")
    return 0


def collected_wall_time(records):
    """(wall seconds from the first job's start to the last job's end, start time of the first job),
    from the per-job result files, for --collect."""
    starts, ends = [], []
    for record in records:
        for result in record["results"]:
            path = result.get("result_file")
            if path and Path(path).with_suffix(".npz").exists():
                end = Path(path).with_suffix(".npz").stat().st_mtime  # labels: written last
                starts.append(end - job_seconds(result))
                ends.append(end)
    if not ends:
        return 0.0, None
    return max(ends) - min(starts), min(starts)


def versions() -> dict:
    found = {}
    for module in ("numpy", "torch", "sklearn", "ants", "SimpleITK", "scipy"):
        try:
            found[module] = __import__(module).__version__
        except Exception as error:  # noqa: BLE001 - report, never fail the run for this
            found[module] = f"not importable ({type(error).__name__})"
    return found


if __name__ == "__main__":
    sys.exit(main())

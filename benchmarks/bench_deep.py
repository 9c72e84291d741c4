"""Deep parts of the engine benchmark (issue 10): per-image deepSVG fits before and after, trained-model
inference at 1 mm, and the time-against-voxels scaling curve. ``bench_engine.py`` runs them and writes
the page; ``gpu_check.sh`` runs the deep inputs on a GPU. Not a test.

Every case runs in a fresh interpreter (``python bench_deep.py '<json spec>'``), which imports the
engine from the folder in ``$DEEPGMM_BENCH_ENGINE`` when set (the baseline: an older commit extracted
with ``git archive``) and from this tree otherwise. Inputs, scoring and timing are this tree's code for
both engines, so before and after differ only in the engine.

Inputs (``quick`` replaces each by a tiny stand-in that takes seconds and needs no download):

* ``cardiac``: a synthetic short-axis LV stack like the evaluation's (evaluation/cardiac_phantom.py,
  seed 0, 8 slices of 128 x 128, three sequences LGE/T2/bSSFP), K = 4 inside the LV mask;
* ``mni-2mm``: the bundled MNI152 2009a T1 at 2 mm (data/sample) in its brain mask, K = 3;
* ``mni-1mm``: the 1 mm template (benchmarks/mni_data.py ``load_mni(1)``; ``$DEEPGMM_CACHE_DIR``),
  K = 3.

Dice: per class after Hungarian matching of the labels to the reference (evaluation/metrics.py), mean
over the classes the reference holds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ENGINE_ENV = "DEEPGMM_BENCH_ENGINE"
ENGINE = Path(os.environ.get(ENGINE_ENV) or REPO / "DeepGMMSegment")
sys.path.insert(0, str(ENGINE))
for _folder in (Path(__file__).resolve().parent, REPO):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

SAMPLE = REPO / "data" / "sample"
DEFAULT_BASELINE_REF = "1a33663"  # the engine at the start of issue 10's work
DEEP_INPUTS = ("cardiac", "mni-2mm", "mni-1mm")
QUICK_INPUTS = ("cardiac",)
INPUT_TITLES = {"cardiac": "cardiac ROI (synthetic, {shape}, 3 channels, K = 4, LV mask)",
                "mni-2mm": "MNI152 2 mm sample in its mask ({shape}, K = 3)",
                "mni-1mm": "MNI152 1 mm template, T1 > 0 ({shape}, K = 3)"}

# Goals of issue 10 (reported against, never asserted).
GOAL_SECONDS = {"cardiac": 1.5, "mni-2mm": 10.0, "mni-1mm": 60.0}
GOAL_INFERENCE_SECONDS = 2.0
GOAL_SLOPE = 1.0  # time grows no faster than linearly with the mask voxels
SLOPE_MARGIN = 0.1  # what a fitted slope may exceed 1 by on a machine that is only nearly quiet

# Scaling curve: mask voxels from 10^4 to 2*10^6 (the 1 mm template resampled; noise 0.05 of the
# intensity range, the evaluation's condition, so that EM cannot compress the intensities).
SCALING_TARGETS = (1e4, 3e4, 1e5, 3e5, 1e6, 2e6)
QUICK_SCALING_TARGETS = (1e3, 4e3)
SCALING_METHODS = ("em-gmm", "deepsvg")
SCALING_NOISE = 0.05

# Trained model: trained quickly at 2 mm on volumes derived from the 1 mm template (as in
# bench_trained.py, the settings of its published table), applied at 1 mm.
TRAINING = dict(patch_size=(32, 64, 64), batch_size=2, max_epochs=15, min_epochs=5, patience=5)
QUICK_TRAINING = dict(patch_size=(8, 16, 16), batch_size=2, max_epochs=1, min_epochs=1, patience=1,
                      base_width=4, depth=2)
# Tiny deep fits for --quick: every code path, seconds; figures meaningless.
QUICK_FIT = dict(max_iter=3, min_iter=1, warm_start_iter=2)


@dataclasses.dataclass(frozen=True)
class DeepInput:
    channels: list          # co-registered float32 arrays (z, y, x)
    mask: np.ndarray
    reference: np.ndarray   # 0 outside, 1..K
    spacing: tuple
    n_classes: int


# ------------------------------------------------------------------------------------- inputs

def _read(path: Path):
    import SimpleITK as sitk
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing()))


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    z, y, x = (s // factor * factor for s in volume.shape)
    v = volume[:z, :y, :x].astype(np.float32)
    return v.reshape(z // factor, factor, y // factor, factor, x // factor, factor).mean((1, 3, 5))


def _sample_maps(shrink: int = 1):
    """The bundled 2 mm T1, GM and WM (optionally block-averaged by ``shrink``) and their spacing."""
    maps = {}
    for tissue in ("t1", "gm", "wm"):
        array, spacing = _read(SAMPLE / f"mni152_2009_{tissue}_2mm.nii.gz")
        maps[tissue] = _block_mean(array, shrink) if shrink > 1 else array.astype(np.float32)
    return maps, tuple(s * shrink for s in spacing)


def _brain_input(t1, gm, wm, spacing) -> DeepInput:
    import mni_data
    mask, _, reference = mni_data.reference_from_maps(t1, gm, wm)
    return DeepInput([np.asarray(t1, np.float32)], mask, reference, tuple(spacing), 3)


def load_input(name: str, quick: bool = False) -> DeepInput:
    """One of ``DEEP_INPUTS``; ``quick``: a tiny stand-in built from the bundled sample or a small phantom."""
    if name == "cardiac":
        from evaluation import cardiac_phantom
        settings = (cardiac_phantom.PhantomSettings(n_slices=(4, 4), size=104, supersampling=1) if quick
                    else cardiac_phantom.PhantomSettings(n_slices=(8, 8)))
        case = cardiac_phantom.generate_case(0, settings)
        return DeepInput([c.astype(np.float32) for c in case.channels], case.mask, case.labels, case.spacing,
                         len(cardiac_phantom.CLASS_NAMES))
    if name == "mni-2mm":
        maps, spacing = _sample_maps(3 if quick else 1)
        if not quick:  # the sample's own mask file (identical to T1 > 0)
            mask, _ = _read(SAMPLE / "mni152_2009_brainmask_2mm.nii.gz")
            maps["t1"] = np.where(mask > 0, maps["t1"], 0)
        return _brain_input(maps["t1"], maps["gm"], maps["wm"], spacing)
    if name == "mni-1mm":
        if quick:
            maps, spacing = _sample_maps(2)
            return _brain_input(maps["t1"], maps["gm"], maps["wm"], spacing)
        import mni_data
        volume = mni_data.load_mni(1)
        return DeepInput([volume.t1], volume.mask, volume.reference, volume.spacing, 3)
    raise ValueError(f"Unknown benchmark input {name!r}; use one of {', '.join(DEEP_INPUTS)}.")


def mean_dice(labels: np.ndarray, inp: DeepInput) -> tuple[float, list]:
    """Mean and per-class Dice after Hungarian matching (classes absent from the reference excluded)."""
    from evaluation import metrics
    labels = np.where(inp.mask, labels, 0)
    dice, _ = metrics.matched_dice(labels, inp.reference, inp.n_classes, identity_from_method=False)
    present = [k for k in range(inp.n_classes) if (inp.reference == k + 1).any()]
    return float(np.mean(dice[present])), [None if np.isnan(d) else float(d) for d in dice]


def scaling_input(target_voxels: float, quick: bool = False) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(noisy T1, mask, spacing): the template resampled so its brain holds about ``target_voxels``.

    Isotropic spacing s mm holds about N(1 mm) / s^3 brain voxels; below 1 mm (2 * 10^6) the template
    is upsampled. Linear interpolation, mask = resampled T1 > 0.5 (of 255). ``quick``: from the 2 mm sample.
    """
    import SimpleITK as sitk
    from evaluation import conditions
    if quick:
        image = sitk.ReadImage(str(SAMPLE / "mni152_2009_t1_2mm.nii.gz"))
    else:
        import mni_data
        image = sitk.ReadImage(str(mni_data.template_path_1mm("t1")))
    image = sitk.Cast(image, sitk.sitkFloat32)
    full = int((sitk.GetArrayViewFromImage(image) > 0.5).sum())
    factor = (full / float(target_voxels)) ** (1 / 3)
    old_spacing, old_size = np.array(image.GetSpacing()), np.array(image.GetSize())
    spacing = old_spacing * factor
    size = [int(round(n)) for n in old_size * old_spacing / spacing]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                              tuple(float(s) for s in spacing), image.GetDirection(), 0.0, sitk.sitkFloat32)
    t1 = sitk.GetArrayFromImage(resampled)
    mask = t1 > 0.5
    sigma = SCALING_NOISE * conditions.intensity_range(t1, mask)
    noisy = conditions.add_noise(t1, sigma, conditions.seed_for(f"scaling {target_voxels:g}"))
    return np.where(mask, noisy, 0).astype(np.float32), mask, tuple(float(s) for s in reversed(spacing))


def training_volumes(quick: bool = False):
    """(images, masks, spacing) the quick model is trained on (2 mm, never the test volume's grid offset)."""
    if quick:
        maps, spacing = _sample_maps(3)
        rng = np.random.default_rng(0)
        t1 = maps["t1"]
        images = [[(t1 * rng.uniform(0.9, 1.1) + rng.normal(0, 3, t1.shape)).astype(np.float32)] for _ in range(3)]
        return images, [t1 > 0.5] * 3, spacing
    import bench_trained
    images, masks = bench_trained.derived_training_volumes(7)
    return images, masks, (2.0, 2.0, 2.0)


# ------------------------------------------------------------------------------------- workers

def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): less sensitive to other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _engine_facts() -> dict:
    import DeepGMMSegmentLib
    return {"engine": str(Path(DeepGMMSegmentLib.__file__).resolve().parent)}


def _timed_segment(inp: DeepInput, device: str, labels_out: str | None, **options) -> dict:
    """``segment`` on ``inp`` with wall, CPU, iteration timing, peak memory and Dice."""
    import torch
    from DeepGMMSegmentLib import segment
    stamps: list[float] = []

    def progress(iteration, max_iterations, nll, elapsed):  # noqa: ARG001
        stamps.append(time.perf_counter())

    if device.startswith("cuda"):
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    baseline = rss_mib()
    start, cpu = time.perf_counter(), cpu_seconds()
    result = segment(inp.channels, inp.n_classes, method="deepsvg", mask=inp.mask, spacing=inp.spacing,
                     device=device, seed=0, progress=progress, **options)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    peak = rss_mib() - baseline
    dice, per_class = mean_dice(result.labels, inp)
    if labels_out:
        np.save(labels_out, result.labels)
    loop = stamps[-result.n_iter:] if result.n_iter else []
    out = {"seconds": seconds, "cpu_seconds": cpu, "n_iter": int(result.n_iter), "converged": bool(result.converged),
           "nll": float(result.nll_history[-1]), "peak_mib": peak, "dice": dice, "dice_per_class": per_class,
           "mask_voxels": int(inp.mask.sum()), "shape": list(inp.mask.shape), "n_classes": inp.n_classes,
           "device": str(result.device),
           "seconds_per_iteration": (loop[-1] - loop[0]) / (len(loop) - 1) if len(loop) > 1 else None,
           **_engine_facts()}
    if device.startswith("cuda"):
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def worker_fit(spec: dict) -> dict:
    """A per-image deepSVG fit with the engine's defaults (``quick``: a few iterations; ``options``:
    engine options over them, to time a choice against the default in one run)."""
    inp = load_input(spec["input"], spec.get("quick", False))
    return _timed_segment(inp, spec.get("device", "cpu"), spec.get("labels_out"),
                          **{**(QUICK_FIT if spec.get("quick") else {}), **spec.get("options", {})})


def worker_train(spec: dict) -> dict:
    """Train the quick 2 mm model into ``spec['model']``; its training time and epochs."""
    from DeepGMMSegmentLib.trained.training import train
    images, masks, spacing = training_volumes(spec.get("quick", False))
    settings = QUICK_TRAINING if spec.get("quick") else TRAINING
    start = time.perf_counter()
    result = train(images, 3, "deepsvg", masks=masks, prior_means="auto", spacing=spacing, output=spec["model"],
                   device=spec.get("device", "cpu"), seed=0, **settings)
    return {"seconds": time.perf_counter() - start, "epochs": int(result.metadata["training"]["epochs"]),
            **_engine_facts()}


def worker_inference(spec: dict) -> dict:
    """``segment(model=...)`` on the 1 mm input: one forward pass, no fine-tuning."""
    inp = load_input("mni-1mm", spec.get("quick", False))
    return _timed_segment(inp, spec.get("device", "cpu"), spec.get("labels_out"), model=spec["model"])


def worker_scaling(spec: dict) -> dict:
    """One point of the scaling curve: ``spec['method']`` with its defaults on a resampled template."""
    from DeepGMMSegmentLib import segment
    t1, mask, spacing = scaling_input(spec["target"], spec.get("quick", False))
    options = QUICK_FIT if spec.get("quick") and spec["method"].startswith("deep") else {}
    baseline = rss_mib()
    start, cpu = time.perf_counter(), cpu_seconds()
    result = segment(t1, 3, method=spec["method"], mask=mask, spacing=spacing, device=spec.get("device", "cpu"),
                     seed=0, **options)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu, "n_iter": int(result.n_iter),
            "peak_mib": rss_mib() - baseline, "mask_voxels": int(mask.sum()), **_engine_facts()}


WORKERS = {"fit": worker_fit, "train": worker_train, "inference": worker_inference, "scaling": worker_scaling}


def run_case(spec: dict, engine: Path | None = None, timeout: float | None = None) -> dict:
    """Run one worker in a fresh interpreter (``engine``: the folder holding DeepGMMSegmentLib).

    Never raises for a failing case: the result is then ``{"error": <last lines of its stderr>}``, so
    one failure (or a case stopped after ``timeout`` seconds) cannot lose a long sequential run.
    """
    env = dict(os.environ)
    env.pop(ENGINE_ENV, None)
    if engine is not None:
        env[ENGINE_ENV] = str(engine)
    try:
        completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
                                   capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s (time budget)"}
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        tail = " | ".join(completed.stderr.strip().splitlines()[-3:]) or f"exit code {completed.returncode}"
        return {"error": tail}
    result = json.loads(lines[-1])
    expected = Path(engine or REPO / "DeepGMMSegment").resolve()
    if not Path(result["engine"]).is_relative_to(expected):
        return {"error": f"imported the engine from {result['engine']}, not from {expected}"}
    return result


# ------------------------------------------------------------------------------------- baseline engine

def resolve_commit(ref: str) -> str:
    completed = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise ValueError(f"--baseline-ref {ref!r} is not a commit of {REPO} ({completed.stderr.strip()}): "
                         "give a commit, tag or branch, or 'none' to skip the baseline.")
    return completed.stdout.strip()


def extract_engine(ref: str, into: Path) -> Path:
    """The engine package of git ``ref`` extracted under ``into``; returns the folder to put on sys.path."""
    commit = resolve_commit(ref)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit,
                              "DeepGMMSegment/DeepGMMSegmentLib"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        # the "data" filter refuses links and paths leaving ``into`` (Python >= 3.10.12 / 3.11.4)
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return Path(into) / "DeepGMMSegment"


def current_version() -> str:
    """This tree's commit, with '+ uncommitted changes' when the engine differs from it."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "DeepGMMSegment/DeepGMMSegmentLib"],
                           capture_output=True, text=True)
    version = head.stdout.strip() or "unknown"
    return version + (" + uncommitted changes" if dirty.stdout.strip() else "")


# ------------------------------------------------------------------------------------- the runs

def run_all(quick: bool, baseline_ref: str | None, scaling: bool = True, trained: bool = True,
            baseline_skip: tuple[str, ...] = (),
            log=lambda text: print(text, file=sys.stderr, flush=True)) -> dict:
    """Every deep case, sequentially, each in its own process: the input of :func:`report`.

    ``baseline_skip``: inputs of DEEP_INPUTS fitted by this tree's engine only (the page says so).

    ``quick``: the cardiac stand-in only, the trained model and the scaling curve of this tree only
    (two points per method): every code path in one to two minutes.
    """
    results = {"quick": quick, "after_version": current_version(), "fits": {}, "trained": {}, "scaling": {},
               "baseline_skipped": [name for name in baseline_skip if baseline_ref]}
    with tempfile.TemporaryDirectory(prefix="deepgmm-bench-deep-") as scratch:
        scratch = Path(scratch)
        engines = {"after": None}
        if baseline_ref:
            results["before_version"] = f"{baseline_ref} ({resolve_commit(baseline_ref)[:10]})"
            engines["before"] = extract_engine(baseline_ref, scratch / "baseline")
        for name in QUICK_INPUTS if quick else DEEP_INPUTS:
            for side, engine in engines.items():
                if side == "before" and name in baseline_skip:
                    continue
                log(f"running deepsvg on {name} ({side}) ...")
                results["fits"].setdefault(name, {})[side] = run_case(
                    {"worker": "fit", "input": name, "quick": quick}, engine)
        if trained:
            for side, engine in ({"after": None} if quick else engines).items():
                model = str(scratch / f"model-{side}.pt")
                log(f"training the quick model ({side}) ...")
                training = run_case({"worker": "train", "model": model, "quick": quick}, engine)
                log(f"trained-model inference at 1 mm ({side}) ...")
                inference = (run_case({"worker": "inference", "model": model, "quick": quick}, engine)
                             if "error" not in training else {"error": "training failed"})
                results["trained"][side] = {"training": training, "inference": inference}
        if scaling:
            for method in SCALING_METHODS:
                for target in (QUICK_SCALING_TARGETS if quick else SCALING_TARGETS):
                    log(f"scaling: {method} at {target:,.0f} voxels ...")
                    results["scaling"].setdefault(method, []).append(
                        run_case({"worker": "scaling", "method": method, "target": target, "quick": quick}))
    return results


# ------------------------------------------------------------------------------------- report

def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def loglog_slope(voxels, seconds) -> float:
    """Least-squares slope of log(seconds) against log(voxels): 1 = linear growth."""
    return float(np.polyfit(np.log(np.asarray(voxels, float)), np.log(np.asarray(seconds, float)), 1)[0])


def _cell(run: dict | None, key: str, fmt: str) -> str:
    if not run or "error" in run:
        return "failed" if run else "–"
    value = run.get(key)
    return "–" if value is None else format(value, fmt)


QUICK_BANNER = ("**Quick run (`--quick`): tiny stand-in inputs and a few iterations; the figures check that the "
                "benchmark runs, they measure nothing.**")


def _fits_section(results: dict) -> tuple[list, list]:
    fits, has_before = results["fits"], "before_version" in results
    md = ["## (b) Per-image deepSVG fits, before and after", "",
          f"`segment(method=\"deepsvg\")` with the engine's defaults, CPU, seed 0. **after** = this tree "
          f"({results['after_version']})" + (f", **before** = {results['before_version']}" if has_before else "")
          + ", both run here in one sequential run, each case in a fresh process. Dice: per class after "
          "Hungarian matching to the reference, mean over the classes present.", "",
          "| input | mask voxels | engine | wall time (s) | CPU time (s) | iterations | s / iteration "
          "| mean Dice | peak memory (MiB) |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    console = ["deepSVG per-image fits (CPU)",
               f"{'input':<10}{'engine':>8}{'wall s':>9}{'CPU s':>9}{'iter':>6}{'Dice':>8}{'peak MiB':>10}"]
    goals = []
    for name in [n for n in DEEP_INPUTS if n in fits]:
        runs = fits[name]
        measured = next((r for r in runs.values() if "error" not in r), {})
        voxels = measured.get("mask_voxels")
        title = INPUT_TITLES[name].format(shape=" × ".join(map(str, measured.get("shape", []))) or "?")
        for side in ("before", "after"):
            if side not in runs:
                continue
            r = runs[side]
            md.append(f"| {title} | {voxels or 0:,} | {side} | {_cell(r, 'seconds', '.2f')} | "
                      f"{_cell(r, 'cpu_seconds', '.2f')} | {_cell(r, 'n_iter', 'd')} | "
                      f"{_cell(r, 'seconds_per_iteration', '.3f')} | {_cell(r, 'dice', '.3f')} | "
                      f"{_cell(r, 'peak_mib', '.0f')} |")
            console.append(f"{name:<10}{side:>8}{_cell(r, 'seconds', '.2f'):>9}{_cell(r, 'cpu_seconds', '.2f'):>9}"
                           f"{_cell(r, 'n_iter', 'd'):>6}{_cell(r, 'dice', '.3f'):>8}{_cell(r, 'peak_mib', '.0f'):>10}")
            if "error" in r:
                md.append(f"|  | | {side} failed: {r['error'][-300:]} | | | | | | |")
        after, before = runs.get("after", {}), runs.get("before")
        if "error" in after or not after:
            goals.append(f"* {name}: no result of this tree's engine; goal ≤ {GOAL_SECONDS[name]:g} s not measured.")
            continue
        text = (f"* {name}: {after['seconds']:.2f} s, goal ≤ {GOAL_SECONDS[name]:g} s "
                f"({_mark(after['seconds'] <= GOAL_SECONDS[name])})")
        if before and "error" not in before:
            text += (f"; {before['seconds'] / after['seconds']:.1f}× faster than before in wall time, "
                     f"{before['cpu_seconds'] / after['cpu_seconds']:.1f}× in CPU time; mean Dice "
                     f"{after['dice']:.3f} vs {before['dice']:.3f} before "
                     f"({_mark(round(after['dice'], 3) >= round(before['dice'], 3))}: equal at three decimals "
                     "or better)")
        goals.append(text + ".")
    skipped = results.get("baseline_skipped") or []
    if skipped:
        md += ["", f"The before engine was not run on {', '.join(skipped)} in this run (`--baseline-skip`), so "
               "those inputs have no before row and no speed-up."]
    md += ["", "Goals (issue 10, quiet machine, 2 CPU cores):", *goals, ""]
    return console + goals + [""], md


def _trained_section(results: dict) -> tuple[list, list]:
    trained = results["trained"]
    md = ["## (c) Trained-model inference at 1 mm", "",
          "A deepSVG model trained quickly at 2 mm (7 volumes derived from the 1 mm template, as in "
          f"benchmarks/bench_trained.py: patches {' × '.join(map(str, TRAINING['patch_size']))}, at most "
          f"{TRAINING['max_epochs']} epochs, prior means 'auto'), applied with `segment(..., model=...)` (one "
          "forward pass, no fine-tuning) to the 1 mm template. Each engine trains its own model with the same "
          "settings and seed. Dice as in (b). Engines after a26b637 record the training voxel size in the model "
          "file and run the forward pass on the model's grid (2 mm blocks of the 1 mm image, the probabilities "
          "lifted back to the voxels), and a deepSVG model's labels are its fitted posterior under the Potts "
          "prior (docs/training.md, \"Inference and fine-tuning\"); the engines before ran the network on "
          "every 1 mm voxel and took its output as the labels.", "",
          "| engine | training (s) | epochs | inference wall time (s) | CPU time (s) | mean Dice | peak memory (MiB) |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    console = ["Trained model, inference at 1 mm"]
    for side in ("before", "after"):
        if side not in trained:
            continue
        t, i = trained[side]["training"], trained[side]["inference"]
        md.append(f"| {side} | {_cell(t, 'seconds', '.1f')} | {_cell(t, 'epochs', 'd')} | {_cell(i, 'seconds', '.2f')} | "
                  f"{_cell(i, 'cpu_seconds', '.2f')} | {_cell(i, 'dice', '.3f')} | {_cell(i, 'peak_mib', '.0f')} |")
        console.append(f"  {side:<7} inference {_cell(i, 'seconds', '.2f')} s, Dice {_cell(i, 'dice', '.3f')}, "
                       f"peak {_cell(i, 'peak_mib', '.0f')} MiB (training {_cell(t, 'seconds', '.1f')} s)")
        for run in (t, i):
            if "error" in run:
                md.append(f"| {side} failed: {run['error'][-300:]} | | | | | | |")
    after = trained.get("after", {}).get("inference", {})
    if after and "error" not in after:
        goal = (f"Goal (issue 10): trained-model inference at MNI 1 mm ≤ {GOAL_INFERENCE_SECONDS:g} s: "
                f"{after['seconds']:.2f} s ({_mark(after['seconds'] <= GOAL_INFERENCE_SECONDS)}).")
    else:
        goal = f"Goal (issue 10): inference ≤ {GOAL_INFERENCE_SECONDS:g} s: not measured (failed)."
    return console + ["  " + goal, ""], md + ["", goal, ""]


def plot_scaling(scaling: dict, path: Path) -> bool:
    """Log-log plot of the scaling runs into ``path``; False (no plot) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for method, points in scaling.items():
        good = [p for p in points if "error" not in p]
        if good:
            axes.loglog([p["mask_voxels"] for p in good], [p["seconds"] for p in good], "o-", label=method)
    voxels = [p["mask_voxels"] for ps in scaling.values() for p in ps if "error" not in p]
    if voxels:
        line = np.array([min(voxels), max(voxels)], float)
        top = max(p["seconds"] for ps in scaling.values() for p in ps if "error" not in p)
        axes.loglog(line, top * line / line[-1], "k:", label="linear (slope 1)")
    axes.set_xlabel("voxels in the mask")
    axes.set_ylabel("wall time of the fit (s)")
    axes.set_title("Fit time against mask voxels (CPU)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _scaling_section(results: dict, image: Path, page: Path) -> tuple[list, list]:
    scaling = results["scaling"]
    plotted = plot_scaling(scaling, image)
    md = ["## (d) Time against mask voxels", "",
          "The 1 mm template resampled (linear, isotropic) so that its brain holds 10^4 to 2·10^6 voxels, "
          f"with Gaussian noise of {SCALING_NOISE:g} of the intensity range (so that EM cannot compress the "
          "intensities), K = 3, each method with its defaults, CPU, this tree's engine.", "",
          (f"![fit time against mask voxels]({os.path.relpath(image, page.parent)})" if plotted else
           "*No plot: matplotlib is not installed (`pip install matplotlib`, or the eval extras `make benchmark` "
           "installs), then `python benchmarks/bench_engine.py --from-results out/benchmark-results.json`.*"), "",
          "| mask voxels | " + " | ".join(f"{m} (s)" for m in scaling) + " |",
          "|---:|" + "---:|" * len(scaling)]
    console = ["Scaling (wall s against mask voxels)"]
    rows = max((len(p) for p in scaling.values()), default=0)
    for i in range(rows):
        cells = [scaling[m][i] if i < len(scaling[m]) else None for m in scaling]
        voxels = next((c["mask_voxels"] for c in cells if c and "error" not in c), 0)
        md.append(f"| {voxels:,} | " + " | ".join(_cell(c, "seconds", ".2f") for c in cells) + " |")
        console.append(f"  {voxels:>10,} " + " ".join(f"{m}={_cell(c, 'seconds', '.2f')}" for m, c in zip(scaling, cells)))
    md.append("")
    for method, points in scaling.items():
        good = [p for p in points if "error" not in p]
        if len(good) < 2:
            md.append(f"* {method}: fewer than two points, no slope.")
            continue
        slope = loglog_slope([p["mask_voxels"] for p in good], [p["seconds"] for p in good])
        upper = good[-3:] if len(good) >= 3 else good
        slope_upper = loglog_slope([p["mask_voxels"] for p in upper], [p["seconds"] for p in upper])
        text = (f"* {method}: fitted log-log slope {slope:.2f} over all sizes, {slope_upper:.2f} over the "
                f"largest {len(upper)} (where fixed costs no longer dominate); goal no faster than linear, i.e. "
                f"slope ≤ {GOAL_SLOPE:g} (+{SLOPE_MARGIN:g} for timing noise) over the largest sizes: "
                f"{_mark(slope_upper <= GOAL_SLOPE + SLOPE_MARGIN)}.")
        md.append(text)
        console.append("  " + text[2:])
    return console + [""], md + [""]


def report(results: dict, image: Path, page: Path) -> tuple[list, list]:
    """(console lines, markdown lines) of sections (b) to (d); writes the scaling PNG to ``image``."""
    console, md = [], []
    sections = [_fits_section(results)]
    if results["trained"]:
        sections.append(_trained_section(results))
    if results["scaling"]:
        sections.append(_scaling_section(results, image, page))
    for c, m in sections:
        console += c
        md += m
    return console, md


# ------------------------------------------------------------------------------------- GPU check

GPU_CHECK_DOC = [
    "## GPU check", "",
    "This page is measured on the CPU. On a machine with an NVIDIA GPU, `bash benchmarks/gpu_check.sh` "
    "(within 5 minutes once installed) sets up `.venv` as `make test` does, replaces its torch by the CUDA "
    "build of the same version if it cannot use the GPU (`TORCH_CUDA_INDEX` chooses the wheel index), runs "
    "the test suite's CUDA-capable tests on the GPU (`pytest -m cuda --device cuda`; without `--device` they "
    "run on the CPU like every other test), then fits the three deep inputs of (b) on the GPU and on the CPU "
    "and prints one table: time, iterations, Dice, GPU memory, and the agreement of the GPU labels with the "
    "CPU labels (mean Dice between the two maps after matching). It exits non-zero when a test failed or a "
    "GPU run did not finish. No CI runs it; it is checked by reading (`bash -n`, shellcheck) and its table "
    "code by `Testing/Python/benchmarks/test_bench_quick.py` on the CPU.", ""]


def gpu_check(device: str = "cuda", budget_seconds: float = 240.0, quick: bool = False,
              inputs: tuple = DEEP_INPUTS, log=lambda text: print(text, flush=True)) -> int:
    """The deep inputs on ``device`` and on the CPU: one table of times, Dice and GPU-CPU agreement.

    The GPU runs come first; each CPU reference then gets what is left of ``budget_seconds`` (a
    reference that does not fit is reported as stopped, not waited for). Returns 1 if a GPU run failed.
    ``quick``, ``inputs``: tiny stand-ins, fewer inputs (for the test that keeps this code running).
    """
    from evaluation import metrics
    deadline = time.monotonic() + budget_seconds
    runs = {}
    with tempfile.TemporaryDirectory(prefix="deepgmm-gpu-check-") as scratch:
        for where in (device, "cpu"):
            for name in inputs:
                left = deadline - time.monotonic()
                log(f"deepsvg on {name}, {where} ({left:.0f} s of the budget left) ...")
                labels = str(Path(scratch) / f"{name}-{where.replace(':', '')}.npy")
                spec = {"worker": "fit", "input": name, "device": where, "labels_out": labels, "quick": quick}
                runs[name, where] = run_case(spec, timeout=left) if left > 1 else {"error": "no time left"}
                runs[name, where]["labels"] = labels
        lines = [f"{'input':<9}{'GPU s':>8}{'iter':>6}{'GPU Dice':>10}{'GPU MiB':>9}{'CPU s':>9}{'CPU Dice':>10}"
                 f"{'GPU~CPU':>9}  (GPU~CPU: mean Dice between the two label maps, matched)"]
        failed = 0
        for name in inputs:
            gpu, cpu = runs[name, device], runs[name, "cpu"]
            failed += "error" in gpu
            agreement = "–"
            if "error" not in gpu and "error" not in cpu:
                on_gpu, on_cpu = np.load(gpu["labels"]), np.load(cpu["labels"])
                agreement = f"{metrics.pairwise_agreement(on_cpu, on_gpu, on_gpu > 0, gpu['n_classes']):.3f}"
            lines.append(f"{name:<9}{_cell(gpu, 'seconds', '.2f'):>8}{_cell(gpu, 'n_iter', 'd'):>6}"
                         f"{_cell(gpu, 'dice', '.3f'):>10}{_cell(gpu, 'gpu_peak_mib', '.0f'):>9}"
                         f"{_cell(cpu, 'seconds', '.2f'):>9}{_cell(cpu, 'dice', '.3f'):>10}{agreement:>9}")
            for where, run in ((device, gpu), ("cpu", cpu)):
                if "error" in run:
                    lines.append(f"  {name} on {where}: {run['error'][-300:]}")
    log("\n".join(lines))
    return 1 if failed else 0


def main(argv=None) -> int:
    """``python bench_deep.py '<json spec>'``: run one worker, print its JSON result (used by run_case);
    ``python bench_deep.py --gpu-check [DEVICE] [BUDGET_SECONDS]``: the GPU table (gpu_check.sh)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--gpu-check":
        return gpu_check(*(argv[1:2] or ["cuda"]), *[float(v) for v in argv[2:3]])
    spec = json.loads(argv[0])
    print(json.dumps(WORKERS[spec["worker"]](spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

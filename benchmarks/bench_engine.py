#!/usr/bin/env python
"""Engine benchmark: EM against scikit-learn, and the deepSVG fit's speed. Not a test.

(a) EM on data that does not compress: the MNI152 2009a T1 at 1 mm with Gaussian noise of sigma
    0.05 x its intensity range inside the brain (evaluation/conditions.py, the evaluation's
    "noise 0.05"), brain = T1 > 0 (about 1.9 M voxels, nearly all intensities distinct), 3 classes,
    full covariance, z-scored the way the engine does. scikit-learn's ``GaussianMixture`` and our EM
    at equal tolerance (``--tol``, default scikit-learn's 1e-3; both stop when the mean
    log-likelihood per voxel, measured in the E-step, changes by less than tol), from the same
    initial parameters (means at the 1/6, 1/2, 5/6 quantiles; weights and covariances of the hard
    assignment to them), with the same covariance regularisation. Three runs: scikit-learn; our
    ``em.fit_gmm`` on every voxel (the like-for-like algorithm); and the public
    ``segment(method="em-gmm", tol=...)`` with its defaults (its own 10 k-means++ starts, then
    normalisation, EM, label and probability maps: what a user runs). Reported: time, iterations,
    final NLL (every run's mixture evaluated by one float64 function on the same z-scored voxels,
    so "equal NLL" is checked, not assumed) and peak memory.
(b) deepSVG with its defaults on the bundled 2 mm volume inside its mask: wall time, iterations,
    CPU time, mean Dice and peak memory; the same on a synthetic cardiac ROI and on the 1 mm
    template; each with this tree's engine and with the engine of ``--baseline-ref`` (default
    1a33663, before issue 10's work) side by side (benchmarks/bench_deep.py, issue 10).
(c) Trained-model inference at 1 mm, before and after (a model trained quickly at 2 mm).
(d) Time against mask voxels (10^4 to 2*10^6) for em-gmm and deepsvg, plotted into
    docs/images/benchmark-scaling.png with the fitted log-log slope.
(e) The FLOPs of one deepSVG training iteration on the 2 mm sample (forward + backward, counted with
    ``torch.utils.flop_counter.FlopCounterMode``) and a large float32 matmul's FLOP rate measured in
    the same run.

Every case runs in a fresh subprocess; its peak memory is ``ru_maxrss`` at the end minus
``ru_maxrss`` after imports and loading the data (so it is the memory the algorithm adds).
Prints a table and writes ``docs/benchmarks.md``.

    python benchmarks/bench_engine.py [--output docs/benchmarks.md] [--skip-deep] [--skip-em]
        [--skip-scaling] [--skip-trained] [--baseline-ref REF | none] [--quick] [--from-results JSON]

``--quick`` runs every part on tiny stand-in inputs (one to two minutes; figures meaningless) into
out/benchmark-quick/ (or another ``--output``, never docs/benchmarks.md). Every run first saves its raw
figures (out/benchmark-results.json); ``--from-results`` writes the page from them again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "DeepGMMSegment"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import bench_deep  # noqa: E402  (benchmarks/ is on the path now)

SAMPLE_T1_2MM = REPO / "data" / "sample" / "mni152_2009_t1_2mm.nii.gz"
SAMPLE_MASK_2MM = REPO / "data" / "sample" / "mni152_2009_brainmask_2mm.nii.gz"
N_CLASSES = 3
REG_COVAR = 1e-4  # the engine's default variance floor; scikit-learn gets the same
MATMUL_SIZE = 4096

# Goals of issues 2 and 10 (reported against, never asserted).
GOAL_EM_SPEEDUP = 5.0
EM_NOISE = "noise 0.05"  # the evaluation's condition (evaluation/conditions.py) the EM runs on
SKLEARN_TOL = 1e-3  # GaussianMixture's default tol, the default of --tol

SCALING_IMAGE = REPO / "docs" / "images" / "benchmark-scaling.png"
QUICK_OUTPUT = REPO / "out" / "benchmark-quick"
QUICK_T1_ENV = "DEEPGMM_BENCH_T1"  # --quick: the T1 file part (a) reads instead of the 1 mm template


# ------------------------------------------------------------------------------------- data

def t1_1mm_path() -> Path:
    """The MNI152 2009a T1 at 1 mm: from benchmarks/mni_data.py, else extracted here."""
    if os.environ.get(QUICK_T1_ENV):
        return Path(os.environ[QUICK_T1_ENV])
    try:
        import mni_data
    except ImportError:
        return _extract_t1_from_nilearn_wheel(REPO / ".cache")
    return Path(mni_data.template_path_1mm("t1"))


def _extract_t1_from_nilearn_wheel(cache: Path) -> Path:
    """Fallback when mni_data.py is absent: the T1 member of nilearn's wheel, via pip download."""
    member = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    target = cache / "mni152" / "mni152_2009_t1_1mm.nii.gz"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("nilearn-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--quiet", "nilearn", "--dest", str(cache)], check=True)
        wheels = sorted(cache.glob("nilearn-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as archive:
        target.write_bytes(archive.read(member))
    return target


def write_quick_t1(directory: Path) -> Path:
    """--quick: the 2 mm sample block-averaged by 3 (about 10^4 brain voxels) as part (a)'s input file."""
    import SimpleITK as sitk
    image = sitk.BinShrink(sitk.ReadImage(str(SAMPLE_T1_2MM)), [3, 3, 3])
    path = directory / "quick_t1.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def _initial_parameters(x: np.ndarray) -> dict:
    """Means at quantiles; weights and covariances of the hard assignment to them (+ REG_COVAR)."""
    means = np.quantile(x[:, 0], [1 / 6, 1 / 2, 5 / 6])[:, None]
    assign = np.abs(x - means.T).argmin(axis=1)
    weights = np.bincount(assign, minlength=N_CLASSES) / len(x)
    covariances = np.stack([np.cov(x[assign == k].T, bias=True).reshape(1, 1) + REG_COVAR
                            for k in range(N_CLASSES)])
    return {"means": means, "weights": weights, "covariances": covariances}


def noisy_t1_1mm() -> tuple[np.ndarray, np.ndarray, str]:
    """(T1 + noise as float32, brain mask, the T1's file name): the evaluation's ``EM_NOISE`` condition."""
    import SimpleITK as sitk
    from evaluation import conditions
    t1_path = t1_1mm_path()
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(t1_path))).astype(np.float32)
    brain = volume > 0
    level = dict((name, noise) for name, noise, _ in conditions.T1_CONDITIONS)[EM_NOISE]
    sigma = level * conditions.intensity_range(volume, brain)
    return conditions.add_noise(volume, sigma, conditions.seed_for(EM_NOISE)), brain, t1_path.name


def prepare_data(directory: Path, tol: float) -> dict:
    volume, brain, name = noisy_t1_1mm()
    inside = volume[brain].astype(np.float64)
    centre, scale = inside.mean(), inside.std()
    x = ((inside - centre) / scale)[:, None]
    init = _initial_parameters(x)
    np.save(directory / "volume.npy", volume)
    np.save(directory / "brain.npy", brain)
    np.save(directory / "x.npy", x)
    np.savez(directory / "init.npz", **init, centre=centre, scale=scale)
    return {"t1_name": name, "shape": list(volume.shape), "brain_voxels": int(brain.sum()),
            "distinct_values": int(np.unique(inside).size), "tol": tol}


def _nll(directory: Path, weights, means, covariances) -> float:
    """Mean NLL per voxel of a mixture given in z-scored units, on the benchmark's z-scored voxels (float64)."""
    from evaluation import metrics
    return metrics.gmm_nll(np.load(directory / "x.npy"), np.asarray(weights, np.float64),
                           np.asarray(means, np.float64), np.asarray(covariances, np.float64))


# ------------------------------------------------------------------------------------- workers

_cpu_seconds = bench_deep.cpu_seconds
_rss_mib = bench_deep.rss_mib


def worker_sklearn(directory: Path, tol: float) -> dict:
    from sklearn.mixture import GaussianMixture
    x = np.load(directory / "x.npy")
    init = np.load(directory / "init.npz")
    baseline = _rss_mib()
    model = GaussianMixture(N_CLASSES, covariance_type="full", tol=tol, reg_covar=REG_COVAR,
                            max_iter=2000, weights_init=init["weights"], means_init=init["means"],
                            precisions_init=np.linalg.inv(init["covariances"]))
    start, cpu = time.perf_counter(), _cpu_seconds()
    model.fit(x)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    peak = _rss_mib() - baseline
    return {"seconds": seconds, "cpu_seconds": cpu, "n_iter": int(model.n_iter_),
            "converged": bool(model.converged_), "peak_mib": peak,
            "nll": _nll(directory, model.weights_, model.means_, model.covariances_)}


def worker_em_voxelwise(directory: Path, tol: float) -> dict:
    import torch
    from DeepGMMSegmentLib.core import em, gmm
    x = torch.from_numpy(np.load(directory / "x.npy").astype(np.float32))
    init = np.load(directory / "init.npz")
    log_weights = torch.log(torch.as_tensor(init["weights"], dtype=torch.float32))
    params = gmm.make_parameters(torch.as_tensor(init["means"], dtype=torch.float32),
                                 torch.as_tensor(init["covariances"], dtype=torch.float32), "full")
    baseline = _rss_mib()
    start, cpu = time.perf_counter(), _cpu_seconds()
    fit = em.fit_gmm(x, N_CLASSES, covariance_type="full", max_iter=2000, tol=tol,
                     reg_covar=REG_COVAR, generator=torch.Generator().manual_seed(0),
                     init=(log_weights, params), compress=False)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    peak = _rss_mib() - baseline
    return {"seconds": seconds, "cpu_seconds": cpu, "n_iter": fit.n_iter, "converged": fit.converged,
            "peak_mib": peak, "nll": _nll(directory, fit.weights.double().numpy(), fit.params.means.double().numpy(),
                                          fit.params.covariances.double().numpy())}


def worker_em_segment(directory: Path, tol: float) -> dict:
    from DeepGMMSegmentLib import segment
    volume = np.load(directory / "volume.npy")
    brain = np.load(directory / "brain.npy")
    init = np.load(directory / "init.npz")
    baseline = _rss_mib()
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = segment(volume, N_CLASSES, method="em-gmm", mask=brain, device="cpu", tol=tol,
                     max_iter=2000, reg_covar=REG_COVAR, covariance_type="full")
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    peak = _rss_mib() - baseline
    centre, scale = float(init["centre"]), float(init["scale"])  # intensities -> the benchmark's z-scores
    return {"seconds": seconds, "cpu_seconds": cpu, "n_iter": int(result.n_iter),
            "converged": bool(result.converged), "peak_mib": peak,
            "nll": _nll(directory, result.weights, (result.means - centre) / scale,
                        result.covariances / scale**2)}


def _load_sample_2mm():
    import SimpleITK as sitk
    image = sitk.ReadImage(str(SAMPLE_T1_2MM))
    volume = sitk.GetArrayFromImage(image).astype(np.float32)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_MASK_2MM))) > 0
    return volume, mask, tuple(reversed(image.GetSpacing()))


def worker_compute(directory: Path, tol: float) -> dict:  # noqa: ARG001
    """FLOPs and time of one deepSVG training iteration at full resolution, and a large matmul's FLOP rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from DeepGMMSegmentLib import segment
    volume, mask, spacing = _load_sample_2mm()

    def fit(max_iter: int) -> None:
        # coarse_network_voxels=0: every step with the network at 2 mm (the default fit runs most
        # of its steps on 4 mm blocks first, whose iterations cost about 1/8 as much)
        segment(volume, N_CLASSES, method="deepsvg", mask=mask, spacing=spacing, device="cpu",
                seed=0, max_iter=max_iter, min_iter=max_iter, warm_start="none", coarse_network_voxels=0)

    def flops_of(max_iter: int) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fit(max_iter)
        return int(counter.get_total_flops())

    def seconds_of(max_iter: int) -> float:
        start = time.perf_counter()
        fit(max_iter)
        return time.perf_counter() - start

    # Runs that differ by whole training iterations: the difference is those iterations (forward,
    # loss, backward, step), whatever the set-up and final inference cost.
    flops_per_iteration = flops_of(3) - flops_of(2)
    seconds_of(2)  # warm-up: oneDNN's first-call set-up
    seconds_per_iteration = (seconds_of(8) - seconds_of(3)) / 5

    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return {"flops_per_iteration": flops_per_iteration, "seconds_per_iteration": seconds_per_iteration,
            "matmul_flops_per_second": 2.0 * MATMUL_SIZE ** 3 / best,
            "torch_threads": torch.get_num_threads()}


WORKERS = {
    "sklearn": worker_sklearn,
    "em-voxelwise": worker_em_voxelwise,
    "em-segment": worker_em_segment,
    "compute": worker_compute,
}


def run_worker(case: str, directory: Path, tol: float) -> dict:
    """Run one case in a fresh interpreter; returns its JSON result."""
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", case, "--data", str(directory), "--tol", str(tol)],
        capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- report

def _cpuinfo_field(name: str) -> str | None:
    """The first ``name`` line's value in /proc/cpuinfo (None where there is none, e.g. not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_description() -> dict:
    import sklearn
    import torch
    cpu = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "sklearn": sklearn.__version__,
            "os": f"{platform.system()} {platform.release()}", "network_precision": network_precision()}


# The CPU features that decide the network's speed, widest first (/proc/cpuinfo flag names).
VECTOR_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def network_precision() -> str:
    """What the deep fits' convolutions run in on this CPU ("auto"), and the widest vector extension.

    The figures differ several-fold between the two (docs/speed.md, "Float32 on CPUs without native
    bfloat16"), so the page says which one it measured.
    """
    import torch
    from DeepGMMSegmentLib.core.networks import resolve_precision
    dtype = resolve_precision("auto", torch.device("cpu"))
    flags = (_cpuinfo_field("flags") or "").split()
    widest = next((flag for flag in VECTOR_FLAGS if flag in flags), "unknown")
    name = "bfloat16 (native)" if dtype == torch.bfloat16 else "float32 (no native bfloat16)"
    return f"{name}; widest vector extension: {widest}"


def compute_report(compute: dict, deep: dict | None) -> tuple[list, list]:
    """(console lines, markdown lines) of part (e): FLOPs per deepSVG iteration at 2 mm, achieved rate."""
    per_iteration = compute.get("seconds_per_iteration")
    timed = "an 8- and a 3-iteration fit in this worker"
    if per_iteration is None:  # results saved before the worker timed its own iterations
        fit = ((deep or {}).get("fits", {}).get("mni-2mm") or {}).get("after") or {}
        per_iteration, timed = fit.get("seconds_per_iteration"), "the 2 mm fit of (b), after"
    rows = [f"| FLOPs of one training iteration (forward + backward) | "
            f"{compute['flops_per_iteration'] / 1e9:.2f} GFLOP |",
            f"| float32 matmul {MATMUL_SIZE}×{MATMUL_SIZE} (same run, {compute['torch_threads']} threads) | "
            f"{compute['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s |"]
    console = [f"deepSVG at 2 mm: {compute['flops_per_iteration'] / 1e9:.2f} GFLOP per iteration; "
               f"{MATMUL_SIZE}² matmul {compute['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s"]
    if per_iteration:
        achieved = compute["flops_per_iteration"] / per_iteration
        fraction = achieved / compute["matmul_flops_per_second"]
        rows += [f"| time per training iteration ({timed}) | {per_iteration:.3f} s |",
                 f"| achieved FLOP rate | {achieved / 1e9:.2f} GFLOP/s |",
                 f"| achieved / matmul | **{fraction:.1%}** |"]
        console.append(f"  achieved {achieved / 1e9:.2f} GFLOP/s = {fraction:.1%} of the matmul's rate")
    md = ["## (e) Compute use of the deepSVG fit at 2 mm", "",
          "FLOPs and time of one training iteration of this tree's engine on the 2 mm sample with the "
          "network at full resolution (`coarse_network_voxels=0`, no warm start: the default fit runs most "
          "of its steps on 4 mm blocks first), and the FLOP rate they run at against a large float32 "
          "matmul measured in the same run.", "",
          "| figure | value |", "|---|---:|", *rows, ""]
    return console + [""], md


def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def em_report(info: dict, em: dict) -> tuple[list[str], list[str]]:
    """(console lines, markdown lines) of part (a): EM against scikit-learn on float data."""
    sk, vox, seg = em["sklearn"], em["em-voxelwise"], em["em-segment"]
    runs = [("scikit-learn `GaussianMixture.fit`", "scikit-learn", sk),
            ("our `em.fit_gmm`, every voxel", "em.fit_gmm every voxel", vox),
            ("our `segment(method=\"em-gmm\")`, whole pipeline", "segment(em-gmm)", seg)]
    md = ["## (a) EM against scikit-learn `GaussianMixture` on float data", "",
          f"Data: MNI152 2009a T1, 1 mm (`{info['t1_name']}`, {' × '.join(map(str, info['shape']))}) "
          f"with Gaussian noise ({EM_NOISE} of the intensity range, evaluation/conditions.py), brain = T1 > 0: "
          f"**{info['brain_voxels']:,} voxels**, {info['distinct_values']:,} distinct intensities (nothing to "
          f"compress), z-scored inside the brain; {N_CLASSES} classes, full covariance, variance floor "
          f"{REG_COVAR:g}. **Equal tolerance**: every run stops when the mean log-likelihood per voxel, "
          f"measured in the E-step, changes by less than {info['tol']:g} (scikit-learn's rule and, by "
          "default, its tol). scikit-learn and `em.fit_gmm` start from the same parameters (means at the "
          "1/6, 1/2, 5/6 quantiles, weights and covariances of the hard assignment); `segment` runs its "
          "own 10 k-means++ starts. **Equal NLL** is checked: every run's final mixture is evaluated by one "
          "float64 function on the same z-scored voxels.", "",
          "| run | wall time (s) | CPU time (s) | iterations | final NLL / voxel | peak memory (MiB) "
          "| speed-up (wall) | speed-up (CPU) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    console = [f"EM, MNI 1 mm + {EM_NOISE}, {info['brain_voxels']:,} brain voxels, K={N_CLASSES}, "
               f"full covariance, tol {info['tol']:g}",
               f"{'run':<26}{'wall s':>9}{'CPU s':>9}{'iter':>6}{'NLL/voxel':>13}{'peak MiB':>10}{'speed-up':>10}"]
    for name, short, r in runs:
        ratio, cpu_ratio = sk["seconds"] / r["seconds"], sk["cpu_seconds"] / r["cpu_seconds"]
        md.append(f"| {name} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['n_iter']} | {r['nll']:.6f} | "
                  f"{r['peak_mib']:.0f} | {ratio:.1f}× | {cpu_ratio:.1f}× |")
        console.append(f"{short:<26}{r['seconds']:>9.2f}{r['cpu_seconds']:>9.2f}{r['n_iter']:>6}{r['nll']:>13.6f}"
                       f"{r['peak_mib']:>10.0f}{ratio:>9.1f}x")
    md += ["", f"Goal (issue 10): em-gmm at least {GOAL_EM_SPEEDUP:g}× faster than scikit-learn at equal "
           "tolerance and equal NLL, with a lower peak memory."]
    for name, _, r in runs[1:]:
        ratio, gap = sk["seconds"] / r["seconds"], r["nll"] - sk["nll"]
        md.append(f"* {name}: {ratio:.1f}× in wall time ({_mark(ratio >= GOAL_EM_SPEEDUP)}), "
                  f"{sk['cpu_seconds'] / r['cpu_seconds']:.1f}× in CPU time; NLL {gap:+.1e} against "
                  f"scikit-learn's ({_mark(gap <= 1e-4)}: at most 1e-4 worse); peak memory {r['peak_mib']:.0f} "
                  f"vs {sk['peak_mib']:.0f} MiB ({_mark(r['peak_mib'] < sk['peak_mib'])}).")
    md += ["", "Our EM sweeps the voxels in blocks of 32,768: one pass per iteration computes the "
           "posteriors, the log-likelihood and the M-step's sums together (float32 per voxel, float64 "
           "sums); scikit-learn makes several float64 passes over (voxels × classes) arrays. `segment` "
           "adds its 10 starts (on a 20,000-voxel subsample), the normalisation and the label and "
           "probability maps of the whole volume.", ""]
    return console + [""], md


def build_report(info: dict, em: dict | None, deep: dict | None, compute: dict | None,
                 machine: dict, load: tuple[tuple[float, ...], tuple[float, ...]],
                 date: str, image: Path = SCALING_IMAGE,
                 page: Path = REPO / "docs" / "benchmarks.md", quick: bool = False) -> tuple[str, str]:
    """(console table, markdown document); ``deep`` is bench_deep.run_all's result, its plot goes to ``image``."""
    lines_console, md = [], []
    md += ["# Engine benchmark", "",
           f"Produced by `benchmarks/bench_engine.py` (`make benchmark`) on {date}.", "",
           *([bench_deep.QUICK_BANNER, ""] if quick else []),
           "## Machine", "",
           f"* CPU: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM, "
           f"no GPU used; {machine['os']}",
           f"* Python {machine['python']}, torch {machine['torch']}, numpy {machine['numpy']}, "
           f"scikit-learn {machine['sklearn']}",
           "* The deep fits' convolutions (`precision=\"auto\"`): "
           f"{machine.get('network_precision', 'not recorded')}",
           f"* Load average (1, 5, 15 min) at the start: {', '.join(f'{v:.2f}' for v in load[0])}; "
           f"at the end: {', '.join(f'{v:.2f}' for v in load[1])}. The machine was shared with "
           "other work; a load above the core count slows every figure below.",
           ""]
    if em is not None:
        console, section = em_report(info, em)
        lines_console += console
        md += section
    if deep is not None:
        console, section = bench_deep.report(deep, image, page)
        lines_console += console
        md += section
    if compute is not None:
        console, section = compute_report(compute, deep)
        lines_console += console
        md += section
    md += ["## Method", "",
           "Each run is a fresh Python process; peak memory is `ru_maxrss` at its end minus "
           "`ru_maxrss` after imports and loading its input, i.e. what the algorithm adds. "
           "Times are wall-clock `time.perf_counter()` around the call; CPU time is the "
           "process's user + system time over the same call (all threads; on an otherwise idle "
           "2-core machine wall time is about CPU time / 2, under other load wall time grows "
           "while CPU time stays roughly put). FLOPs are counted by "
           "`torch.utils.flop_counter.FlopCounterMode` as the difference between a 3- and a "
           "2-iteration fit (so set-up and inference cancel out), and the time of one in (e) likewise "
           "from an 8- and a 3-iteration fit; the seconds per iteration of (b) come from the progress "
           "callback's timestamps in the full fit. The engine before (b, c) is "
           "the package `DeepGMMSegmentLib` of the baseline commit, extracted with `git archive` "
           "and imported in place of this tree's by the same benchmark code.", "",
           *bench_deep.GPU_CHECK_DOC]
    return "\n".join(lines_console), "\n".join(md)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"),
                        help="markdown file to write (default: docs/benchmarks.md)")
    parser.add_argument("--tol", type=float, default=SKLEARN_TOL,
                        help="EM stopping tolerance of part (a), for scikit-learn and ours alike: change of "
                             f"the mean log-likelihood per voxel (default: scikit-learn's {SKLEARN_TOL:g})")
    parser.add_argument("--skip-em", action="store_true", help="skip part (a)")
    parser.add_argument("--skip-deep", action="store_true", help="skip parts (b) to (e)")
    parser.add_argument("--skip-trained", action="store_true", help="skip part (c), the trained model")
    parser.add_argument("--skip-scaling", action="store_true", help="skip part (d), the scaling curve")
    parser.add_argument("--baseline-ref", default=bench_deep.DEFAULT_BASELINE_REF, metavar="REF",
                        help="git commit whose engine is run beside this tree's in (b) and (c) "
                             f"(default: {bench_deep.DEFAULT_BASELINE_REF}, before issue 10; 'none': no baseline)")
    parser.add_argument("--baseline-skip", default="", metavar="INPUTS",
                        help="comma-separated inputs of (b) that only this tree's engine fits, e.g. mni-1mm "
                             f"(choices: {', '.join(bench_deep.DEEP_INPUTS)})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny inputs and few iterations: every code path in one to two minutes, figures "
                             f"meaningless; writes into {QUICK_OUTPUT.relative_to(REPO)}/, never docs/")
    parser.add_argument("--from-results", metavar="JSON",
                        help="write the page from the raw results a run saved (out/benchmark-results.json) "
                             "without measuring anything")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(WORKERS[args.worker](Path(args.data), args.tol)))
        return 0

    if args.from_results:
        return write_page(json.loads(Path(args.from_results).read_text()), args.output)
    baseline = None if args.baseline_ref.lower() == "none" else args.baseline_ref
    baseline_skip = tuple(name for name in args.baseline_skip.split(",") if name)
    unknown = sorted(set(baseline_skip) - set(bench_deep.DEEP_INPUTS))
    if unknown:
        parser.error(f"--baseline-skip: unknown input(s) {', '.join(unknown)}; "
                     f"choose from {', '.join(bench_deep.DEEP_INPUTS)}")
    if baseline:
        try:
            bench_deep.resolve_commit(baseline)  # a bad ref fails now, not after the EM part
        except ValueError as error:
            parser.error(str(error))
    load_start = os.getloadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    em = deep = compute = None
    with tempfile.TemporaryDirectory(prefix="deepgmm-bench-") as scratch:
        directory = Path(scratch)
        if args.quick:
            os.environ[QUICK_T1_ENV] = str(write_quick_t1(directory))
        info = prepare_data(directory, args.tol)
        if not args.skip_em:
            em = {}
            for case in ("sklearn", "em-voxelwise", "em-segment"):
                print(f"running {case} ...", file=sys.stderr, flush=True)
                em[case] = run_worker(case, directory, args.tol)
        if not args.skip_deep:
            deep = bench_deep.run_all(args.quick, baseline, scaling=not args.skip_scaling, baseline_skip=baseline_skip,
                                      trained=not args.skip_trained)
            print("running compute ...", file=sys.stderr, flush=True)
            compute = run_worker("compute", directory, args.tol)
    results = {"info": info, "em": em, "deep": deep, "compute": compute, "machine": machine_description(),
               "load": (load_start, os.getloadavg()), "date": date, "quick": args.quick}
    # The raw figures first: a page that fails to render costs no re-run (--from-results).
    saved = (QUICK_OUTPUT / "results.json") if args.quick else (REPO / "out" / "benchmark-results.json")
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=1))
    print(f"saved the raw results in {saved}", file=sys.stderr)
    return write_page(results, args.output)


def write_page(results: dict, output: str) -> int:
    """Print the console table and write the markdown page (and the scaling plot beside it) from a run's
    results; a quick run's figures never replace docs/benchmarks.md (they go to out/benchmark-quick/)."""
    output = Path(output)
    if results["quick"] and output.resolve() == (REPO / "docs" / "benchmarks.md").resolve():
        output = QUICK_OUTPUT / "benchmarks.md"
    image = output.parent / "images" / SCALING_IMAGE.name
    console, markdown = build_report(results["info"], results["em"], results["deep"], results["compute"],
                                     results["machine"], results["load"], results["date"], image, output,
                                     results["quick"])
    print(console)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown + "\n")
    deep = results["deep"]
    print(f"wrote {output}" + (f" and {image}" if deep and deep["scaling"] else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    voxel-iterations per second, the FLOPs of one training iteration (forward + backward, counted
    with ``torch.utils.flop_counter.FlopCounterMode``) and the achieved FLOP rate as a fraction of
    a large float32 matmul's rate measured in the same run; peak memory.

Every case runs in a fresh subprocess; its peak memory is ``ru_maxrss`` at the end minus
``ru_maxrss`` after imports and loading the data (so it is the memory the algorithm adds).
Prints a table and writes ``docs/benchmarks.md``.

    python benchmarks/bench_engine.py [--output docs/benchmarks.md] [--skip-deep] [--skip-em]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
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

SAMPLE_T1_2MM = REPO / "data" / "sample" / "mni152_2009_t1_2mm.nii.gz"
SAMPLE_MASK_2MM = REPO / "data" / "sample" / "mni152_2009_brainmask_2mm.nii.gz"
N_CLASSES = 3
REG_COVAR = 1e-4  # the engine's default variance floor; scikit-learn gets the same
MATMUL_SIZE = 4096

# Goals of issues 2 and 10 (reported against, never asserted).
GOAL_EM_SPEEDUP = 5.0
EM_NOISE = "noise 0.05"  # the evaluation's condition (evaluation/conditions.py) the EM runs on
SKLEARN_TOL = 1e-3  # GaussianMixture's default tol, the default of --tol
GOAL_DEEPSVG_SECONDS = 60.0


# ------------------------------------------------------------------------------------- data

def t1_1mm_path() -> Path:
    """The MNI152 2009a T1 at 1 mm: from benchmarks/mni_data.py, else extracted here."""
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

def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): less sensitive to other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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


def worker_deepsvg(directory: Path, tol: float) -> dict:  # noqa: ARG001 - deep defaults
    from DeepGMMSegmentLib import segment
    volume, mask, spacing = _load_sample_2mm()
    stamps: list[tuple[int, float]] = []

    def progress(iteration, max_iterations, nll, elapsed):  # noqa: ARG001
        stamps.append((iteration, time.perf_counter()))

    baseline = _rss_mib()
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = segment(volume, N_CLASSES, method="deepsvg", mask=mask, spacing=spacing,
                     device="cpu", seed=0, progress=progress)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    peak = _rss_mib() - baseline
    # The progress callback runs once per training iteration; iterations 1..n of the main loop
    # are the last n stamps (a warm start may report its own iterations before them).
    loop = stamps[-result.n_iter:]
    per_iteration = ((loop[-1][1] - loop[0][1]) / (len(loop) - 1)) if len(loop) > 1 else float("nan")
    return {"seconds": seconds, "cpu_seconds": cpu, "n_iter": int(result.n_iter),
            "converged": bool(result.converged),
            "nll": float(result.nll_history[-1]), "peak_mib": peak,
            "seconds_per_iteration": per_iteration, "mask_voxels": int(mask.sum()),
            "volume_voxels": int(mask.size), "before_loop_seconds": loop[0][1] - start}


def worker_compute(directory: Path, tol: float) -> dict:  # noqa: ARG001
    """FLOPs of one deepSVG training iteration, and a large matmul's FLOP rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from DeepGMMSegmentLib import segment
    volume, mask, spacing = _load_sample_2mm()

    def flops_of(max_iter: int) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            segment(volume, N_CLASSES, method="deepsvg", mask=mask, spacing=spacing, device="cpu",
                    seed=0, max_iter=max_iter, min_iter=max_iter, warm_start="none")
        return int(counter.get_total_flops())

    # Two runs that differ by exactly one training iteration: the difference is that iteration
    # (forward, loss, backward), whatever the set-up and final inference cost.
    flops_per_iteration = flops_of(3) - flops_of(2)

    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return {"flops_per_iteration": flops_per_iteration,
            "matmul_flops_per_second": 2.0 * MATMUL_SIZE ** 3 / best,
            "torch_threads": torch.get_num_threads()}


WORKERS = {
    "sklearn": worker_sklearn,
    "em-voxelwise": worker_em_voxelwise,
    "em-segment": worker_em_segment,
    "deepsvg": worker_deepsvg,
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

def machine_description() -> dict:
    import sklearn
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "sklearn": sklearn.__version__,
            "os": f"{platform.system()} {platform.release()}"}


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
                 date: str) -> tuple[str, str]:
    """(console table, markdown document)."""
    lines_console, md = [], []
    md += ["# Engine benchmark", "",
           f"Produced by `benchmarks/bench_engine.py` (`make benchmark`) on {date}.", "",
           "## Machine", "",
           f"* CPU: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM, "
           f"no GPU used; {machine['os']}",
           f"* Python {machine['python']}, torch {machine['torch']}, numpy {machine['numpy']}, "
           f"scikit-learn {machine['sklearn']}",
           f"* Load average (1, 5, 15 min) at the start: {', '.join(f'{v:.2f}' for v in load[0])}; "
           f"at the end: {', '.join(f'{v:.2f}' for v in load[1])}. The machine was shared with "
           "other work; a load above the core count slows every figure below.",
           ""]
    if em is not None:
        console, section = em_report(info, em)
        lines_console += console
        md += section
    if deep is not None:
        voxel_iterations = deep["mask_voxels"] / deep["seconds_per_iteration"]
        md += ["## (b) deepSVG fit on the 2 mm sample", "",
               f"`segment(method=\"deepsvg\")` with its defaults on "
               f"`data/sample/mni152_2009_t1_2mm.nii.gz` inside its brain mask "
               f"({deep['mask_voxels']:,} of {deep['volume_voxels']:,} voxels), 3 classes, CPU.", "",
               "| figure | value |", "|---|---:|",
               f"| wall time of the whole fit | **{deep['seconds']:.1f} s** |",
               f"| CPU time of the whole fit (all threads) | {deep['cpu_seconds']:.1f} s |",
               f"| of which before the first training iteration (EM warm start, set-up) | "
               f"{deep['before_loop_seconds']:.1f} s |",
               f"| training iterations (converged: {deep['converged']}) | {deep['n_iter']} |",
               f"| time per training iteration | {deep['seconds_per_iteration']:.3f} s |",
               f"| throughput (mask voxels × iterations / s) | {voxel_iterations:,.0f} |",
               f"| final NLL / voxel | {deep['nll']:.4f} |",
               f"| peak memory | {deep['peak_mib']:.0f} MiB |"]
        if compute is not None:
            achieved = compute["flops_per_iteration"] / deep["seconds_per_iteration"]
            fraction = achieved / compute["matmul_flops_per_second"]
            md += [f"| FLOPs of one training iteration (forward + backward) | "
                   f"{compute['flops_per_iteration'] / 1e9:.2f} GFLOP |",
                   f"| achieved FLOP rate | {achieved / 1e9:.2f} GFLOP/s |",
                   f"| float32 matmul {MATMUL_SIZE}×{MATMUL_SIZE} (same run, "
                   f"{compute['torch_threads']} threads) | "
                   f"{compute['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s |",
                   f"| achieved / matmul | **{fraction:.1%}** |"]
        md += ["",
               f"Goal (issue 2): a full fit in at most {GOAL_DEEPSVG_SECONDS:g} s on 2 CPU cores: "
               f"{deep['seconds']:.1f} s ({_mark(deep['seconds'] <= GOAL_DEEPSVG_SECONDS)}).",
               ""]
        lines_console += [
            "deepSVG, MNI 2 mm sample",
            f"  wall time {deep['seconds']:.1f} s (CPU {deep['cpu_seconds']:.1f} s; "
            f"{deep['n_iter']} iterations, "
            f"{deep['seconds_per_iteration']:.3f} s each; {deep['before_loop_seconds']:.1f} s "
            "before the first), "
            f"{voxel_iterations:,.0f} voxel-iterations/s, peak {deep['peak_mib']:.0f} MiB"]
        if compute is not None:
            lines_console.append(
                f"  {compute['flops_per_iteration'] / 1e9:.2f} GFLOP per iteration, "
                f"{achieved / 1e9:.2f} GFLOP/s achieved = {fraction:.1%} of a "
                f"{MATMUL_SIZE}² matmul ({compute['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s)")
    md += ["## Method", "",
           "Each run is a fresh Python process; peak memory is `ru_maxrss` at its end minus "
           "`ru_maxrss` after imports and loading its input, i.e. what the algorithm adds. "
           "Times are wall-clock `time.perf_counter()` around the call; CPU time is the "
           "process's user + system time over the same call (all threads; on an otherwise idle "
           "2-core machine wall time is about CPU time / 2, under other load wall time grows "
           "while CPU time stays roughly put). FLOPs are counted by "
           "`torch.utils.flop_counter.FlopCounterMode` as the difference between a 3- and a "
           "2-iteration fit (so set-up and inference cancel out); the time per iteration comes "
           "from the progress callback's timestamps in the full fit.", ""]
    return "\n".join(lines_console), "\n".join(md)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"),
                        help="markdown file to write (default: docs/benchmarks.md)")
    parser.add_argument("--tol", type=float, default=SKLEARN_TOL,
                        help="EM stopping tolerance of part (a), for scikit-learn and ours alike: change of "
                             f"the mean log-likelihood per voxel (default: scikit-learn's {SKLEARN_TOL:g})")
    parser.add_argument("--skip-em", action="store_true", help="skip part (a)")
    parser.add_argument("--skip-deep", action="store_true", help="skip part (b)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(WORKERS[args.worker](Path(args.data), args.tol)))
        return 0

    load_start = os.getloadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    em = deep = compute = None
    with tempfile.TemporaryDirectory(prefix="deepgmm-bench-") as scratch:
        directory = Path(scratch)
        info = prepare_data(directory, args.tol)
        if not args.skip_em:
            em = {}
            for case in ("sklearn", "em-voxelwise", "em-segment"):
                print(f"running {case} ...", file=sys.stderr, flush=True)
                em[case] = run_worker(case, directory, args.tol)
        if not args.skip_deep:
            for case in ("deepsvg", "compute"):
                print(f"running {case} ...", file=sys.stderr, flush=True)
                result = run_worker(case, directory, args.tol)
                if case == "deepsvg":
                    deep = result
                else:
                    compute = result
    console, markdown = build_report(info, em, deep, compute, machine_description(),
                                     (load_start, os.getloadavg()), date)
    print(console)
    Path(args.output).write_text(markdown + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

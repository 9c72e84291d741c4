"""The vocabulary of every surface: method names, settings with their defaults, their validation.

Torch-free, so the command line's ``--help``, the Slicer panel and the parameter node read it
without loading torch. Each default is written here once, with the measurement that chose it:

* :class:`EMSettings` (classic EM: ``em-gmm``, ``em-svgmm``), :class:`DeepSettings` (the per-image
  deep fit: ``deepg``, ``deepsvg``) and :class:`TrainingSettings` (:func:`.training.train`);
* :func:`resolve_options` fills a request's missing options with the method's defaults and checks
  every value against :data:`PARAMETER_CONSTRAINTS`, in the manner of scikit-learn's
  ``_parameter_constraints``, with messages that say what to do;
* :func:`parse_prior_means` is the one text syntax of prior class means: ``;`` between classes,
  ``,`` or ``:`` between the channels of a class (``"30,200; 80,120; 110,60"``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "BIAS_FIELD_CHOICES", "COVARIANCE_TYPES", "DEEP_METHODS", "DEFAULT_BIAS_FIELD", "DEFAULT_BIAS_FIELD_ORDER", "MAX_BIAS_FIELD_ORDER", "DEFAULT_METHOD", "DEFAULT_SMOOTHNESS", "DeepSettings", "EMSettings",
    "EM_METHODS", "METHODS", "NETWORKS", "PARAMETER_CONSTRAINTS", "PRECISIONS", "TrainingSettings", "WARM_STARTS",
    "COARSE_NETWORK_VOXELS", "FULL_RESOLUTION_LAYERS", "FULL_RESOLUTION_ITER", "LOSS_GRID", "WARM_START_SCHEDULE",
    "LABEL_GLOBAL_WEIGHT_NOISY", "LABEL_MRF", "LABEL_MRF_ITER", "LABEL_NOISE_FULL_NETWORK",
    "adaptive_smoothness", "check_class_names", "check_value", "detects_bias_field", "is_anchored",
    "label_prior_exponents",
    "parse_prior_means", "resolve_bias_field_order", "resolve_loss_grid", "resolve_options", "resolve_warm_start",
]

# ----------------------------------------------------------------------------- names

#: Every method, the default first. The CLI choices, the Slicer enum and the panel labels derive from it.
METHODS = ("deepsvg", "deepg", "em-gmm", "em-svgmm")
DEEP_METHODS = ("deepg", "deepsvg")
EM_METHODS = ("em-gmm", "em-svgmm")
DEFAULT_METHOD = METHODS[0]
COVARIANCE_TYPES = ("full", "diag")
PRECISIONS = ("auto", "float32", "bfloat16")
NETWORKS = ("auto", "2d", "3d")
WARM_STARTS = ("em", "em-head", "none")

# ----------------------------------------------------------------------------- defaults

# Variance floor added to every covariance, in normalised units (each channel has unit variance
# inside the mask after the z-score), so a class can never collapse onto one intensity.
REG_COVAR = 1e-4
# Gradient-norm clip of every network optimiser step (per-image fit and training).
GRADIENT_CLIP = 12.0
# Learning rate of the per-image steps of ``fine_tune`` (smaller than a fresh fit's: the trained
# weights are already close to a good solution).
FINE_TUNE_LEARNING_RATE = 1e-3
# Weight of the explicit spatial prior when the caller gives none. deepsvg: 0.3, measured on the
# 2 mm MNI T1 at learning rate 3e-3 (mean Dice 0.904 clean / 0.858 at noise 0.10, against
# 0.873 / 0.730 without it; 0.878 / 0.863 at the current 1e-2;
# docs/evaluation.md has the current figures). deepg: 0, because its per-voxel probabilities enter
# the likelihood only through the M-step, so the prior alone pulls them towards one spatially
# constant mixture (measured: mean Dice 0.43 on the clean 2 mm T1 with 0.3).
DEFAULT_SMOOTHNESS = {"deepsvg": 0.3, "deepg": 0.0}
# The distillation of the EM start (warm_start="em") when warm_start_iter / warm_start_learning_rate
# are "auto": (at most this many steps, Adam's rate; None = the fit's own Adam throughout), for a free
# fit and for one whose classes prior means or seeds anchor. deepsvg, seeds 0 and 1, one thread
# (docs/speed.md, "A shorter, faster distillation"): 40 steps at 3e-2 against 100 at 1e-2 took the six
# free cardiac phantom fits from 0.539 to 0.582 (seed 1: 0.518 -> 0.567) in about 0.75x the CPU time,
# the 2 mm MNI inputs moved by -0.004..+0.008 in 0.5-1.0x the steps, 80 stress cases 0.9843 -> 0.9833,
# the clean 1 mm template 0.812 -> 0.796 (0.808 -> 0.793). Anchored, it lowered the cardiac fits
# (make evaluate: deepsvg + seeds 0.678 -> 0.668, + prior means 0.746 -> 0.704), so they keep 100 at 1e-2.
WARM_START_SCHEDULE = {"free": (40, 3e-2), "anchored": (100, None)}
# label_mrf (DeepSettings): deepsvg's labels come from the fitted model's posterior under a Potts
# prior of this strength per neighbour, LABEL_MRF_ITER mean-field steps (core.label_mrf). A voxel's
# prior is w_k^b * pi_vk^a, (a, b) = label_prior_exponents(noise): the global weights w alone (a = 0,
# b = 1) up to SMOOTHNESS_NOISE_FLOOR (clean images: the voxel's own likelihood keeps thin
# structures); from LABEL_NOISE_FULL_NETWORK on the network's weights pi (a = 1, noisy images need
# its spatial weights) with the global ones at LABEL_GLOBAL_WEIGHT_NOISY; linear in between.
# Measured on deepsvg fits (defaults, seed 0, engine 5fd7592) relabelled offline, mean Dice, network
# output -> (a, b) = (0, 1) / (1, 1) / (1, 0.5) / (1, 0) (docs/thin-structures.md, "Labels from the
# fitted model"): 2 mm MNI clean 0.908 -> 0.939 / 0.925; shifted grid 0.907 -> 0.935 / 0.923; bias
# 20 % 0.889 -> 0.919 / 0.906; phantom 0.886 -> 0.915 / 0.902; 1 mm clean 0.802 -> 0.848 / 0.824;
# noise 0.05 (noise level 0.36, a = 0) 0.905 -> 0.920 / 0.919; noisy images (a = 1): 2 mm noise 0.10
# 0.880 -> 0.841 / 0.878 / 0.889 / 0.896 (seed 1: 0.879 -> - / 0.866 / 0.877 / 0.882), shifted 0.883
# -> 0.852 / 0.876 / 0.881 / 0.883 (seed 1: 0.880 -> - / 0.870 / 0.878 / 0.884), noise 0.10 + bias 40 %
# 0.804 -> - / 0.788 / 0.798 / 0.805, 1 mm noise 0.10 0.875 -> 0.870 / 0.905 / 0.895 / 0.878, six
# cardiac phantom cases (noise 0.45-0.58) 0.718 -> 0.692 / 0.730 / 0.726 / 0.718.
LABEL_MRF = 0.5
LABEL_MRF_ITER = 10
LABEL_NOISE_FULL_NETWORK = 0.54
LABEL_GLOBAL_WEIGHT_NOISY = 0.5
# full_resolution_iter="auto" (DeepSettings): steps of a coarse-to-fine fit's fine phase, by the grid the
# network runs on there. Network pooled (a 1 mm brain, the network on 2 mm blocks), measured on the
# 1 mm MNI T1 (deepsvg, one thread, seed 0; mean Dice clean / noise 0.10, CPU seconds) when the coarse
# phase ran on 2 mm blocks: the fit before coarse to fine (network on the pooled grid, every step's
# loss at full resolution) 0.759 / 0.856, 265 / 318 s; 30 steps 0.758 / 0.852, 156 / 168 s; 60 steps
# 0.776 / 0.859, 214 / 222 s; the 30 stopped on the NLL rule instead ended after a few steps, 0.836
# under noise. With the coarse phase on 4 mm blocks (coarse_network_voxels 2^17): clean 0.786 with 30,
# 0.801 with 60. Network at full resolution (the 2 mm MNI): 30 and 60 steps give the same mean Dice
# over six fits (clean, noise 0.05 with two seeds, noise 0.10, phantom with two seeds: 0.8924 against
# 0.8926), so 30, at about 0.6x the CPU time of 60. Those are deepsvg's. deepg keeps its EM start on a
# 1 mm brain, and its 60 pooled steps (the loss on every voxel, about 1.4 s each) were most of its fit:
# with 30, mean Dice on the 1 mm MNI (seed 0, engine a9d91d1; docs/speed.md, "deepg fitted coarse to
# fine") clean 0.8266, noise 0.05 0.8206, noise 0.10 0.7343, +-20 % field 0.8141, +-40 % 0.8139 (each the
# same as with 60), noise 0.10 + 40 % 0.6725 against 0.6549, in 32-58 s against 46-96 s.
FULL_RESOLUTION_ITER = {
    "deepsvg": {"network at full resolution": 30, "network pooled": 60},
    "deepg": {"network at full resolution": 30, "network pooled": 30},
}
# full_resolution_layers="auto" (DeepSettings): what the fine phase trains, by the same grid. "last": the
# last decoder block and the output layer on features computed once; "all": the whole network every
# step. deepsvg, one thread, seeds 0 / 1 (docs/speed.md, "The fine phase trains the last level"):
# network at full resolution (the 2 mm MNI), eleven fits, mean Dice 0.8926 ("all") -> 0.8917 ("last")
# in 0.62x the CPU time; network pooled (the 1 mm MNI, on 2 mm blocks), clean 0.801 -> 0.790 for
# only 0.87x, since the loss on every 1 mm voxel is most of a step there.
FULL_RESOLUTION_LAYERS = {"network at full resolution": "last", "network pooled": "all"}
# coarse_network_voxels when the caller gives none (DeepSettings, where deepsvg's figures are). deepg
# too in engines after 88dd074 (docs/speed.md, "deepg fitted coarse to fine"): on twelve fits (2 mm MNI
# clean with seeds 0 and 1, noise 0.05, noise 0.10, +-40 % field, the shifted grid clean and noisy, the
# three-channel phantom with seeds 0 and 1; 1 mm clean, noise 0.10, +-40 % field) every mean Dice was
# the same to three decimals, and the 2 mm fits took 13-23 s instead of 26-86 s. Before that deepg kept
# 0: with 2^17 and the whole network trained in the fine phase its clean 2 mm fit in make evaluate had
# fallen from 0.872 to 0.807 (it left the EM start for another optimum).
COARSE_NETWORK_VOXELS = {"deepsvg": 2**17, "deepg": 2**17}
# loss_grid="auto" (DeepSettings): where a fit whose network cannot run on the crop itself (a 1 mm
# brain: more than max_network_voxels) computes its loss. "voxels": the fine phase's loss on every
# voxel, the network's logits interpolated; "network": the whole fit on the network's own grid (the
# crop averaged over blocks, fitted like a 2 mm image), its probabilities then interpolated to the
# voxels and the Gaussians taken from them over the voxels (core.deep._fit_on_network_grid).
# deepsvg, defaults otherwise (label_mrf 0.5), seed 0, 1 mm MNI, mean Dice "voxels" -> "network"
# (noise level; docs/thin-structures.md, "1 mm: the fit on the network's grid"): clean (0.12) 0.848
# -> 0.912, noise 0.05 (0.35) 0.885 -> 0.910, +-40 % field (0.09) 0.818 -> 0.882, three-channel
# phantom (0.25) 0.870 -> 0.890, noise 0.10 + 40 % field (0.45) 0.844 -> 0.848, but noise 0.10 (0.56)
# 0.891 -> 0.869 (seeds 1, 2: 0.877, 0.870): where the labels lean on the network's weights alone
# (LABEL_NOISE_FULL_NETWORK) the network must see the voxels, so deepsvg's "auto" is "voxels" from
# that noise level on (resolve_loss_grid). The fit takes 32-54 s instead of 130-420 s (not quiet).
# The block fit's own Gaussians instead of those over the voxels: clean 0.872, noise 0.05 0.846.
# Not adopted for the noisy images: the "network" fit continued for 15 or 30 steps with the loss on
# every voxel (the network still on the blocks). Noise 0.10: 0.880 / 0.885 (seed 0), 0.891 with 30
# (seed 1), against "voxels" 0.891 / 0.892, in about 0.65x its time (85 s quiet against 130-141 s, so
# still above a minute). On the clean template 15 such steps fall to 0.835 (the voxel loss's CSF).
# deepg keeps "voxels": with "network" (seed 0) clean 0.683 against 0.827, noise 0.10 0.729 against
# 0.734, +-40 % field 0.699 against 0.812.
LOSS_GRID = {"deepsvg": "network", "deepg": "voxels"}
# deepsvg's smoothness when the caller gives none: DEFAULT_SMOOTHNESS up to a noise level of
# SMOOTHNESS_NOISE_FLOOR (core.inputs.noise_level: the least noisy channel's voxel noise in units
# of its standard deviation in the mask), then SMOOTHNESS_PER_NOISE more per unit of noise, at most
# MAX_ADAPTIVE_SMOOTHNESS. Noisier images need a stronger prior, clean ones keep thin structures.
# Measured with deepsvg, seed 0, engine b18320e (docs/thin-structures.md, "Smoothness from the
# noise"): mean Dice at beta 0.2 / 0.3 / 0.5 on the 2 mm MNI clean (noise 0.19) 0.880 / 0.876 /
# 0.860, shifted grid 0.875 / 0.879 / 0.859, phantom (0.31) 0.863 / 0.862 / 0.837, noise 0.05
# (0.36) 0.883 / 0.891 / 0.889, noise 0.10 (0.54) 0.838 / 0.861 / 0.873 and shifted 0.828 /
# 0.861 / 0.869; the six cardiac phantom cases (0.45-0.58) 0.517 at 0.3, 0.544 at 0.5, 0.545 at 0.8.
# Fits whose classes prior means or seeds anchor keep DEFAULT_SMOOTHNESS (engine._default_smoothness):
# on the cardiac phantom's first 3 cases the noise-chosen weight lowered them (docs/evaluation.md,
# engine b9d70e9 against 6a205eb: with mu_data 0.746 -> 0.725, with seeds 0.685 -> 0.673).
SMOOTHNESS_NOISE_FLOOR = 0.36
SMOOTHNESS_PER_NOISE = 0.2 / 0.18
MAX_ADAPTIVE_SMOOTHNESS = 0.8
# Basis order of the joint bias field for bias_field="auto" (core/bias_field.py), chosen by
# measurement (docs/bias-field.md, "Choosing the default order"): mean Dice CSF/GM/WM of the joint
# fit, K = 3, on the 2 mm MNI T1 (clean; +-20 % and +-40 % quadratic fields of
# evaluation/conditions.py, evaluation seed and another) and on the three-channel phantom with a
# different +-40 % field per channel. Order 2 / 3 / 4: clean 0.860 / 0.882 / 0.875 (em-gmm 0.872);
# 20 % 0.877 / 0.885 / 0.872 and 0.866 / 0.885 / 0.875; 40 % 0.879 / 0.885 / 0.873 and
# 0.875 / 0.886 / 0.873 (em-gmm 0.598, 0.609); phantom 40 % 0.854 / 0.865 / 0.857 (em-gmm 0.701;
# clean phantom em-gmm 0.859). Order 3 is best on every input; order 4 starts to follow anatomy
# (field correlation with the truth drops to 0.84-0.94).
DEFAULT_BIAS_FIELD_ORDER = 3
MAX_BIAS_FIELD_ORDER = 6
# "detect" is the default: the field is estimated on a sample of the mask's voxels and corrected only
# when it is strong (core.bias_field.detect_bias_field). Always on ("auto") is not the default, by
# measurement (deepsvg, seed 0; docs/bias-field.md, "The default"): a field fitted where there is
# none follows noise or anatomy, and the deep fit on the "corrected" image loses: 2 mm clean
# 0.876 -> 0.858, noise 0.05 0.891 -> 0.827, noise 0.10 0.868 -> 0.809, and the six cardiac phantom
# cases (LV masks of 54-96 mm) 0.537 -> 0.323 (the field takes up the blood pool / myocardium
# layout). Under a field it gains (2 mm +-40 % 0.567 -> 0.859, noise + 40 % 0.698 -> 0.818, 1 mm
# 40 % 0.510 -> 0.751), which detection keeps.
DEFAULT_BIAS_FIELD = "detect"
BIAS_FIELD_CHOICES = ("none", "auto", "detect")  # or a basis order 0..MAX_BIAS_FIELD_ORDER
# Detection (bias_field="detect"): the SD of the estimated log field inside the mask, largest over
# the channels, from the joint fit on BIAS_FIELD_DETECTION_VOXELS voxels drawn at random (the
# estimate on 20,000 voxels is within 0.002 of the one on every voxel of the 1 and 2 mm MNI T1).
# Measured (docs/bias-field.md, "Detection"): MNI T1 with no field 0.038-0.062 (clean, noise
# 0.05-0.15, 1 and 2 mm, shifted grid), the clean three-channel phantom 0.024; +-10 % fields
# 0.050-0.078, +-20 % 0.064-0.100, +-40 % 0.153-0.187. Noise alone stays below 0.063, so the
# threshold sits above it with a margin: weak fields are left alone, where a wrong field costs more
# than the field (noise 0.10: 0.868 -> 0.809 with a field).
BIAS_FIELD_DETECTION_THRESHOLD = 0.08
BIAS_FIELD_DETECTION_VOXELS = 20_000
# The detection's joint fit stops when a round changes the mean NLL by less than this (the joint
# fit's own default is 1e-5). Measured on the sample of 20,000 (strength 1e-5 -> 1e-4, median of
# three calls, seconds): 13 inputs (MNI 1 and 2 mm clean, noise 0.05 / 0.10, +-20 / 40 % fields,
# noise + field, the shifted grid, the three-channel phantom) moved by at most 0.0009 with every
# decision the same, and a call took 0.09-0.38 s instead of 0.13-0.90 s (e.g. 1 mm clean 0.43 ->
# 0.29). 1e-3 moved them by up to 0.005, too close to the weak fields' 0.064.
BIAS_FIELD_DETECTION_TOL = 1e-4
# The joint field of a larger mask is estimated on this many of its voxels drawn at random; the
# mixture is then fitted on every corrected voxel (engine._estimate_bias). em-gmm with
# bias_field="auto", seed 0, mean Dice (seconds) on every voxel -> 200,000 / 100,000 / 50,000
# (docs/bias-field.md, "The field from a sample"): 1 mm MNI +-40 % 0.809 (49.4) -> 0.811 (6.7) /
# 0.811 (3.9) / 0.810 (3.0); +-20 % 0.814 (46.4) -> 0.817 / 0.817 / 0.814 (3.5 s at 100,000); noise
# 0.10 + 40 % 0.680 (26.4) -> 0.682 / 0.676 / 0.681 (3.4); 2 mm +-40 % 0.885 (14.0) -> 0.886 /
# 0.888 / 0.888 (4.5); noise 0.10 + 40 % 0.737 (4.0) -> 0.735 / 0.734 / 0.737 (1.2); the 2 mm
# three-channel phantom with its own +-40 % field per channel 0.867 (33.6) -> 0.868 / 0.869 / 0.870
# (14.4). The field's correlation with the truth moved by at most 0.002. 100,000 keeps a margin for
# more channels and higher orders (up to 83 coefficients per channel at order 6).
BIAS_FIELD_FIT_VOXELS = 100_000
# Coil fields vary over the whole field of view; inside a small region a smooth field of the
# default order has room to follow the anatomy instead (the cardiac LV masks above: SD 0.13-0.19
# with no field). Detection looks only at masks at least this long (mm) along two axes or more:
# the brain is 146-182 mm, the cardiac masks 54-96 mm.
BIAS_FIELD_DETECTION_MIN_EXTENT_MM = 120.0


class _Settings:
    """What every settings dataclass can do."""

    _label = "a"  # names the kind of setting in messages

    def replace(self, **overrides: Any):
        """A copy with ``overrides``; an unknown name is an error listing the valid ones."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"Unknown {self._label} setting(s) {', '.join(unknown)}: valid settings are "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}.")
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class EMSettings(_Settings):
    """Classic EM (``em-gmm``, ``em-svgmm``); also the settings object of ``em.fit_gmm`` / ``em.fit_svgmm``."""

    _label = "EM"

    covariance_type: str = "full"
    max_iter: int = 200
    # EM stops when the mean NLL per voxel (of the z-scored voxels, measured in the E-step)
    # changes by less than tol between iterations: scikit-learn's rule (its lower bound is the
    # mean log-likelihood per sample), so tol means the same as GaussianMixture's tol on the same
    # data. Ours is 100x tighter than scikit-learn's default 1e-3. Measured on MNI 1 mm + noise
    # 0.05 (K = 3, the start of benchmarks/bench_engine.py): tol 1e-3 stops after 8 iterations at
    # a mean NLL of 1.36872, 1e-4 after 15 at 1.36750, 1e-5 after 54 at 1.36675, 1e-6 after 185 at
    # 1.36630: 1e-3 stops 0.002 nats/voxel short of the optimum, 1e-5 within 5e-4.
    tol: float = 1e-5
    # Added to every class variance; the engine adds each channel's quantisation variance on top
    # (core.gmm.covariance_floor: integer intensities are never fitted narrower than one step).
    reg_covar: float = REG_COVAR
    # Starts (k-means++ + EM) per fit, the best final NLL wins; every method starts from the
    # winner. Starts alternate greedy and plain k-means++ seeding (em.best_start). Measured on the
    # 42 stress cases (benchmarks/stress_cases.py) with index % 5 == 0 and at most 112 x 112
    # voxels, em-gmm against scikit-learn GaussianMixture(n_init=10), share of cases with a matched
    # Dice within 0.01: 90.5 % with 5 greedy starts, 92.9 % with 5 alternating, 97.6 % with 10
    # alternating (the one miss, case 150, is K=8 with a low-variance channel). Earlier, on 18
    # phantoms of Testing/Python/core/random_phantoms.py: NLL no worse than scikit-learn's in
    # 15/18 cases with 1 greedy start, 17/18 with 5. The starts run on at most em.START_SAMPLES
    # rows, so the extra cost does not grow with the volume. Re-measured on all 320 stress cases
    # after the fused EM and the side-by-side starts (em-gmm against the same scikit-learn
    # n_init=10 records): 10 starts give a Dice within 0.01 in 98.8 % of the cases, an NLL no worse
    # (+0.001) in 98.8 %, both in 98.1 %; 20 starts 98.4 %, 99.7 %, 98.1 % (their extra misses have
    # a better NLL than scikit-learn's and a worse Dice: a low-variance channel of a few
    # quantisation levels), at about 1.3x the time of 10 on a 4,000-voxel ROI and 1.9x on
    # 400,000 voxels with K = 8, C = 4. 10 stays the default.
    n_init: int = 10
    # The short EM runs inside the deep methods: the per-image warm start (a rough posterior is
    # enough to distil into the network) and the training's pooled class means and targets.
    warm_start_max_iter: int = 100
    warm_start_tol: float = 1e-4
    pooled_max_iter: int = 200
    pooled_tol: float = 1e-6


@dataclass(frozen=True)
class DeepSettings:
    """The per-image deep fit (``deepg``, ``deepsvg``); defaults measured on the MNI sample, see docs."""

    network: str = "auto"  # "auto" (2D images: 2d; volumes: 3d) | "2d" | "3d"
    # Filters at full resolution. 4 was measured against 8 (deepsvg, one thread, seed 0, engine
    # f989a22; mean Dice 8 -> 4): 2 mm MNI clean 0.876 -> 0.874, noise 0.10 0.861 -> 0.862, phantom
    # 0.862 -> 0.850, shifted 2 mm grid 0.879 -> 0.875 / 0.861 -> 0.867, cardiac cases 0-2 0.549 -> 0.583,
    # 0.670 -> 0.724, 0.589 -> 0.566, 11 stress cases 0.920 -> 0.919, for 0.66x the CPU time; but at
    # 1 mm (coarse to fine, 30 full-resolution steps) noise 0.10 fell 0.852 -> 0.844 and the clean fit
    # fell back to its EM start. 8 stays: the issue asks for speed without a drop in quality.
    base_width: int = 8
    depth: int = 3
    # Adam's step size. 1e-2 for both networks, measured with the spatial prior on the 2 mm MNI:
    # with 3e-3 or 5e-3 the 3D network stalled on the three-channel phantom (NLL 0.88/0.77 vs 0.57,
    # mean Dice 0.65/0.66 vs 0.86) for +0.01..0.025 Dice on the clean T1 (0.903/0.887 vs 0.878).
    learning_rate: float = 1e-2
    max_iter: int = 100
    min_iter: int = 20
    # The fit stops when the mean NLL per voxel changes by less than tol in one step; with
    # warm_start="em-head", when the objective improved by less than tol per step over the last
    # core.deep.STOP_WINDOW steps (core.deep._converged).
    tol: float = 1e-4
    # "em": the network is first taught the EM posterior (below); "em-head": its output starts at
    # the (smoothed) EM posterior (its logits are added to the EM log-probabilities, its output
    # layer starts at zero: no distillation steps); "none": a cold start (the paper's). "em" stays
    # the default: deepsvg mean Dice with "em" / "em-head", one thread, same seed (2026-11-29):
    # 2 mm MNI clean 0.878 / 0.883, noise 0.10 0.860 / 0.861, three-channel phantom 0.860 / 0.851,
    # cardiac phantom cases 0-1 0.554 / 0.525 and 0.616 / 0.653; em-head ran 100 steps (its
    # max_iter) against 129-176 (100 of them distillation), about 25 % less CPU on the MNI inputs.
    warm_start: str = "em"
    # The network's input grid: the crop averaged over blocks of 2, 4, ... voxels per axis until it
    # holds at most this many voxels (0: full resolution); such a crop is fitted coarse to fine
    # (full_resolution_iter below). 2^20 keeps the 2 mm MNI crop (about 570,000 voxels) at full
    # resolution and pools the 1 mm crop (4.5 M) by 2. Measured before coarse to fine existed (every
    # step's loss at full resolution): pooling by 2 on the 2 mm MNI (one thread) cost 0.044 mean Dice
    # on the clean T1 (0.835 vs 0.879) and 0.008 on the phantom for about 3.7x less CPU per step; on
    # the 1 mm MNI (quiet machine) it took the fit from 630 s to 222 s for mean Dice 0.776 against
    # 0.790. Coarse to fine with 2^17 (the 2 mm MNI fitted on a 4 mm grid first, then up to 30
    # steps at 2 mm) took 0.2x the CPU time and cost 0.004..0.028 (clean 0.872, the EM start, vs 0.876;
    # noise 0.05 0.863 vs 0.891; noise 0.10 0.857 vs 0.861; phantom 0.852 vs 0.862; shifted grid 0.869 vs
    # 0.879 and 0.847 vs 0.861); with 60 full-resolution steps always run, 0.25x and 0.017..0.047
    # (docs/speed.md).
    max_network_voxels: int = 2**20
    # Coarse to fine for every crop above this many voxels (core.deep.fit_deep): the fit first runs on
    # the crop averaged over blocks until it holds at most this many, then full_resolution_iter steps
    # follow with the loss on every voxel and the same network on the finest grid max_network_voxels
    # allows (the crop itself at 2 mm). 0: no coarse phase below max_network_voxels (the fits before
    # this option). deepsvg, one thread, mean Dice 0 -> 2^17 (docs/speed.md, "The network moves to
    # the finer grid"): 2 mm MNI clean 0.899 / 0.905 -> 0.902 / 0.903 (seeds 0 / 1), noise 0.05
    # 0.913 / 0.908 -> 0.905 / 0.905, noise 0.10 0.873 / 0.879 -> 0.876 / 0.881, phantom 0.889 / 0.885
    # -> 0.883 / 0.883, shifted clean 0.901 -> 0.904, shifted noise 0.10 0.872 -> 0.881, bias 40 %
    # 0.881 -> 0.888 (mean 0.8914 -> 0.8919 over these eleven fits) in 0.35-0.55x the CPU time; 1 mm
    # clean 0.796 -> 0.801, noise 0.10 0.876 / 0.872 -> 0.868 / 0.880 in about 0.55x. Crops below 2^17
    # (cardiac ROIs, the stress phantoms) are fitted as before. None: COARSE_NETWORK_VOXELS of the method.
    coarse_network_voxels: int | None = None
    # Steps of the fine phase (above). "auto": the method's FULL_RESOLUTION_ITER["network at full
    # resolution"] when the network runs on the crop itself there, ["network pooled"] when it stays on
    # a pooled grid (a 1 mm brain: the network on 2 mm blocks, its logits interpolated).
    full_resolution_iter: int | str = "auto"
    # What the fine phase trains: "last" (the last decoder block and the output layer, on that block's
    # input computed once; the rest stays as the coarse phase left it) or "all" (the whole network,
    # every step). "auto": FULL_RESOLUTION_LAYERS by the network's grid in the fine phase.
    full_resolution_layers: str = "auto"
    # Where the loss is computed when the network runs on a pooled grid: "auto" (LOSS_GRID of the
    # method; deepsvg's from the image's noise, resolve_loss_grid) | "network" | "voxels".
    loss_grid: str = "auto"
    # warm_start="em": the EM posterior is distilled into the network until it reproduces it: its NLL
    # within warm_start_gap (nats per voxel) of the start's, or its labels agreeing with the
    # start's on warm_start_agreement of the voxels; at most warm_start_iter steps. (A network
    # cannot copy the voxel-by-voxel noise of a soft EM posterior, so the NLL gap alone often
    # stays open: 0.05 nats after 300 steps on a 3-class phantom whose labels it matched.)
    # "auto": WARM_START_SCHEDULE below, by whether prior means or seeds anchor the classes.
    warm_start_iter: int | str = "auto"
    # Adam's step size while the start is distilled; the NLL steps then start a fresh Adam at
    # learning_rate (the distillation's moment estimates belong to another loss). None: learning_rate,
    # one Adam throughout. "auto": WARM_START_SCHEDULE.
    warm_start_learning_rate: float | str | None = "auto"
    warm_start_gap: float = 0.02
    warm_start_agreement: float = 0.98
    covariance_type: str = "full"
    reg_covar: float = REG_COVAR  # the engine passes the (C,) floors of core.gmm.covariance_floor
    prior_weight: float = 1.0
    # beta of the explicit spatial prior (neighbouring voxels' class probabilities agree); 0 is the
    # paper's loss; None: DEFAULT_SMOOTHNESS of the method
    smoothness: float | None = None
    # The spatial prior respects edges: a neighbour pair's weight is exp(-d^2 / (2 edge_contrast <d^2>))
    # of its intensity difference d (core.deep.neighbour_pairs); 0 = every pair alike (the prior
    # before). deepsvg with its defaults, seed 0, mean Dice, uniform (0) -> 2 (docs/thin-structures.md,
    # "An edge-aware prior"): 2 mm MNI clean 0.876 -> 0.901, shifted grid 0.879 -> 0.905, noise 0.05
    # 0.891 -> 0.906, noise 0.10 0.868 -> 0.873, shifted noise 0.10 0.874 -> 0.874, phantom 0.862 ->
    # 0.889, six cardiac cases 0.537 -> 0.542. 1 is as good on clean images and 0.005-0.007 worse
    # under noise; 0.5 loses under noise (0.853).
    edge_contrast: float = 2.0
    # deepsvg's labels and probability maps: the fitted model's posterior (network weights x
    # Gaussian likelihood) under a Potts prior of this strength per neighbour (core.label_mrf;
    # LABEL_MRF_ITER mean-field steps); "off": the network's output, as before. See LABEL_MRF.
    label_mrf: float | str = LABEL_MRF
    precision: str = "auto"  # the network's convolutions: "auto" | "float32" | "bfloat16"


@dataclass(frozen=True)
class TrainingSettings(_Settings):
    """:func:`.training.train`: one network for many images (see docs/training.md for the figures)."""

    _label = "training"

    method: str = DEFAULT_METHOD
    prior_means: Any = None  # (K, C) in normalised units, "auto" or None
    prior_weight: float = 1.0
    covariance_type: str = "full"
    reg_covar: float = REG_COVAR
    network: str = "auto"
    base_width: int = 8
    depth: int = 3
    val_fraction: float = 0.2
    max_epochs: int = 100
    min_epochs: int = 10
    patience: int = 10
    min_delta: float = 1e-3
    batch_size: int = 4
    learning_rate: float = 1e-2  # the per-image fit's rate (DeepSettings), with polynomial decay
    weight_decay: float = 1e-3
    grad_clip: float = GRADIENT_CLIP
    smoothness: float | None = None  # None: DEFAULT_SMOOTHNESS of the method
    precision: str = "auto"
    augment: bool = True
    patch_size: tuple[int, ...] | None = None
    warm_start: str = "em"
    warm_start_steps: int = 30
    device: Any = "auto"
    seed: int = 0


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Interval:
    """A number in [low, high] (``closed`` says which ends belong), as scikit-learn's ``Interval``."""

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"  # "both" | "left" | "right" | "neither"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind) or not math.isfinite(float(value)):
            return False
        low_ok = self.low is None or (value >= self.low if self.closed in ("both", "left") else value > self.low)
        high_ok = self.high is None or (value <= self.high if self.closed in ("both", "right") else value < self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        kind = "an integer" if self.kind is numbers.Integral else "a number"
        parts = []
        if self.low is not None:
            parts.append((">= " if self.closed in ("both", "left") else "> ") + f"{self.low:g}")
        if self.high is not None:
            parts.append(("<= " if self.closed in ("both", "right") else "< ") + f"{self.high:g}")
        return f"{kind} {' and '.join(parts)}".strip()


@dataclass(frozen=True)
class Choices:
    """One of a fixed set of strings, as scikit-learn's ``StrOptions``."""

    values: tuple[str, ...]

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


def resolve_bias_field_order(bias_field: Any) -> int:
    """The basis order a ``bias_field`` value asks for: "none" -> 0, "auto" and "detect" -> 3, or an
    int 0..6 ("detect" fits that order only when a field is found: :func:`detects_bias_field`).

    The one validation of the option (engine, command line and Slicer alike).
    """
    if isinstance(bias_field, str):
        name = bias_field.strip().lower()
        if name in BIAS_FIELD_CHOICES:
            return 0 if name == "none" else DEFAULT_BIAS_FIELD_ORDER
        if name.isdigit():
            bias_field = int(name)
    if isinstance(bias_field, (bool, np.bool_)) or not isinstance(bias_field, (int, np.integer)) \
            or not 0 <= int(bias_field) <= MAX_BIAS_FIELD_ORDER:
        raise ValueError(
            f"bias_field must be 'none', 'auto', 'detect' or a basis order 0..{MAX_BIAS_FIELD_ORDER}, got "
            f"{bias_field!r}: 'auto' always fits a smooth field of order {DEFAULT_BIAS_FIELD_ORDER} (MR coil "
            "inhomogeneity), 'detect' only when the image shows one, 'none' turns it off."
        )
    return int(bias_field)


def detects_bias_field(bias_field: Any) -> bool:
    """Whether a (valid) ``bias_field`` value asks to correct a field only when one is detected."""
    return isinstance(bias_field, str) and bias_field.strip().lower() == "detect"


@dataclass(frozen=True)
class BiasFieldOrder:
    """``bias_field``: "none", "auto", "detect" or a basis order (:func:`resolve_bias_field_order`)."""

    def accepts(self, value: Any) -> bool:
        try:
            resolve_bias_field_order(value)
        except ValueError:
            return False
        return True

    def describe(self) -> str:
        return f"'none', 'auto', 'detect' or a basis order 0..{MAX_BIAS_FIELD_ORDER}"


_COUNT = Interval(numbers.Integral, 1, None)
_NON_NEGATIVE = Interval(numbers.Real, 0, None)
_POSITIVE = Interval(numbers.Real, 0, None, closed="neither")

#: What each option accepts; ``None`` in a list means "the method's default".
PARAMETER_CONSTRAINTS: dict[str, list[Any]] = {
    "covariance_type": [Choices(COVARIANCE_TYPES)],
    "max_iter": [_COUNT, None],
    "tol": [_NON_NEGATIVE, None],
    "reg_covar": [_NON_NEGATIVE],
    "prior_weight": [_NON_NEGATIVE],
    "fine_tune": [Interval(numbers.Integral, 0, None)],
    "network": [Choices(NETWORKS)],
    "base_width": [_COUNT],
    "depth": [Interval(numbers.Integral, 0, None)],
    "learning_rate": [_POSITIVE],
    "min_iter": [Interval(numbers.Integral, 0, None)],
    "warm_start": [Choices(WARM_STARTS)],
    "warm_start_iter": [Interval(numbers.Integral, 0, None), Choices(("auto",))],
    "warm_start_learning_rate": [_POSITIVE, None, Choices(("auto",))],
    "max_network_voxels": [Interval(numbers.Integral, 0, None)],
    "coarse_network_voxels": [Interval(numbers.Integral, 0, None), None],
    "full_resolution_iter": [Interval(numbers.Integral, 0, None), Choices(("auto",))],
    "full_resolution_layers": [Choices(("auto", "last", "all"))],
    "loss_grid": [Choices(("auto", "network", "voxels"))],
    "warm_start_gap": [_NON_NEGATIVE],
    "warm_start_agreement": [Interval(numbers.Real, 0, 1, closed="right")],
    "n_init": [_COUNT],
    "bias_field": [BiasFieldOrder()],
    "smoothness": [_NON_NEGATIVE, None],
    "edge_contrast": [_NON_NEGATIVE],
    "label_mrf": [_NON_NEGATIVE, Choices(("off",))],
    "precision": [Choices(PRECISIONS)],
    # training
    "max_epochs": [_COUNT],
    "min_epochs": [Interval(numbers.Integral, 0, None)],
    "patience": [_COUNT],
    "min_delta": [_NON_NEGATIVE],
    "batch_size": [_COUNT],
    "val_fraction": [Interval(numbers.Real, 0, 1, closed="left")],
    "weight_decay": [_NON_NEGATIVE],
    "grad_clip": [_POSITIVE],
    "warm_start_steps": [Interval(numbers.Integral, 0, None)],
}

_HINTS = {
    "smoothness": " (0 turns the spatial prior off)",
    "edge_contrast": " (0: every neighbour pair of the spatial prior weighs the same)",
    "label_mrf": " ('off': deepsvg's labels are the network's output; 0: the fitted posterior without neighbours)",
    "warm_start_learning_rate": " (or None: the fit's own Adam throughout)",
    "max_iter": " (or None for the method's default)",
    "tol": " (or None for the method's default)",
    "fine_tune": " (number of per-image steps after the forward pass)",
    "n_init": " (number of k-means++ starts of the EM fit)",
    "bias_field": f" ('auto' = order {DEFAULT_BIAS_FIELD_ORDER}, 'detect' = that order when a field is found; "
                  "'none' for signed images such as CT)",
}


def check_value(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` meets :data:`PARAMETER_CONSTRAINTS[name]`."""
    constraints = PARAMETER_CONSTRAINTS[name]
    if value is None and None in constraints:
        return
    if any(c is not None and c.accepts(value) for c in constraints):
        return
    wanted = " or ".join(c.describe() for c in constraints if c is not None)
    raise ValueError(f"{name} must be {wanted}{_HINTS.get(name, '')}, got {value!r}.")


# Options of segment() every method understands; None = the method's default.
_COMMON = {
    "covariance_type": "full", "max_iter": None, "tol": None, "reg_covar": REG_COVAR, "prior_means": None,
    "prior_weight": 1.0, "cancel_event": None, "model": None, "fine_tune": 0, "n_init": EMSettings.n_init,
    "bias_field": DEFAULT_BIAS_FIELD,
}
_DEEP_ONLY = ("network", "base_width", "depth", "learning_rate", "min_iter", "warm_start", "warm_start_iter",
              "warm_start_learning_rate", "max_network_voxels", "coarse_network_voxels",
              "full_resolution_iter", "full_resolution_layers", "loss_grid", "warm_start_gap", "warm_start_agreement",
              "smoothness", "edge_contrast", "label_mrf", "precision")


def _known_options(method: str) -> dict[str, Any]:
    known = dict(_COMMON)
    if method in DEEP_METHODS:
        deep = DeepSettings()
        known.update({name: getattr(deep, name) for name in _DEEP_ONLY})
    return known


def is_anchored(prior_means: Any, seeds: Any) -> bool:
    """Whether prior means or seeds anchor a fit's classes: such fits keep the constant
    DEFAULT_SMOOTHNESS and the long distillation (WARM_START_SCHEDULE["anchored"])."""
    return prior_means is not None or seeds is not None


def resolve_warm_start(settings: "DeepSettings", anchored: bool) -> "DeepSettings":
    """``settings`` with "auto" distillation options replaced by :data:`WARM_START_SCHEDULE`'s values."""
    steps, rate = WARM_START_SCHEDULE["anchored" if anchored else "free"]

    def chosen(given: Any, automatic: Any) -> Any:
        return automatic if given == "auto" else given

    return dataclasses.replace(settings, warm_start_iter=chosen(settings.warm_start_iter, steps),
                               warm_start_learning_rate=chosen(settings.warm_start_learning_rate, rate))


def resolve_loss_grid(loss_grid: str, method: str, noise: float | None = None) -> str:
    """"network" or "voxels": ``loss_grid`` with "auto" replaced by :data:`LOSS_GRID` of ``method``,
    deepsvg's by "voxels" from a ``noise`` level (core.inputs.noise_level) of LABEL_NOISE_FULL_NETWORK on."""
    if loss_grid != "auto":
        return loss_grid
    if method == "deepsvg" and noise is not None and noise >= LABEL_NOISE_FULL_NETWORK:
        return "voxels"
    return LOSS_GRID[method]


def adaptive_smoothness(noise: float) -> float:
    """deepsvg's default smoothness for an image whose least noisy channel has ``noise`` (see above)."""
    extra = SMOOTHNESS_PER_NOISE * max(0.0, float(noise) - SMOOTHNESS_NOISE_FLOOR)
    return min(DEFAULT_SMOOTHNESS["deepsvg"] + extra, MAX_ADAPTIVE_SMOOTHNESS)


def label_prior_exponents(noise: float) -> tuple[float, float]:
    """(exponent of the network's weights, exponent of the global weights) in deepsvg's final labels
    for an image of ``noise`` (see LABEL_MRF)."""
    share = (float(noise) - SMOOTHNESS_NOISE_FLOOR) / (LABEL_NOISE_FULL_NETWORK - SMOOTHNESS_NOISE_FLOOR)
    network = min(1.0, max(0.0, share))
    return network, 1.0 - network * (1.0 - LABEL_GLOBAL_WEIGHT_NOISY)


def resolve_options(method: str, **given: Any) -> dict[str, Any]:
    """Every option of ``segment(method=..., **given)``: defaults filled in, each value checked.

    Raises ``ValueError`` naming the option, what it accepts and what was given.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}.")
    known = _known_options(method)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"Unknown option(s) {', '.join(unknown)} for method {method!r}: valid options are "
                         f"{', '.join(sorted(known))}.")
    resolved = {**known, **given}
    family = DeepSettings() if method in DEEP_METHODS else EMSettings()
    for name in ("max_iter", "tol"):
        if resolved[name] is None:
            resolved[name] = getattr(family, name)
    if method == "deepg" and resolved["smoothness"] is None:
        resolved["smoothness"] = DEFAULT_SMOOTHNESS[method]  # deepsvg's None: chosen from the image's noise
    for name, value in resolved.items():
        if name in PARAMETER_CONSTRAINTS:
            check_value(name, value)
    if resolved["model"] is not None and method not in DEEP_METHODS:
        raise ValueError(f"A trained model can only be used with the deep methods (deepg, deepsvg), not {method!r}.")
    return resolved


# ----------------------------------------------------------------------------- prior means


def _prior_rows(text: str) -> list[list[float]]:
    rows = []
    for entry in (part.strip() for part in text.split(";")):
        if not entry:
            continue
        try:
            row = [float(v) for v in entry.replace(":", ",").split(",")]
        except ValueError:
            raise ValueError(f"prior means entry '{entry}' is not a number; write numbers, e.g. "
                             "'30,200; 80,120; 110,60' (';' between classes, ',' between channels)") from None
        if not all(math.isfinite(v) for v in row):
            raise ValueError(f"prior means entry '{entry}' is not finite; use finite numbers")
        rows.append(row)
    return rows


def _prior_file(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise ValueError(f"prior means file {path!r} does not exist")
    if path.lower().endswith(".npy"):
        return np.load(path, allow_pickle=False)
    return np.loadtxt(path, delimiter=",", ndmin=2)


def parse_prior_means(text: str | None, n_classes: int | None = None, n_channels: int | None = None, *,
                      allow_auto: bool = False, allow_files: bool = False) -> np.ndarray | str | None:
    """Prior class means from text: ``;`` between classes, ``,`` or ``:`` between channels.

    ``"30,200; 80,120; 110,60"`` gives a (3, 2) array (class k = row k). ``allow_auto`` also accepts
    ``"auto"`` (returned as is); ``allow_files`` a ``.npy`` or ``.csv`` file of K rows and C columns.
    With ``n_classes`` / ``n_channels`` the shape is checked. Empty text or ``None`` gives ``None``.
    """
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if allow_auto and text == "auto":
        return "auto"
    if allow_files and text.lower().endswith((".npy", ".csv")):
        values = np.asarray(_prior_file(text), dtype=float)
    else:
        rows = _prior_rows(text)
        if n_channels is not None:
            for row in rows:
                if len(row) != n_channels:
                    raise ValueError(
                        f"prior means entry {','.join(f'{v:g}' for v in row)} has {len(row)} value(s) but there are "
                        f"{n_channels} channel(s); give one value per channel, joined by ','")
        if len({len(r) for r in rows}) > 1:
            raise ValueError("prior means rows have different numbers of values; give one value per channel in "
                             "every class")
        values = np.asarray(rows, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    if n_classes is not None and values.shape[0] != n_classes:
        raise ValueError(f"prior means have {values.shape[0]} rows but there are {n_classes} classes; "
                         "give one mean per class, separated by ';'")
    return values


def check_class_names(names: Any, n_classes: int) -> list[str] | None:
    """Class names as a list of ``n_classes`` distinct, non-empty strings (class k = name k), or None.

    Text gives the names separated by ``,`` (``"blood, myocardium, edema, scar"``).
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = names.split(",")
    names = [str(name).strip() for name in names]
    if len(names) != n_classes or not all(names):
        raise ValueError(f"class names {names} must be {n_classes} non-empty names, one per class in class order "
                         "(e.g. 'blood, myocardium, edema, scar').")
    if len({name.lower() for name in names}) != len(names):
        raise ValueError(f"class names {names} repeat a name: give every class its own name.")
    return names


def legacy_prior_means_text(values: Sequence[str]) -> tuple[str, bool]:
    """The one-syntax text of ``deepgmm-segment --prior-means`` values, and whether they used the old spelling.

    The old spelling gave one command-line word per class (``30:200 80:120``); it is accepted for
    one release with a deprecation message.
    """
    values = [str(v) for v in values]
    if len(values) == 1:
        return values[0], False
    return ";".join(values), True

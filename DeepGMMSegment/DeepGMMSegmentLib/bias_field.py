"""Joint estimation of a smooth multiplicative bias field with a Gaussian mixture (numpy + torch).

Model (Wells et al. 1996; Van Leemput et al. 1999, "Automated model-based bias field correction
of MR images of the brain"): an observed intensity is the true tissue intensity times a smooth
field, ``I = b * J``, per channel. In the log domain the field is additive, ``log I = log b + log
J``, and the tissue log intensities follow a Gaussian mixture. The log field of each channel is a
linear combination of a few smooth basis functions: products of Legendre polynomials of the
voxel coordinates with total degree <= ``order`` (Van Leemput 1999 used exactly this, degree 4;
Ashburner & Friston 2005 use a low-frequency DCT with the same role). A field of that order has
no energy at the scale of anatomy, so it cannot explain tissue contrast away, and with at most a
few dozen coefficients it needs no regularisation.

Estimation alternates with EM (a generalised EM, so the likelihood never decreases): with the
current posteriors ``p_ik`` and Gaussians (mu_k, Sigma_k), the coefficients that maximise the
expected complete-data log-likelihood solve one weighted least-squares problem (Van Leemput 1999,
eq. 11; multi-channel with full covariances):

    sum_i B_i^T W_i B_i beta = sum_i B_i^T g_i,  W_i = sum_k p_ik Sigma_k^-1,
    g_i = sum_k p_ik Sigma_k^-1 (y_i - mu_k),

i.e. the residual of each voxel's log intensity from its predicted class mean, weighted by the
posterior-weighted precisions. Then the mixture is re-fitted on the corrected log intensities
``y - B beta`` with a few EM iterations of :func:`em.fit_gmm` started from the current parameters.

Conventions (as in gmm.py / em.py): voxels are flattened to (V, C) over the mask only; the
mixture works in normalised units (each channel's log intensities z-scored inside the mask);
accumulations over voxels (the normal equations) are in float64. The basis has no constant term
and every basis function has mean 0 inside the mask, so the log field has mean 0 inside the mask
(the mixture means absorb any global scale: without this the problem is not identifiable).

Intensities must be positive for the log. Values <= a floor are clipped to it: the floor is
``clip_fraction`` (default 1e-3) times the channel's median inside the mask, so zeros and small
negative values from reconstruction or resampling are handled; a channel whose median inside the
mask is not positive (CT, z-scored or constant-zero images) is rejected with a clear error.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from . import em, gmm

# Default basis order, chosen by measurement (docs/bias-field.md, "Choosing the default order"):
# em-gmm mean Dice CSF/GM/WM on the 2 mm MNI T1 and the three-channel phantom under random
# quadratic fields of +-20 % and +-40 % (evaluation/conditions.py, several seeds).
# The figures are in docs/bias-field.md; order 3 was the best or within 0.002 of the best on
# every input, order 2 under-fits asymmetric fields, order 4 costs twice the coefficients for
# no gain.
DEFAULT_ORDER = 3
MAX_ORDER = 6
DEFAULT_CLIP_FRACTION = 1e-3
BIAS_FIELD_CHOICES = ("none", "auto")
_CHUNK = 1 << 18  # voxels per float64 accumulation block (bounds the temporary memory)


def resolve_order(bias_field: Any) -> int:
    """The basis order an option value asks for: "none" -> 0, "auto" -> DEFAULT_ORDER, an int 0..MAX_ORDER.

    The one place that validates the ``bias_field`` option (engine, CLI and Slicer alike).
    """
    if isinstance(bias_field, str):
        name = bias_field.strip().lower()
        if name == "none":
            return 0
        if name == "auto":
            return DEFAULT_ORDER
        if name.isdigit():
            bias_field = int(name)
    if isinstance(bias_field, (bool, np.bool_)) or not isinstance(bias_field, (int, np.integer)) \
            or not 0 <= int(bias_field) <= MAX_ORDER:
        raise ValueError(
            f"bias_field must be 'none', 'auto' or a basis order 0..{MAX_ORDER}, got {bias_field!r}: "
            f"'auto' uses order {DEFAULT_ORDER} (a smooth field for MR coil inhomogeneity), 'none' turns it off."
        )
    return int(bias_field)


# ----------------------------------------------------------------------------- basis


def basis_exponents(ndim: int, order: int, max_degree_per_axis: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Legendre degree tuples (d_0, .., d_{ndim-1}) with 1 <= sum <= order, graded by total degree.

    ``max_degree_per_axis`` caps each axis (an axis with n distinct coordinates in the mask
    supports degree n - 1 at most; a single slice supports none).
    """
    caps = [order] * ndim if max_degree_per_axis is None else [min(order, int(c)) for c in max_degree_per_axis]
    out = [
        degrees for degrees in itertools.product(*(range(c + 1) for c in caps))
        if 1 <= sum(degrees) <= order
    ]
    return sorted(out, key=lambda d: (sum(d), tuple(-x for x in d)))


def mask_coordinates(mask: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Coordinates of the mask voxels in a physical frame, (V, ndim) float64, in ``mask[mask]`` order.

    Millimetres (``spacing`` in array axis order, default 1) from the centre of the mask's
    bounding box, divided by the largest half-extent, so the longest axis spans [-1, 1] and the
    frame is isotropic in mm. (A total-degree polynomial space does not depend on an affine change
    of coordinates, so spacing changes the conditioning, not the fields that can be represented.)
    """
    index = np.nonzero(mask)
    spacing = np.ones(mask.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    low = np.array([i.min() for i in index], dtype=np.float64)
    high = np.array([i.max() for i in index], dtype=np.float64)
    centre = 0.5 * (low + high) * spacing
    half = 0.5 * (high - low) * spacing
    radius = float(half.max()) if half.max() > 0 else 1.0
    coords = np.empty((index[0].size, mask.ndim), dtype=np.float64)
    for axis, i in enumerate(index):
        coords[:, axis] = (i * spacing[axis] - centre[axis]) / radius
    return coords


def legendre_basis(coords: np.ndarray, exponents: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Products of Legendre polynomials, centred to mean 0 over the voxels: (V, ndim) -> (V, P) float32.

    Evaluated in float64 and stored in float32 (the normal equations accumulate in float64).
    """
    max_degree = max((max(e) for e in exponents), default=0)
    # per axis, P_0 .. P_max at the voxel coordinates: (ndim, max_degree + 1, V)
    table = np.stack([
        np.stack([np.polynomial.legendre.legval(coords[:, a], np.eye(max_degree + 1)[d])
                  for d in range(max_degree + 1)])
        for a in range(coords.shape[1])
    ])
    basis = np.empty((coords.shape[0], len(exponents)), dtype=np.float32)
    for p, degrees in enumerate(exponents):
        column = np.ones(coords.shape[0], dtype=np.float64)
        for axis, d in enumerate(degrees):
            if d:
                column *= table[axis, d]
        basis[:, p] = column - column.mean()  # mean 0 in the mask: the identifiability constraint
    return basis


def bias_basis(mask: np.ndarray, order: int, spacing: Sequence[float] | None = None) -> np.ndarray:
    """The smooth basis of the log field on the mask voxels: (V, P) float32, every column mean 0.

    P is the number of Legendre products of total degree 1..``order`` (9 in 3D / 5 in 2D at order 2,
    19 / 9 at order 3, 34 / 14 at order 4); axes with too few distinct positions get fewer terms.
    """
    index = np.nonzero(mask)
    distinct = [np.unique(i).size for i in index]
    exponents = basis_exponents(mask.ndim, order, [n - 1 for n in distinct])
    return legendre_basis(mask_coordinates(mask, spacing), exponents)


# ----------------------------------------------------------------------------- log intensities


def log_intensities(inside: np.ndarray, clip_fraction: float = DEFAULT_CLIP_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Log of the mask voxels with a positive floor: (C, V) -> ((C, V) float64, floors (C,)).

    The floor is ``clip_fraction`` times each channel's median inside the mask; values below it
    (zeros, negative values) are clipped to it. A channel without a positive median is rejected.
    """
    if not 0 < clip_fraction < 1:
        raise ValueError(f"clip_fraction must be in (0, 1), got {clip_fraction}.")
    inside = np.asarray(inside, dtype=np.float64)
    medians = np.median(inside, axis=1)
    for c, median in enumerate(medians):
        if not median > 0:
            raise ValueError(
                f"Channel {c + 1} has median intensity {median:g} inside the mask: the bias field is "
                "multiplicative and needs positive intensities (magnitude MR images). Use bias_field='none' "
                "for signed or zero-centred images (CT, z-scores), or check the mask."
            )
    floors = clip_fraction * medians
    return np.log(np.maximum(inside, floors[:, None])), floors


# ----------------------------------------------------------------------------- the WLS step


def posterior_precisions(resp: torch.Tensor, params: gmm.GaussianParameters) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior-weighted precisions and weighted precision-means of every voxel, float64.

    resp (V, K) -> (W (V, C, C) = sum_k p_ik Sigma_k^-1, h (V, C) = sum_k p_ik Sigma_k^-1 mu_k).
    """
    chol = params.cholesky.double()
    if params.covariance_type == "full":
        precisions = torch.cholesky_inverse(chol)  # (K, C, C), from the log-domain-safe factor
    else:
        precisions = torch.diag_embed(chol.pow(-2))
    k, c, _ = precisions.shape
    resp = resp.double()
    weighted = (resp @ precisions.reshape(k, c * c)).reshape(-1, c, c)
    precision_means = torch.einsum("kcd,kd->kc", precisions, params.means.double())
    return weighted, resp @ precision_means


def estimate_bias_coefficients(
    basis: torch.Tensor,
    y: torch.Tensor,
    resp: torch.Tensor,
    params: gmm.GaussianParameters,
) -> torch.Tensor:
    """Weighted least-squares bias coefficients given the posteriors and the Gaussians.

    basis (V, P), y (V, C) uncorrected log intensities (normalised units), resp (V, K) posteriors
    -> coefficients (P, C) float64 such that the log field is ``basis @ coefficients``.
    Solves sum_i B_i^T W_i B_i beta = sum_i B_i^T (W_i y_i - h_i) (Van Leemput 1999), the
    normal equations accumulated in float64 over blocks of voxels.
    """
    v, p = basis.shape
    c = y.shape[1]
    normal = torch.zeros((c, p, c, p), dtype=torch.float64, device=basis.device)
    rhs = torch.zeros((c, p), dtype=torch.float64, device=basis.device)
    for start in range(0, v, _CHUNK):
        block = slice(start, min(v, start + _CHUNK))
        b = basis[block].double()
        w, h = posterior_precisions(resp[block], params)
        g = torch.einsum("vcd,vd->vc", w, y[block].double()) - h  # W_i y_i - h_i
        for i in range(c):  # C^2 products of (V, P) blocks; no (V, P, C, C) temporary
            for j in range(c):
                normal[i, :, j, :] += (b * w[:, i, j, None]).T @ b
        rhs += g.T @ b
    flat = normal.reshape(c * p, c * p)
    return torch.linalg.solve(flat, rhs.reshape(c * p)).reshape(c, p).T


def log_field(basis: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """The log field on the mask voxels: basis (V, P), coefficients (P, C) -> (V, C) float32."""
    if basis.shape[1] == 0:
        return torch.zeros((basis.shape[0], coefficients.shape[1]), dtype=torch.float32, device=basis.device)
    return (basis.double() @ coefficients.to(basis.device)).float()


def apply_bias(data: np.ndarray, mask: np.ndarray, field: np.ndarray) -> np.ndarray:
    """The corrected image ``data / field``: (C, *spatial) float32; voxels outside the mask unchanged."""
    corrected = np.array(data, dtype=np.float32, copy=True)
    corrected[:, mask] /= field[:, mask]
    return corrected


# ----------------------------------------------------------------------------- the driver


@dataclass
class BiasFieldFit:
    """Result of :func:`fit_gmm_with_bias`.

    ``field`` is multiplicative in input geometry (C, *spatial), 1 outside the mask and mean 1
    inside it; ``corrected = data / field`` (unchanged outside the mask). The mixture is in
    normalised log units: log intensity = ``log_centre + log_scale * z`` per channel.
    """

    field: np.ndarray
    corrected: np.ndarray
    labels: np.ndarray  # uint8 spatial, 1..K by ascending mean log intensity of channel 1, 0 outside
    mixture: em.MixtureFit
    coefficients: np.ndarray  # (P, C), log field in log-intensity units = basis @ coefficients
    log_centre: np.ndarray  # (C,)
    log_scale: np.ndarray  # (C,)
    order: int
    nll_history: list[float] = field(default_factory=list)  # mean NLL per voxel after each outer step
    n_outer: int = 0
    converged: bool = False


def _as_channels(channels: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    data = np.stack([np.asarray(ch, dtype=np.float32) for ch in channels])
    m = np.asarray(mask).astype(bool)
    if data.ndim not in (3, 4) or data.shape[1:] != m.shape:
        raise ValueError(
            f"channels must be a (C, *spatial) array or a list of 2D/3D arrays on the mask's grid; got channels "
            f"{data.shape[1:]} and mask {m.shape}: pass e.g. [t1] with a mask of t1's shape."
        )
    if not m.any():
        raise ValueError("The mask is empty: it must contain the voxels to correct (nonzero = inside).")
    return data, m


def fit_gmm_with_bias(
    channels: Any,
    mask: Any,
    n_classes: int,
    order: int = DEFAULT_ORDER,
    *,
    spacing: Sequence[float] | None = None,
    covariance_type: str = "full",
    reg_covar: float = 1e-4,
    max_outer: int = 60,
    inner_iter: int = 3,
    tol: float = 1e-5,
    clip_fraction: float = DEFAULT_CLIP_FRACTION,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> BiasFieldFit:
    """Fit a Gaussian mixture to the log intensities jointly with one smooth bias field per channel.

    channels (C, *spatial) or a list of C arrays, mask bool (*spatial). Steps: log intensities
    inside the mask -> z-score -> plain EM (:func:`em.fit_gmm`, k-means++ seeding from ``seed``)
    -> repeat {WLS bias coefficients; ``inner_iter`` EM iterations on the corrected log
    intensities from the current parameters} until the mean NLL changes by less than ``tol`` or
    ``max_outer`` rounds. ``order`` 0 (or "none" through :func:`resolve_order`) is plain EM on the
    log intensities with a field of 1.
    """
    order = resolve_order(order)
    data, m = _as_channels(channels, mask)
    dev = torch.device(device)
    logs, _ = log_intensities(data[:, m], clip_fraction)  # (C, V)
    log_centre, log_scale = logs.mean(1), logs.std(1)
    if not (log_scale > 0).all():
        raise ValueError("A channel is constant inside the mask: it carries no information; remove it or check the mask.")
    y = torch.from_numpy(((logs.T - log_centre) / log_scale).astype(np.float32)).to(dev)  # (V, C)
    generator = torch.Generator().manual_seed(int(seed))
    em_args = dict(covariance_type=covariance_type, reg_covar=reg_covar, tol=tol)
    fit = em.fit_gmm(y, n_classes, generator=generator, max_iter=200, **em_args)
    basis = torch.from_numpy(bias_basis(m, order, spacing)).to(dev) if order else None
    coefficients = torch.zeros((0 if basis is None else basis.shape[1], y.shape[1]), dtype=torch.float64)
    history = [fit.nll_history[-1]]
    converged = basis is None
    n_outer = 0
    for n_outer in range(1, (max_outer if basis is not None else 0) + 1):
        coefficients = estimate_bias_coefficients(basis, y, fit.log_resp.exp(), fit.params)
        corrected = y - log_field(basis, coefficients)
        fit = em.fit_gmm(corrected, n_classes, generator=generator, max_iter=inner_iter,
                         init=(torch.log(fit.weights), fit.params), compress=False, **em_args)
        history.append(fit.nll_history[-1])
        if abs(history[-2] - history[-1]) < tol:
            converged = True
            break
    return _package(data, m, fit, basis, coefficients, log_centre, log_scale, order, history, n_outer, converged)


def _package(data, m, fit, basis, coefficients, log_centre, log_scale, order, history, n_outer, converged):
    """Field and corrected image in input geometry, labels ordered by mean log intensity of channel 1."""
    scale = torch.as_tensor(log_scale, dtype=torch.float64)
    coefficients_log = (coefficients.cpu() * scale).numpy()  # normalised -> log-intensity units
    field_inside = np.ones((data.shape[0], int(m.sum())), dtype=np.float64)
    if basis is not None:
        field_inside = np.exp(log_field(basis, coefficients).double().cpu().numpy().T * log_scale[:, None])
    field_inside /= field_inside.mean(1, keepdims=True)  # mean 1 inside the mask (a global scale only)
    bias = np.ones_like(data, dtype=np.float32)
    bias[:, m] = field_inside
    resp = fit.log_resp.exp().cpu().numpy()
    order_k = np.argsort(fit.params.means[:, 0].cpu().numpy(), kind="stable")
    labels = np.zeros(m.shape, dtype=np.uint8)
    labels[m] = (np.argsort(order_k)[resp.argmax(1)] + 1).astype(np.uint8)
    return BiasFieldFit(
        field=bias, corrected=apply_bias(data, m, bias), labels=labels, mixture=fit,
        coefficients=coefficients_log, log_centre=log_centre, log_scale=log_scale, order=order,
        nll_history=history, n_outer=n_outer, converged=converged,
    )


__all__ = [
    "BIAS_FIELD_CHOICES", "DEFAULT_ORDER", "BiasFieldFit", "apply_bias", "bias_basis", "estimate_bias_coefficients",
    "fit_gmm_with_bias", "log_intensities", "resolve_order",
]

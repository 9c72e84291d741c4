"""Test conditions built from the MNI template, with fixed seeds.

Every generator returns new arrays; its inputs are never modified.

* noise: additive Gaussian noise, sigma = level x (max - min of the clean T1 inside the brain);
* bias: a smooth multiplicative field that spans exactly [1 - a, 1 + a] inside the brain
  (a random quadratic polynomial of the normalised coordinates, a = 0.2 or 0.4);
* noise + bias: the field first (it scales the signal), then the noise;
* phantom: a synthetic T1/T2/PD-like image built from the CSF/GM/WM fractions with known
  tissue contrasts (partial volume = fraction-weighted mix), plus noise.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# (name, noise level as a fraction of the intensity range, bias amplitude)
T1_CONDITIONS = (
    ("clean", 0.0, 0.0),
    ("noise 0.05", 0.05, 0.0),
    ("noise 0.10", 0.10, 0.0),
    ("bias 20%", 0.0, 0.2),
    ("bias 40%", 0.0, 0.4),
    ("noise 0.10 + bias 40%", 0.10, 0.4),
)

# Known tissue contrasts of the synthetic phantom (arbitrary units, rows CSF, GM, WM):
# T1-weighted: CSF dark, WM bright; T2-weighted: CSF bright, WM dark; PD: CSF > GM > WM, low contrast.
PHANTOM_CHANNELS = ("T1-like", "T2-like", "PD-like")
PHANTOM_CONTRASTS = np.array([
    [0.25, 0.95, 0.90],   # CSF
    [0.55, 0.60, 0.78],   # GM
    [0.80, 0.40, 0.65],   # WM
])
PHANTOM_NOISE = 0.05  # sigma as a fraction of each channel's contrast range


def seed_for(name: str, base_seed: int = 2024) -> int:
    """A fixed seed per condition name (stable across runs and Python versions)."""
    return base_seed + sum((i + 1) * ord(c) for i, c in enumerate(name)) % 100003


def intensity_range(image: np.ndarray, mask: np.ndarray) -> float:
    inside = np.asarray(image)[mask]
    return float(inside.max() - inside.min())


def add_noise(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """A new float32 image: ``image`` plus Gaussian noise of standard deviation ``sigma``."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}.")
    rng = np.random.default_rng(seed)
    return (np.asarray(image, dtype=np.float32)
            + rng.normal(0.0, sigma, size=np.shape(image)).astype(np.float32))


def bias_field(shape: tuple, mask: np.ndarray, amplitude: float, seed: int) -> np.ndarray:
    """Smooth multiplicative field spanning exactly [1 - amplitude, 1 + amplitude] inside ``mask``.

    A random combination of the quadratic monomials of the coordinates (scaled to [-1, 1]),
    affinely rescaled so its minimum and maximum inside the mask are -1 and +1.
    """
    if not 0 <= amplitude < 1:
        raise ValueError(f"bias amplitude must be in [0, 1), got {amplitude}.")
    if amplitude == 0:
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    terms = list(grids)
    for i in range(len(grids)):
        for j in range(i, len(grids)):
            terms.append(grids[i] * grids[j])
    coefficients = rng.normal(size=len(terms))
    # the linear terms dominate (a slow gradient across the head, as in real coil profiles)
    coefficients[:len(grids)] *= 2.0
    smooth = sum(c * t for c, t in zip(coefficients, terms))
    low, high = smooth[mask].min(), smooth[mask].max()
    unit = 2.0 * (smooth - low) / (high - low) - 1.0
    return (1.0 + amplitude * unit).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Case:
    """One input of the evaluation: channels (C, *spatial), mask, reference (None if unknown)."""

    name: str
    channels: np.ndarray
    mask: np.ndarray
    reference: np.ndarray | None
    spacing: tuple
    channel_names: tuple = ("T1",)
    synthetic: bool = False
    description: str = ""


def t1_condition(t1: np.ndarray, mask: np.ndarray, noise_level: float, bias_amplitude: float,
                 name: str) -> np.ndarray:
    """The T1 under one condition: field first, then noise; fixed seeds from the name."""
    image = np.asarray(t1, dtype=np.float32)
    if bias_amplitude:
        image = image * bias_field(image.shape, mask, bias_amplitude, seed_for(name + "/bias"))
    if noise_level:
        # sigma is a fraction of the *clean* intensity range, so conditions are comparable
        image = add_noise(image, noise_level * intensity_range(t1, mask), seed_for(name + "/noise"))
    return image.astype(np.float32)


def t1_cases(volume, conditions=T1_CONDITIONS) -> list:
    """One :class:`Case` per T1 condition of an :class:`mni_data.MniVolume`."""
    cases = []
    for name, noise_level, bias_amplitude in conditions:
        image = t1_condition(volume.t1, volume.mask, noise_level, bias_amplitude, name)
        parts = []
        if noise_level:
            parts.append(f"Gaussian noise sigma = {noise_level:.2f} x intensity range")
        if bias_amplitude:
            parts.append(f"multiplicative bias field in [{1 - bias_amplitude:.1f}, {1 + bias_amplitude:.1f}]")
        cases.append(Case(name=name, channels=image[None], mask=volume.mask, reference=volume.reference,
                          spacing=volume.spacing, description="; ".join(parts) or "template as shipped"))
    return cases


def phantom_case(volume, noise: float = PHANTOM_NOISE, seed: int | None = None) -> Case:
    """Synthetic three-channel phantom from the CSF/GM/WM fractions with known contrasts."""
    seed = seed_for("phantom") if seed is None else seed
    fractions = volume.tissue_maps  # (3, *spatial)
    clean = np.einsum("k...,kc->c...", fractions, PHANTOM_CONTRASTS).astype(np.float32)
    channels = np.stack([
        add_noise(clean[c], noise * float(np.ptp(PHANTOM_CONTRASTS[:, c])), seed + c)
        for c in range(clean.shape[0])])
    channels[:, ~volume.mask] = 0.0
    return Case(name="phantom T1/T2/PD (synthetic)", channels=channels, mask=volume.mask,
                reference=volume.reference, spacing=volume.spacing, channel_names=PHANTOM_CHANNELS,
                synthetic=True,
                description=(f"SYNTHETIC: fraction-weighted tissue contrasts {PHANTOM_CONTRASTS.tolist()} "
                             f"(rows CSF, GM, WM; columns {', '.join(PHANTOM_CHANNELS)}), "
                             f"Gaussian noise sigma = {noise} x each channel's contrast range"))

"""SYNTHETIC multi-sequence cardiac MRI phantom (LGE, T2, bSSFP): short-axis stacks with known truth.

Nothing here comes from a patient. The only numbers taken from real data are the published class
statistics the deep GMM authors hard-coded from MyoPS 2020 (``MU_DATA``, ``SIGMA_DATA``: rows blood,
myocardium, edema, scar; columns LGE, T2, bSSFP; z-scored over the 160x160 crop around the heart,
see docs/cardiac.md and the method notes §1.6).

One case is a left-ventricle (LV) short-axis stack with thick slices, slice 0 at the base:

* geometry: the LV is a truncated half-ellipsoid (blood pool inside a myocardial shell) that
  shrinks from base to apex, with a per-patient radius, wall thickness (varying smoothly around
  the ring), ellipticity and a centre drifting along the long axis; around it a right-ventricle
  blood pool, a thin pericardial fat layer, lungs and other soft tissue;
* infarct: a sector of the myocardium spanning several slices; the scar is transmural at its core
  and subendocardial at its edges (wavefront), the edema (area at risk) is a wider, fully
  transmural sector around it, so scar ⊂ scar+edema ⊂ myocardial ring. Some cases have no
  infarct, and the slices outside the infarct's long-axis range never have one;
* intensities: each class draws its per-patient mean from ``MU_DATA`` plus a jitter, and its
  spread from ``SIGMA_DATA`` (part smooth texture, part white noise); partial volume comes from
  rendering the tissues on a finer grid (in-plane and through the slice thickness) and averaging
  the fractions; the background tissues are rescaled slice by slice so that z-scoring a slice over
  the whole crop gives MyoPS's units (``MU_DATA`` then applies as is); a mild multiplicative bias
  field per sequence; finally int16 "scanner units" with a different gain and offset per sequence.

Truth labels (MyoPS classes, the row order of ``MU_DATA``): 0 outside the LV, 1 blood pool,
2 healthy myocardium, 3 edema (the area at risk minus the scar), 4 scar. The mask is exact: the
voxels at least half LV (blood + myocardium + edema + scar) by partial volume; inside it a voxel
takes the LV class with the largest fraction.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from evaluation.conditions import bias_field

CLASS_NAMES = ("blood", "myocardium", "edema", "scar")  # labels 1..4
SEQUENCES = ("LGE", "T2", "bSSFP")  # channel order of MU_DATA and of every case

# The deep GMM authors' hard-coded MyoPS 2020 class statistics (paper-era utils/losses.py):
# mean and standard deviation of each class in each sequence after z-scoring each slice over its
# 160x160 crop. Rows blood, myocardium, edema, scar; columns LGE, T2, bSSFP ("C0").
MU_DATA = np.array([
    [1.0907561, -0.15736851, 1.70052552],
    [-0.38956344, 0.35907112, 0.00187305],
    [0.12236157, 0.99027221, 0.42901193],
    [1.25641782, 0.86135793, 0.53020001],
])
SIGMA_DATA = np.array([
    [0.65727359, 0.55457809, 0.59096481],
    [0.62178455, 0.384162, 0.51238211],
    [0.65854446, 0.3525601, 0.53890276],
    [0.77457338, 0.54051857, 0.67227785],
])

# Background tissues in the same crop-z-score units (rows; columns LGE, T2, bSSFP). Chosen by hand
# for plausible contrast only: lungs dark everywhere; pericardial fat bright in LGE and bSSFP, dark
# in fat-suppressed T2; chest wall / liver / RV wall intermediate. The RV blood pool takes the
# patient's LV blood values. Their overall level is rescaled per slice (see _calibrate_background).
BACKGROUND_NAMES = ("rv-blood", "lung", "fat", "soft-tissue")
BACKGROUND_MEANS = np.array([
    [np.nan, np.nan, np.nan],  # RV blood = the patient's LV blood
    [-1.5, -1.3, -1.5],
    [0.6, -0.6, 1.0],
    [-0.1, 0.2, -0.1],
])
BACKGROUND_SIGMA = 0.4

# Scanner units per sequence: value = gain * patient_gain * (z + offset), then the bias field,
# clipped at 0 and rounded to int16. Different ranges on purpose: nothing may rely on units.
SCANNER_UNITS = {"LGE": (120.0, 3.5), "T2": (40.0, 4.0), "bSSFP": (250.0, 3.0)}

N_LV = len(CLASS_NAMES)
TISSUES = CLASS_NAMES + BACKGROUND_NAMES  # fraction maps are in this order


@dataclasses.dataclass(frozen=True)
class PhantomSettings:
    """What varies between generated cases, and how much. Defaults = the evaluation's cohort."""

    n_slices: tuple = (8, 12)              # inclusive range
    slice_thickness_mm: tuple = (8.0, 10.0)
    pixel_mm: tuple = (1.25, 1.5)          # in-plane spacing
    size: int = 128                        # in-plane pixels (a crop around the heart)
    p_no_infarct: float = 0.2              # share of cases without an infarct
    mean_jitter: float = 0.15              # per-patient SD of each class mean (z units)
    noise_scale: float = 1.0               # x SIGMA_DATA; 0 = noise-free (partial volume only)
    texture_share: float = 0.3             # share of the class variance that is smooth texture
    texture_mm: float = 2.5                # texture correlation length (Gaussian sigma, in-plane)
    bias_amplitude: float = 0.1            # field in [1 - a, 1 + a] per sequence
    supersampling: int = 3                 # sub-samples per axis for partial volume (1 = none)

    def __post_init__(self):
        if not 0 <= self.p_no_infarct <= 1:
            raise ValueError(f"p_no_infarct must be in [0, 1], got {self.p_no_infarct}.")
        if self.noise_scale < 0 or self.mean_jitter < 0 or not 0 <= self.texture_share <= 1:
            raise ValueError("noise_scale and mean_jitter must be >= 0 and texture_share in [0, 1].")
        if int(self.supersampling) < 1 or int(self.size) < 32:
            raise ValueError("supersampling must be >= 1 and size >= 32 pixels.")


@dataclasses.dataclass(frozen=True)
class CardiacCase:
    """One generated patient. Arrays are (z, y, x); ``channels`` is (3, z, y, x) int16."""

    name: str
    seed: int
    channels: np.ndarray
    spacing: tuple                 # (z, y, x) mm
    labels: np.ndarray             # uint8: 0 outside the LV, 1..4 = CLASS_NAMES
    mask: np.ndarray               # bool: labels > 0
    class_means: np.ndarray        # (4, 3) this patient's class means, crop-z-score units
    infarct_slices: tuple          # slice indices holding scar
    channel_names: tuple = SEQUENCES
    class_names: tuple = CLASS_NAMES
    synthetic: bool = True

    @property
    def has_infarct(self) -> bool:
        return bool(self.infarct_slices)

    def crop_zscored(self) -> np.ndarray:
        """float32 (3, z, y, x): each slice of each sequence z-scored over the whole crop (MyoPS units)."""
        x = self.channels.astype(np.float64)
        centre = x.mean(axis=(2, 3), keepdims=True)
        scale = x.std(axis=(2, 3), keepdims=True)
        return ((x - centre) / scale).astype(np.float32)

    def prior_means(self, means_z: np.ndarray = MU_DATA) -> np.ndarray:
        """(4, 3) class means in this case's input units from crop-z-score means (default ``MU_DATA``).

        Uses only the image (the crop's mean and SD of each sequence over the whole stack), never the
        truth: what a user of ``segment(..., prior_means=...)`` can do with published statistics.
        """
        x = self.channels.astype(np.float64).reshape(len(self.channel_names), -1)
        return x.mean(1) + np.asarray(means_z, dtype=np.float64) * x.std(1)


# ----------------------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One patient's geometry, all lengths in mm. z runs from the LV equator (0) to the apex."""

    endo_radius: float       # at the equator
    wall_mm: float
    wall_harmonics: np.ndarray   # (3, 2) cos/sin amplitudes of the wall thickness around the ring
    ellipticity: float
    ellipse_angle: float
    long_axis: float         # endocardial half-length (equator to the endocardial apex)
    apex_wall: float
    first_slice_z: float     # z of slice 0 (the base; near the equator)
    centre: np.ndarray       # (y, x) at the equator
    drift: np.ndarray        # (y, x) centre shift at the apex
    rv_angle: float
    rv_extent: float         # RV reaches this fraction of the long axis
    fat_mm: float
    infarct: dict | None     # sector parameters, None = no infarct


def _draw_anatomy(rng: np.random.Generator, n_slices: int, thickness: float, fov: float,
                  p_no_infarct: float) -> Anatomy:
    long_axis = (n_slices - 0.5) * thickness * rng.uniform(0.95, 1.1)
    infarct = None
    if rng.random() >= p_no_infarct:
        half_angle = np.deg2rad(rng.uniform(25, 55))
        t_half = rng.uniform(0.15, 0.35)
        infarct = dict(
            angle=rng.uniform(-np.pi, np.pi), half_angle=half_angle,
            t_centre=rng.uniform(0.3, 0.85), t_half=t_half,
            transmurality=rng.uniform(0.7, 1.0),
            # the area at risk reaches further around the ring and along the axis
            edema_half_angle=half_angle + np.deg2rad(rng.uniform(15, 30)),
            edema_t_half=t_half + rng.uniform(0.08, 0.15),
        )
    return Anatomy(
        endo_radius=rng.uniform(20.0, 27.0), wall_mm=rng.uniform(7.0, 11.0),
        wall_harmonics=rng.normal(0.0, 0.06, size=(3, 2)),
        ellipticity=rng.uniform(0.0, 0.08), ellipse_angle=rng.uniform(0, np.pi),
        long_axis=long_axis, apex_wall=rng.uniform(5.0, 8.0),
        first_slice_z=rng.uniform(0.05, 0.2) * long_axis,
        centre=rng.uniform(-0.06, 0.06, size=2) * fov, drift=rng.normal(0.0, 3.0, size=2),
        rv_angle=np.deg2rad(rng.uniform(150, 210)), rv_extent=rng.uniform(0.65, 0.85),
        fat_mm=rng.uniform(1.5, 3.0), infarct=infarct,
    )


def _sector_profile(theta: np.ndarray, t: float, centre_angle: float, half_angle: float,
                    t_centre: float, t_half: float) -> np.ndarray:
    """1 at the sector's core, falling to 0 at its angular and long-axis edges (negative outside)."""
    d_angle = np.angle(np.exp(1j * (theta - centre_angle)))  # wrapped to (-pi, pi]
    return (1 - (d_angle / half_angle) ** 2) * (1 - ((t - t_centre) / t_half) ** 2) if abs(t - t_centre) < t_half \
        else np.full(theta.shape, -1.0)


def _tissue_indices(a: Anatomy, z: float, yy: np.ndarray, xx: np.ndarray, fov: float) -> np.ndarray:
    """Index into TISSUES of every point (yy, xx) mm of the plane at long-axis position z mm."""
    t = z / a.long_axis
    centre = a.centre + a.drift * np.clip(t, 0, 1)
    dy, dx = yy - centre[0], xx - centre[1]
    r = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    ring = 1 + a.ellipticity * np.cos(2 * (theta - a.ellipse_angle))
    wall = a.wall_mm * (1 + sum(c * np.cos((n + 1) * theta) + s * np.sin((n + 1) * theta)
                                for n, (c, s) in enumerate(a.wall_harmonics)))
    shrink_endo = np.sqrt(max(0.0, 1 - t ** 2))
    shrink_epi = np.sqrt(max(0.0, 1 - (z / (a.long_axis + a.apex_wall)) ** 2))
    r_endo = a.endo_radius * ring * shrink_endo
    r_epi = (a.endo_radius * ring + wall) * shrink_epi
    blood = r < r_endo
    myocardium = (r >= r_endo) & (r < r_epi)

    out = np.full(r.shape, TISSUES.index("soft-tissue"), dtype=np.int8)
    # lungs: two large ellipses left and right of the heart
    for side in (-1, 1):
        ly, lx = yy - 0.05 * fov, xx - side * 0.5 * fov
        out[(ly / (0.38 * fov)) ** 2 + (lx / (0.17 * fov)) ** 2 < 1] = TISSUES.index("lung")
    r_outer = a.endo_radius + a.wall_mm
    if t < a.rv_extent:  # RV blood: a crescent beside the septum, shorter than the LV
        rv_scale = np.sqrt(1 - (t / a.rv_extent) ** 2)
        ry = dy - np.sin(a.rv_angle) * 0.9 * r_outer
        rx = dx - np.cos(a.rv_angle) * 0.9 * r_outer
        along = rx * np.cos(a.rv_angle) + ry * np.sin(a.rv_angle)
        across = -rx * np.sin(a.rv_angle) + ry * np.cos(a.rv_angle)
        rv = (along / (0.75 * r_outer * rv_scale + 1e-6)) ** 2 + (across / (1.4 * r_outer * rv_scale + 1e-6)) ** 2 < 1
        out[rv & (r > r_epi + 3.0)] = TISSUES.index("rv-blood")
    out[(r >= r_epi) & (r < r_epi + a.fat_mm)] = TISSUES.index("fat")
    out[myocardium] = TISSUES.index("myocardium")
    out[blood] = TISSUES.index("blood")

    if a.infarct is not None:
        f = a.infarct
        depth = (r - r_endo) / np.maximum(r_epi - r_endo, 1e-6)  # 0 endocardium .. 1 epicardium
        edema = _sector_profile(theta, t, f["angle"], f["edema_half_angle"], f["t_centre"], f["edema_t_half"]) > 0
        core = _sector_profile(theta, t, f["angle"], f["half_angle"], f["t_centre"], f["t_half"])
        scar = (core > 0) & (depth < f["transmurality"] * np.sqrt(np.clip(core, 0, 1)) + 0.15)
        out[myocardium & edema] = TISSUES.index("edema")
        out[myocardium & scar] = TISSUES.index("scar")
    return out


def tissue_fractions(a: Anatomy, n_slices: int, thickness: float, pixel: float, size: int,
                     supersampling: int) -> np.ndarray:
    """float32 (len(TISSUES), z, y, x): the share of each voxel taken by each tissue (partial volume).

    Each voxel is sampled at ``supersampling`` points per in-plane axis and through the slice
    thickness, so boundaries (and the LV's shrinking along its axis within a thick slice) blend.
    """
    s = int(supersampling)
    offsets = (np.arange(s) + 0.5) / s - 0.5
    axis = (np.arange(size)[:, None] + offsets[None, :]).ravel() * pixel - size * pixel / 2
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    fov = size * pixel
    fractions = np.zeros((len(TISSUES), n_slices, size, size), dtype=np.float32)
    for k in range(n_slices):
        counts = np.zeros((len(TISSUES), size * s, size * s), dtype=np.float32)
        for dz in offsets:
            z = a.first_slice_z + (k + dz) * thickness
            index = _tissue_indices(a, z, yy, xx, fov)
            counts += np.stack([index == i for i in range(len(TISSUES))])
        fractions[:, k] = counts.reshape(len(TISSUES), size, s, size, s).mean(axis=(2, 4)) / s
    return fractions


# ----------------------------------------------------------------------------- intensities


def _texture(rng: np.random.Generator, shape: tuple, sigma_px: float) -> np.ndarray:
    """Unit-variance smooth random field, correlated in-plane only (thick slices are independent)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0, sigma_px, sigma_px))
    return field / field.std()


def _calibrate_background(image: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Rescale the other tissues (affinely, slice by slice) so each slice has mean 0 and SD 1.

    MU_DATA is in units of a slice z-scored over its whole crop, LV included; fixing the crop's
    mean and SD this way keeps the LV intensities exactly in those units. ``fixed`` marks the voxels
    left as they are (mostly blood pool or LV tissue: the RV blood stays equal to the LV blood).
    """
    out = image.copy()
    for k in range(image.shape[0]):
        free = ~fixed[k]
        n, n_free = image[k].size, int(free.sum())
        kept, b = image[k][~free], image[k][free]
        target_mean = -kept.sum() / n_free                         # mean of the rest for slice mean 0
        room = n - (kept ** 2).sum() - n_free * target_mean ** 2  # sum of squares left for SD 1
        if room <= 0 or b.std() == 0:
            raise ValueError("The heart fills too much of the crop to z-score it: use a larger size.")
        out[k][free] = target_mean + (b - b.mean()) * np.sqrt(room / n_free) / b.std()
    return out


def _render(fractions: np.ndarray, means: np.ndarray, sigmas: np.ndarray, settings: PhantomSettings,
            rng: np.random.Generator, pixel: float) -> np.ndarray:
    """float64 (3, z, y, x) crop-z-score image: fraction-weighted means, texture and noise."""
    shape = fractions.shape[1:]
    fixed = fractions[:N_LV + 1].sum(0) >= 0.5  # the LV classes and the RV blood (the first TISSUES)
    images = []
    for c in range(len(SEQUENCES)):
        texture = _texture(rng, shape, settings.texture_mm / pixel)
        noise = rng.standard_normal(shape)
        mean = np.einsum("t...,t->...", fractions, means[:, c])
        sd = np.sqrt(np.einsum("t...,t->...", fractions, sigmas[:, c] ** 2))
        share = settings.texture_share
        image = mean + sd * (np.sqrt(share) * texture + np.sqrt(1 - share) * noise)
        images.append(_calibrate_background(image, fixed))
    return np.stack(images)


def _to_scanner_units(image: np.ndarray, rng: np.random.Generator, amplitude: float, seed: int) -> np.ndarray:
    out = np.empty(image.shape, dtype=np.int16)
    everywhere = np.ones(image.shape[1:], dtype=bool)
    for c, name in enumerate(SEQUENCES):
        gain, offset = SCANNER_UNITS[name]
        signal = gain * rng.uniform(0.8, 1.25) * (image[c] + offset)
        signal = signal * bias_field(image.shape[1:], everywhere, amplitude, seed * 7 + c)
        out[c] = np.clip(np.rint(signal), 0, np.iinfo(np.int16).max).astype(np.int16)
    return out


# ----------------------------------------------------------------------------- cases


def generate_case(seed: int, settings: PhantomSettings = PhantomSettings()) -> CardiacCase:
    """One synthetic patient; the same seed and settings give the same case, bit for bit."""
    rng = np.random.default_rng([int(seed), 0xCA4D])
    n_slices = int(rng.integers(settings.n_slices[0], settings.n_slices[1] + 1))
    thickness = float(rng.uniform(*settings.slice_thickness_mm))
    pixel = float(rng.uniform(*settings.pixel_mm))
    anatomy = _draw_anatomy(rng, n_slices, thickness, settings.size * pixel, settings.p_no_infarct)
    fractions = tissue_fractions(anatomy, n_slices, thickness, pixel, settings.size, settings.supersampling)

    class_means = MU_DATA + rng.normal(0.0, settings.mean_jitter, size=MU_DATA.shape)
    means = np.vstack([class_means, BACKGROUND_MEANS])
    means[N_LV + BACKGROUND_NAMES.index("rv-blood")] = class_means[0]
    sigmas = settings.noise_scale * np.vstack([SIGMA_DATA, np.full((len(BACKGROUND_NAMES), 3), BACKGROUND_SIGMA)])
    image = _render(fractions, means, sigmas, settings, rng, pixel)
    channels = _to_scanner_units(image, rng, settings.bias_amplitude, int(seed))

    lv = fractions[:N_LV]
    mask = lv.sum(0) >= 0.5
    labels = np.where(mask, lv.argmax(0) + 1, 0).astype(np.uint8)
    infarct_slices = tuple(int(k) for k in np.flatnonzero((labels == 4).any(axis=(1, 2))))
    return CardiacCase(
        name=f"cardiac-{seed:03d}", seed=int(seed), channels=channels, spacing=(thickness, pixel, pixel),
        labels=labels, mask=mask, class_means=class_means, infarct_slices=infarct_slices,
    )


def generate_cohort(n_cases: int, first_seed: int = 0, settings: PhantomSettings = PhantomSettings()) -> list:
    """``n_cases`` patients with seeds first_seed, first_seed + 1, ..."""
    return [generate_case(first_seed + i, settings) for i in range(int(n_cases))]


# ----------------------------------------------------------------------------- painted seeds


def seed_strokes(labels: np.ndarray, seed: int, max_fraction: float = 0.01, strokes_per_class: int = 3,
                 stroke_voxels: int = 8) -> np.ndarray:
    """Simulated painted strokes: uint8 like ``labels``, class k on a few voxels of class k, 0 elsewhere.

    Each class present gets ``strokes_per_class`` short in-plane strokes (a random walk of up to
    ``stroke_voxels`` voxels that keeps inside the class, away from its border when the class is
    thick enough, as a user paints the clear interior). All strokes together mark at most
    ``max_fraction`` of the mask (labels > 0): each class's share of that budget is a hard cap.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 0x5EED])
    classes = [k for k in range(1, int(labels.max(initial=0)) + 1) if (labels == k).any()]
    if not classes:
        raise ValueError("labels hold no class > 0: nothing to mark.")
    budget = int(max_fraction * np.count_nonzero(labels)) // len(classes)
    if budget < 1:
        raise ValueError(f"max_fraction={max_fraction} of the mask leaves no voxel per class: raise it.")
    in_plane = np.zeros((1, 3, 3), dtype=bool)
    in_plane[0, 1, :] = in_plane[0, :, 1] = True
    steps = np.array([(0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1), (0, -1, -1), (0, -1, 1), (0, 1, -1), (0, 1, 1)])
    strokes = np.zeros(labels.shape, dtype=np.uint8)
    for k in classes:
        region = labels == k
        interior = ndimage.binary_erosion(region, structure=in_plane)
        allowed = interior if interior.any() else region
        candidates = np.argwhere(allowed)
        marked = 0
        for _ in range(strokes_per_class):
            point = candidates[rng.integers(len(candidates))]
            direction = steps[rng.integers(len(steps))]
            for _ in range(stroke_voxels):
                if marked >= budget:
                    break
                if strokes[tuple(point)] == 0:
                    strokes[tuple(point)] = k
                    marked += 1
                # keep the direction mostly (a stroke, not a blob); turn when leaving the class
                options = [direction] * 4 + list(steps)
                for trial in rng.permutation(len(options)):
                    nxt = point + options[trial]
                    if all(0 <= nxt[i] < labels.shape[i] for i in range(3)) and allowed[tuple(nxt)]:
                        point, direction = nxt, options[trial]
                        break
                else:
                    break
    return strokes

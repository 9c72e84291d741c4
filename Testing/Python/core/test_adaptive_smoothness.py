"""deepsvg's default smoothness from the image's noise: the noise estimate, the rule, the engine."""

import numpy as np
import pytest

from DeepGMMSegmentLib import options, segment
from DeepGMMSegmentLib.core.inputs import noise_level, normalize_channels


def _blocks(shape, rng, sigma):
    """Piecewise-constant classes (blocks along the last axis) plus Gaussian noise of ``sigma``."""
    clean = np.repeat(np.arange(3.0), shape[-1] // 3 + 1)[: shape[-1]] * np.ones(shape)
    return clean + rng.normal(0.0, sigma, shape), clean


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.6])
def test_noise_level_recovers_the_noise_in_units_of_the_channel_sd(sigma):
    rng = np.random.default_rng(1)
    image, _ = _blocks((12, 40, 45), rng, sigma)
    mask = np.ones(image.shape, bool)
    norm, _, scale = normalize_channels(image[None].astype(np.float32), mask)
    estimate = noise_level(norm, mask, (1.0, 1.0, 1.0))
    assert estimate == pytest.approx(sigma / scale[0], rel=0.1)


def test_noise_level_ignores_thick_slices_and_takes_the_least_noisy_channel():
    rng = np.random.default_rng(2)
    quiet, _ = _blocks((10, 30, 33), rng, 0.2)
    quiet += np.arange(10)[:, None, None] * 3.0  # anatomy that changes from slice to slice
    noisy, _ = _blocks((10, 30, 33), rng, 1.0)
    mask = np.ones(quiet.shape, bool)
    norm, _, scale = normalize_channels(np.stack([quiet, noisy]).astype(np.float32), mask)
    thick = noise_level(norm, mask, (8.0, 1.4, 1.4))
    assert thick == pytest.approx(0.2 / scale[0], rel=0.1)  # channel 1, in-plane pairs only
    assert noise_level(norm, mask, (1.0, 1.0, 1.0)) > 1.4 * thick  # slice-to-slice changes taken for noise


def test_adaptive_smoothness_rule():
    floor, base = options.SMOOTHNESS_NOISE_FLOOR, options.DEFAULT_SMOOTHNESS["deepsvg"]
    assert options.adaptive_smoothness(0.0) == options.adaptive_smoothness(floor) == base
    values = [options.adaptive_smoothness(n) for n in np.linspace(floor, 2.0, 30)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert options.adaptive_smoothness(floor + 0.18) == pytest.approx(base + 0.2)
    assert options.adaptive_smoothness(5.0) == options.MAX_ADAPTIVE_SMOOTHNESS


def test_deepsvg_takes_its_smoothness_from_the_noise_unless_given():
    rng = np.random.default_rng(3)
    clean_image, truth = _blocks((30, 36), rng, 0.02)
    noisy_image, _ = _blocks((30, 36), rng, 0.6)
    quick = dict(method="deepsvg", max_iter=2, min_iter=2, warm_start_iter=1, device="cpu")
    with pytest.warns(RuntimeWarning):  # one distillation step does not reproduce the start
        clean = segment(clean_image, 3, **quick)
        noisy = segment(noisy_image, 3, **quick)
        given = segment(noisy_image, 3, smoothness=0.1, **quick)
        anchored = segment(noisy_image, 3, prior_means=[[0.0], [1.0], [2.0]], **quick)
        seeds = np.zeros(noisy_image.shape, np.int64)
        seeds[5, 2], seeds[5, 18], seeds[5, 30] = 1, 2, 3
        seeded = segment(noisy_image, 3, seeds=seeds, **quick)
    assert clean.options["smoothness"] == options.DEFAULT_SMOOTHNESS["deepsvg"]
    norm, _, _ = normalize_channels(noisy_image[None].astype(np.float32), np.ones(noisy_image.shape, bool))
    expected = options.adaptive_smoothness(noise_level(norm, np.ones(noisy_image.shape, bool)))
    assert expected > options.DEFAULT_SMOOTHNESS["deepsvg"]
    assert noisy.options["smoothness"] == pytest.approx(expected)
    assert given.options["smoothness"] == 0.1
    # prior means or seeds anchor the classes: the constant default (measured better there)
    assert anchored.options["smoothness"] == seeded.options["smoothness"] == options.DEFAULT_SMOOTHNESS["deepsvg"]
    assert options.resolve_options("deepg")["smoothness"] == 0.0
    assert options.resolve_options("deepsvg")["smoothness"] is None

"""The evaluation's method table: our bias-field variants run the engine with the field on."""

import numpy as np
import pytest

from evaluation import methods, metrics


def _shaded_three_class_image(seed: int = 0):
    """A 2D three-class image under a +-40 % linear multiplicative field, with its truth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    truth = np.ones((64, 64), np.uint8)
    truth[(yy // 8 + xx // 8) % 3 == 1] = 2
    truth[(yy // 8 + xx // 8) % 3 == 2] = 3
    clean = np.array([0.0, 30.0, 60.0, 90.0])[truth] + rng.normal(0, 2.0, truth.shape)
    field = 1.0 + 0.4 * (xx / 63.0 * 2 - 1)
    return (clean * field)[None].astype(np.float32), np.ones(truth.shape, bool), truth


def test_every_method_has_a_runner_and_a_label():
    assert set(methods.SPECS) == set(methods._RUNNERS)
    assert set(methods.ALL_OURS) <= set(methods.SPECS)


def test_bias_variant_estimates_the_field_that_plain_em_gmm_ignores():
    channels, mask, truth = _shaded_three_class_image()
    plain = methods.run("em-gmm", channels, mask, (1.0, 1.0), 3)
    corrected = methods.run("em-gmm-bias", channels, mask, (1.0, 1.0), 3)
    dice_plain = np.mean(metrics.matched_dice(plain.labels, truth, 3, False)[0])
    dice_bias = np.mean(metrics.matched_dice(corrected.labels, truth, 3, False)[0])
    assert dice_bias > 0.97
    assert dice_bias > dice_plain + 0.05


def test_peers_refuse_engine_options():
    channels, mask, _ = _shaded_three_class_image()
    with pytest.raises(ValueError, match="takes no options"):
        methods.run("sklearn-gmm", channels, mask, (1.0, 1.0), 3, bias_field="auto")

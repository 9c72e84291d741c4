"""bias_field="detect" (the default): a field is corrected only when the image shows one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepGMMSegmentLib import options, segment
from DeepGMMSegmentLib.core import bias_field as bf
from phantoms import ellipse_mask, matched_dice, positive_phantom, smooth_field

SHAPE = (64, 64)
LARGE = (3.0, 3.0)  # mm: the mask spans about 180 mm, a head-sized field of view
SMALL = (1.0, 1.0)  # the same grid as a 64 mm region (an ROI)


@pytest.fixture(scope="module")
def images():
    data, truth = positive_phantom(SHAPE)
    mask = ellipse_mask(SHAPE)
    field = smooth_field(SHAPE, 0.4, seed=7, mask=mask)
    return data[0], data[0] * field, field, mask, np.where(mask, truth, 0)


def test_the_extent_of_a_mask_in_mm():
    mask = np.zeros((10, 20, 30), dtype=bool)
    mask[2:5, 3:13, 0:30] = True
    np.testing.assert_allclose(bf.mask_extent_mm(mask, (2.0, 1.0, 0.5)), [6.0, 10.0, 15.0])
    np.testing.assert_allclose(bf.mask_extent_mm(mask), [3.0, 10.0, 30.0])  # no spacing: voxels


def test_a_strong_field_is_detected_and_a_clean_image_is_not(images):
    clean, biased, field, mask, _ = images
    found = bf.detect_bias_field(biased[None], mask, 3, spacing=LARGE)
    assert found.detected, found.reason
    true_sd = np.log(field[mask]).std()
    assert abs(found.strength - true_sd) < 0.03, (found.strength, true_sd)
    assert "detected" in found.reason
    none = bf.detect_bias_field(clean[None], mask, 3, spacing=LARGE)
    assert not none.detected and none.strength < options.BIAS_FIELD_DETECTION_THRESHOLD / 2, none
    assert "no bias field corrected" in none.reason


def test_a_small_region_or_a_signed_image_is_not_looked_at(images, monkeypatch):
    _, biased, _, mask, _ = images

    def no_fit(*args, **kwargs):
        raise AssertionError("no joint fit should run")

    monkeypatch.setattr(bf, "fit_mixture_with_bias", no_fit)
    small = bf.detect_bias_field(biased[None], mask, 3, spacing=SMALL)
    assert not small.detected and np.isnan(small.strength)
    assert "shorter than 120 mm" in small.reason
    signed = bf.detect_bias_field((biased - biased[mask].mean())[None], mask, 3, spacing=LARGE)
    assert not signed.detected and "not positive" in signed.reason


def test_detection_on_a_sample_agrees_with_every_voxel(images):
    _, biased, _, mask, _ = images
    every = bf.detect_bias_field(biased[None], mask, 3, spacing=LARGE, n_voxels=mask.size)
    sample = bf.detect_bias_field(biased[None], mask, 3, spacing=LARGE, n_voxels=1000)
    assert mask.sum() > 1000
    assert abs(every.strength - sample.strength) < 0.02, (every.strength, sample.strength)


def test_the_default_corrects_a_detected_field_as_auto_does(images):
    _, biased, _, mask, reference = images
    assert options.resolve_options("em-gmm")["bias_field"] == "detect"
    plain = segment(biased, 3, method="em-gmm", mask=mask, spacing=LARGE, bias_field="none")
    default = segment(biased, 3, method="em-gmm", mask=mask, spacing=LARGE)
    always = segment(biased, 3, method="em-gmm", mask=mask, spacing=LARGE, bias_field="auto")
    np.testing.assert_array_equal(default.labels, always.labels)  # the detection has its own random state
    np.testing.assert_array_equal(default.bias_field, always.bias_field)
    assert matched_dice(default.labels, reference, 3) > matched_dice(plain.labels, reference, 3) + 0.05
    assert any("bias field was detected" in note for note in default.notes), default.notes
    assert default.options["bias_field"] == "detect"


@pytest.mark.parametrize("spacing, image", [(LARGE, "clean"), (SMALL, "biased")])
def test_the_default_is_the_plain_fit_when_nothing_is_detected(images, spacing, image):
    clean, biased, _, mask, _ = images
    data = clean if image == "clean" else biased
    state = torch.get_rng_state()
    default = segment(data, 3, method="em-gmm", mask=mask, spacing=spacing)
    assert torch.equal(torch.get_rng_state(), state)
    plain = segment(data, 3, method="em-gmm", mask=mask, spacing=spacing, bias_field="none")
    np.testing.assert_array_equal(default.labels, plain.labels)
    np.testing.assert_array_equal(default.probabilities, plain.probabilities)
    assert default.bias_field is None and default.corrected is None
    assert not any("bias field" in note for note in default.notes)


def test_detect_is_accepted_and_resolves_to_the_default_order():
    assert options.resolve_bias_field_order("detect") == options.DEFAULT_BIAS_FIELD_ORDER
    assert options.detects_bias_field("Detect ") and not options.detects_bias_field("auto")
    assert not options.detects_bias_field(3)


def test_the_detection_stops_its_joint_fit_at_its_own_tolerance(images, monkeypatch):
    # the detection's fit only estimates a strength, so it stops earlier than a fit whose field is used
    _, biased, _, mask, _ = images
    seen = []
    joint_fit = bf.fit_mixture_with_bias

    def spy(*args, **kwargs):
        seen.append(kwargs.get("tol"))
        return joint_fit(*args, **kwargs)

    monkeypatch.setattr(bf, "fit_mixture_with_bias", spy)
    assert bf.detect_bias_field(biased[None], mask, 3, spacing=LARGE).detected
    assert seen == [options.BIAS_FIELD_DETECTION_TOL] and options.BIAS_FIELD_DETECTION_TOL > 1e-5

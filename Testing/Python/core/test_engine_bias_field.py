"""segment(..., bias_field=...): the joint bias field through the engine, for every method."""

from __future__ import annotations

import numpy as np
import pytest

from DeepGMMSegmentLib import options, segment
from phantoms import ellipse_mask, field_agreement, matched_dice, positive_phantom, smooth_field

SHAPE = (64, 64)
FAST_DEEP = dict(max_iter=30, min_iter=10, depth=2, base_width=4, warm_start_iter=20, precision="float32")


@pytest.fixture(scope="module")
def phantom():
    data, truth = positive_phantom(SHAPE)
    mask = ellipse_mask(SHAPE)
    true_field = smooth_field(SHAPE, 0.4, seed=7, mask=mask)  # +-40 % inside the mask
    return data[0], data[0] * true_field[...], true_field, mask, np.where(mask, truth, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["em-gmm", "em-svgmm", "deepsvg"])
def test_auto_recovers_the_field_and_the_clean_segmentation(phantom, method, compute_device):
    clean, biased, true_field, mask, reference = phantom
    extra = dict(FAST_DEEP if method == "deepsvg" else {}, device=compute_device)
    without = segment(clean, 3, method=method, mask=mask, **extra)
    assert without.bias_field is None and without.corrected is None
    plain = segment(biased, 3, method=method, mask=mask, **extra)
    result = segment(biased, 3, method=method, mask=mask, bias_field="auto", **extra)

    assert result.bias_field.shape == result.corrected.shape == (1,) + SHAPE
    assert result.bias_field.dtype == result.corrected.dtype == np.float32
    r, error = field_agreement(result.bias_field[0], true_field, mask)
    assert r > 0.9, (r, error)
    np.testing.assert_allclose(result.bias_field[0][mask].mean(), 1.0, rtol=1e-5)
    assert (result.bias_field[0][~mask] == 1).all()
    np.testing.assert_allclose(result.corrected[0], np.where(mask, biased / result.bias_field[0], biased), rtol=1e-5)

    dice_clean = matched_dice(without.labels, reference, 3)
    dice = matched_dice(result.labels, reference, 3)
    assert dice > dice_clean - 0.02, (dice, dice_clean)
    assert dice > matched_dice(plain.labels, reference, 3) + 0.05  # the field hurt without the correction
    # the class means are in the corrected image's units: class 1 is the darkest tissue there
    np.testing.assert_allclose(result.means[:, 0], [result.corrected[0][result.labels == k].mean() for k in (1, 2, 3)],
                               rtol=0.05)


def test_none_and_order_zero_are_the_plain_fit(phantom):
    _, biased, _, mask, _ = phantom
    plain = segment(biased, 3, method="em-gmm", mask=mask, device="cpu")
    for value in ("none", 0):
        result = segment(biased, 3, method="em-gmm", mask=mask, device="cpu", bias_field=value)
        np.testing.assert_array_equal(result.labels, plain.labels)
        assert result.bias_field is None
    assert options.resolve_options("deepsvg")["bias_field"] == "detect"  # corrects only a field it finds


@pytest.mark.parametrize("value", ["strong", -1, options.MAX_BIAS_FIELD_ORDER + 1, 2.5, True])
def test_a_bad_value_is_a_clear_error(phantom, value):
    _, biased, _, mask, _ = phantom
    with pytest.raises(ValueError, match=r"bias_field must be 'none', 'auto', 'detect' or a basis order 0\.\.6.*got"):
        segment(biased, 3, method="em-gmm", mask=mask, bias_field=value)


def test_a_signed_image_is_refused_with_the_fix(phantom):
    _, biased, _, mask, _ = phantom
    with pytest.raises(ValueError, match="bias_field='none'"):
        segment(biased - biased[mask].mean() - 1, 3, method="em-svgmm", mask=mask, bias_field="auto")


def test_a_large_mask_has_its_field_estimated_on_a_sample_and_its_mixture_on_every_voxel(phantom, monkeypatch):
    from DeepGMMSegmentLib import engine
    from DeepGMMSegmentLib.core import bias_field

    clean, biased, true_field, mask, reference = phantom
    everything = segment(biased, 3, method="em-gmm", mask=mask, bias_field="auto", device="cpu")
    sizes = []
    joint_fit = bias_field.fit_mixture_with_bias

    def spy(intensities, basis, *args, **kwargs):
        sizes.append((intensities.shape[0], basis.shape[0]))
        return joint_fit(intensities, basis, *args, **kwargs)

    monkeypatch.setattr(engine, "BIAS_FIELD_FIT_VOXELS", int(mask.sum()) // 3)
    monkeypatch.setattr(bias_field, "fit_mixture_with_bias", spy)
    result = segment(biased, 3, method="em-gmm", mask=mask, bias_field="auto", device="cpu")
    assert sizes == [(int(mask.sum()) // 3,) * 2]  # the joint fit saw the sample only
    r, error = field_agreement(result.bias_field[0], true_field, mask)
    assert r > 0.9, (r, error)
    assert matched_dice(result.labels, reference, 3) > matched_dice(everything.labels, reference, 3) - 0.02
    # the mixture is the one of every corrected voxel: its means are the class means of the corrected image
    np.testing.assert_allclose(result.means[:, 0], [result.corrected[0][result.labels == k].mean() for k in (1, 2, 3)],
                               rtol=0.05)
    probabilities = result.probabilities[:, mask]
    np.testing.assert_allclose(result.weights, probabilities.mean(1), atol=2e-3)

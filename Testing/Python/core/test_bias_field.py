"""Joint bias-field estimation (bias_field.py) on synthetic volumes with a known smooth field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepGMMSegmentLib import options
from DeepGMMSegmentLib.core import bias_field as bf
from DeepGMMSegmentLib.core import em
from phantoms import ellipse_mask, field_agreement, matched_dice, positive_phantom, smooth_field


@pytest.mark.parametrize("shape", [(64, 64), (16, 32, 32)])
@pytest.mark.parametrize("amplitude", [0.2, 0.4])
def test_recovers_a_known_field_and_the_clean_segmentation(shape, amplitude):
    data, truth = positive_phantom(shape)
    mask = ellipse_mask(shape)
    true_field = smooth_field(shape, amplitude, seed=7, mask=mask)
    biased = data * true_field

    corrected = bf.fit_gmm_with_bias(biased, mask, 3, order=3)
    r, error = field_agreement(corrected.field[0], true_field, mask)
    assert r > 0.95 and error < 0.03

    clean = bf.fit_gmm_with_bias(data, mask, 3, order=0)
    uncorrected = bf.fit_gmm_with_bias(biased, mask, 3, order=0)
    reference = np.where(mask, truth, 0)
    dice_clean = matched_dice(clean.labels, reference, 3)
    dice_corrected = matched_dice(corrected.labels, reference, 3)
    dice_uncorrected = matched_dice(uncorrected.labels, reference, 3)
    assert dice_corrected > dice_clean - 0.02
    if amplitude == 0.4:
        assert dice_corrected > dice_uncorrected + 0.05


def test_multichannel_gets_one_field_per_channel():
    shape = (64, 64)
    data, truth = positive_phantom(shape, n_channels=2, seed=3)
    mask = ellipse_mask(shape)
    fields = np.stack([smooth_field(shape, 0.3, seed=11, mask=mask), smooth_field(shape, 0.3, seed=12, mask=mask).T])
    assert np.corrcoef(fields[0][mask], fields[1][mask])[0, 1] < 0.7  # the two truths really differ
    fit = bf.fit_gmm_with_bias(list(data * fields), mask, 3, order=3)
    for c in range(2):
        r, error = field_agreement(fit.field[c], fields[c], mask)
        assert r > 0.95 and error < 0.03
    assert matched_dice(fit.labels, np.where(mask, truth, 0), 3) > 0.97


def test_order_zero_is_plain_em_and_a_field_of_one():
    shape = (48, 48)
    data, _ = positive_phantom(shape)
    mask = ellipse_mask(shape)
    fit = bf.fit_gmm_with_bias(data, mask, 3, order="none", seed=5)
    inside = data[:, mask].astype(np.float64)
    z = torch.from_numpy(((inside.T - inside.mean(1)) / inside.std(1)).astype(np.float32))
    plain = em.fit_gmm(z, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(fit.fit.mixture.log_resp, plain.log_resp)
    assert np.all(fit.field == 1) and np.array_equal(fit.corrected, data)


def test_nll_never_increases_and_field_is_normalised():
    shape = (48, 48)
    data, _ = positive_phantom(shape)
    mask = ellipse_mask(shape)
    original = data * smooth_field(shape, 0.4, seed=2)
    biased = original.copy()
    fit = bf.fit_gmm_with_bias(biased, mask, 3, order=2)
    assert np.array_equal(biased, original)  # the input is not modified
    assert fit.fit.n_outer > 1 and np.all(np.diff(fit.fit.nll_history) <= 1e-9)
    assert fit.fit.nll_history[-1] < fit.fit.nll_history[0] - 0.05  # the field explains real variance
    assert np.all(fit.field[:, ~mask] == 1) and abs(fit.field[0, mask].mean() - 1) < 1e-5
    assert np.allclose(fit.corrected[:, mask], biased[:, mask] / fit.field[:, mask])
    assert np.array_equal(fit.corrected[:, ~mask], biased[:, ~mask])


def test_basis_columns_have_mean_zero_and_the_expected_count():
    mask = ellipse_mask((16, 20, 24))
    basis = bf.bias_basis(mask, 3, spacing=(3.0, 1.0, 1.0))
    assert basis.shape == (mask.sum(), 19)  # Legendre products of total degree 1..3 in 3D
    assert np.abs(basis.astype(np.float64).mean(0)).max() < 1e-6
    assert bf.bias_basis(ellipse_mask((30, 30)), 4).shape[1] == 14
    single_slice = np.zeros((1, 30, 30), bool)
    single_slice[0] = ellipse_mask((30, 30))
    assert bf.bias_basis(single_slice, 3).shape[1] == 9  # the one-slice axis supports no degree


def test_the_basis_of_sampled_indices_is_the_basis_of_the_sampled_mask():
    # the detector builds its basis from a sample's flat indices, without a full-grid mask
    mask = ellipse_mask((16, 20, 24))
    flat = np.sort(np.random.default_rng(0).choice(np.flatnonzero(mask), 300, replace=False))
    sample = np.zeros(mask.shape, bool)
    sample.flat[flat] = True
    from_indices = bf.index_basis(np.unravel_index(flat, mask.shape), 3, spacing=(3.0, 1.0, 1.0))
    assert np.array_equal(from_indices, bf.bias_basis(sample, 3, spacing=(3.0, 1.0, 1.0)))


def test_spacing_changes_the_frame_not_the_fitted_field():
    shape = (12, 40, 40)
    data, _ = positive_phantom(shape, seed=4)
    mask = ellipse_mask(shape)
    biased = data * smooth_field(shape, 0.3, seed=9)
    voxel_units = bf.fit_gmm_with_bias(biased, mask, 3, order=2)
    thick_slices = bf.fit_gmm_with_bias(biased, mask, 3, order=2, spacing=(4.0, 1.0, 1.0))
    assert np.abs(voxel_units.field - thick_slices.field).max() < 1e-3


def test_zeros_and_negative_values_inside_a_positive_image_are_handled():
    shape = (48, 48)
    data, truth = positive_phantom(shape)
    mask = ellipse_mask(shape)
    biased = data * smooth_field(shape, 0.4, seed=1)
    inside = np.flatnonzero(mask.ravel())
    biased.reshape(1, -1)[0, inside[::200]] = 0.0
    biased.reshape(1, -1)[0, inside[100::200]] = -0.3
    fit = bf.fit_gmm_with_bias(biased, mask, 3, order=3)
    assert np.isfinite(fit.field).all() and np.isfinite(fit.corrected).all()
    assert np.all(fit.corrected[0][biased[0] < 0] < 0)  # divided by a positive field, sign kept
    assert matched_dice(fit.labels, np.where(mask, truth, 0), 3) > 0.9


@pytest.mark.parametrize("image, problem", [(np.zeros((24, 24)), "median intensity 0"),
                                             (-1.0 - np.random.default_rng(0).random((24, 24)), "median intensity -")])
def test_non_positive_channel_is_a_clear_error(image, problem):
    with pytest.raises(ValueError, match=problem) as error:
        bf.fit_gmm_with_bias([image], np.ones((24, 24), bool), 2, order=3)
    assert "bias_field='none'" in str(error.value)


def test_resolve_order_accepts_the_option_values_and_rejects_others():
    assert options.resolve_bias_field_order("none") == 0 and options.resolve_bias_field_order("auto") == options.DEFAULT_BIAS_FIELD_ORDER
    assert options.resolve_bias_field_order(4) == 4 and options.resolve_bias_field_order("2") == 2
    for bad in (-1, options.MAX_BIAS_FIELD_ORDER + 1, True, 2.5, "strong"):
        with pytest.raises(ValueError, match="bias_field must be 'none', 'auto', 'detect' or a basis order"):
            options.resolve_bias_field_order(bad)


def test_shape_mismatch_and_empty_mask_are_clear_errors():
    with pytest.raises(ValueError, match="on the mask's grid"):
        bf.fit_gmm_with_bias([np.ones((8, 8))], np.ones((8, 9), bool), 2)
    with pytest.raises(ValueError, match="mask is empty"):
        bf.fit_gmm_with_bias([np.ones((8, 8))], np.zeros((8, 8), bool), 2)

"""End-to-end behaviour of segment() on synthetic phantoms with known classes (real torch; the tests marked
cuda run on ``pytest --device``, the CPU by default)."""

import numpy as np
import pytest
from phantoms import blob_phantom, matched_dice

from DeepGMMSegmentLib import METHODS, segment

FAST_DEEP = dict(max_iter=40, depth=2, warm_start_iter=30)


def _fast(method):
    return FAST_DEEP if method.startswith("deep") else {}


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_2d_two_channel_phantom_is_recovered(method, compute_device):
    channels, truth, _ = blob_phantom((40, 40), n_classes=3, n_channels=2, noise=0.25, seed=1)
    result = segment(channels, 3, method=method, seed=0, device=compute_device, **_fast(method))
    assert matched_dice(result.labels, truth, 3) > 0.9
    assert result.labels.dtype == np.uint8
    assert result.probabilities.dtype == np.float32
    assert result.probabilities.shape == (3, 40, 40)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    assert result.means.shape == (3, 2) and result.covariances.shape == (3, 2, 2)
    assert result.weights.shape == (3,) and abs(result.weights.sum() - 1) < 1e-4
    assert len(result.nll_history) == result.n_iter + 1
    assert result.device.split(":")[0] == compute_device.split(":")[0]
    assert result.seconds > 0 and result.method == method


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["em-gmm", "deepsvg"])
def test_3d_phantom_with_mask(method, compute_device):
    channels, truth, _ = blob_phantom((12, 24, 24), n_classes=3, n_channels=1, noise=0.12, seed=2)
    mask = np.zeros(truth.shape, bool)
    mask[2:10, 3:21, 3:21] = True
    result = segment(channels[0], 3, method=method, mask=mask, spacing=(3.0, 1.0, 1.0), device=compute_device,
                     **_fast(method))
    assert (result.labels[~mask] == 0).all() and (result.labels[mask] > 0).all()
    assert (result.probabilities[:, ~mask] == 0).all()
    np.testing.assert_allclose(result.probabilities[:, mask].sum(0), 1.0, atol=1e-5)
    assert matched_dice(np.where(mask, result.labels, 0), np.where(mask, truth, 0), 3) > 0.85


def test_classes_ordered_by_first_channel_mean():
    channels, truth, true_means = blob_phantom((32, 32), n_classes=4, n_channels=2, noise=0.1, seed=3)
    for method in ("em-gmm", "deepg"):
        result = segment(channels, 4, method=method, **_fast(method))
        assert np.all(np.diff(result.means[:, 0]) > 0), method
        # with the order fixed, labels agree with the truth directly (truth class k has the k-th
        # smallest channel-1 mean), no matching needed
        assert (result.labels == truth).mean() > 0.95, method


def test_prior_means_fix_class_identity():
    channels, truth, true_means = blob_phantom((32, 32), n_classes=3, n_channels=1, noise=0.1, seed=4)
    prior = true_means[::-1]  # ask for the brightest class first
    for method in ("em-gmm", "deepsvg"):
        result = segment(channels, 3, method=method, prior_means=prior, **_fast(method))
        assert np.all(np.diff(result.means[:, 0]) < 0), method
        assert (result.labels == 4 - truth).mean() > 0.95, method


def test_means_and_covariances_are_in_input_units():
    channels, _, _ = blob_phantom((32, 32), n_classes=3, n_channels=2, noise=0.1, seed=5)
    base = segment(channels, 3, method="em-gmm")
    scaled = segment([1000 * channels[0] + 50, 3 * channels[1] - 7], 3, method="em-gmm")
    np.testing.assert_allclose(scaled.means[:, 0], 1000 * base.means[:, 0] + 50, rtol=1e-3, atol=0.5)
    np.testing.assert_allclose(scaled.means[:, 1], 3 * base.means[:, 1] - 7, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(scaled.covariances[:, 0, 0], 1e6 * base.covariances[:, 0, 0], rtol=2e-3)
    np.testing.assert_array_equal(scaled.labels, base.labels)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["em-gmm", "em-svgmm", "deepsvg"])
def test_same_seed_gives_identical_results(method, compute_device):
    channels, _, _ = blob_phantom((24, 24), n_classes=3, n_channels=2, noise=0.3, seed=6)
    a = segment(channels, 3, method=method, seed=7, device=compute_device, **_fast(method))
    b = segment(channels, 3, method=method, seed=7, device=compute_device, **_fast(method))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert a.nll_history == b.nll_history


def test_diag_covariance_gives_diagonal_matrices():
    channels, truth, _ = blob_phantom((32, 32), n_classes=3, n_channels=2, noise=0.2, seed=8)
    result = segment(channels, 3, method="em-gmm", covariance_type="diag")
    off = result.covariances[:, 0, 1]
    assert np.all(off == 0)
    assert matched_dice(result.labels, truth, 3) > 0.9


def test_variance_floor_prevents_collapse():
    # Two well separated values plus one isolated voxel: without a floor a class would collapse
    # onto the single voxel (zero variance, NLL -> -inf).
    img = np.zeros((20, 20), np.float32)
    img[:, 10:] = 1.0
    img[0, 0] = 5.0
    result = segment(img, 3, method="em-gmm")
    assert np.isfinite(result.nll_history).all()
    assert np.all(result.covariances[:, 0, 0] > 0)


@pytest.mark.cuda
def test_deep_fit_lowers_the_nll_and_3d_in_plane_network_runs(compute_device):
    channels, truth, _ = blob_phantom((6, 32, 32), n_classes=3, n_channels=1, noise=0.3, seed=9)
    result = segment(channels, 3, method="deepsvg", spacing=(5.0, 1.0, 1.0), network="3d", warm_start="none", max_iter=40,
                     min_iter=40, base_width=4, device=compute_device)
    assert result.n_iter == 40
    assert result.nll_history[-1] < result.nll_history[0]


def test_voxel_normalisation_matches_the_volume_normalisation_and_keeps_the_input():
    from DeepGMMSegmentLib.core.inputs import normalize_channels, normalize_voxels

    rng = np.random.default_rng(4)
    data = rng.normal(50.0, 12.0, size=(2, 6, 9, 7)).astype(np.float32)
    mask = rng.random((6, 9, 7)) > 0.4
    before = data.copy()
    volume, centre_v, scale_v = normalize_channels(data, mask)
    voxels, centre, scale = normalize_voxels(data, mask)
    np.testing.assert_array_equal(data, before)  # inputs are never modified
    np.testing.assert_allclose(centre, centre_v) and np.testing.assert_allclose(scale, scale_v)
    np.testing.assert_allclose(voxels, volume[:, mask].T, rtol=1e-6, atol=1e-6)
    assert voxels.dtype == np.float32 and voxels.shape == (mask.sum(), 2)
    np.testing.assert_allclose(voxels.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(voxels.std(0), 1.0, atol=1e-5)
    assert (volume[:, ~mask] == 0).all()

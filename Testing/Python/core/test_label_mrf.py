"""deepsvg's final labels from the fitted model under a Potts prior (core.label_mrf; real torch, CPU)."""

import numpy as np
import pytest
import torch

from DeepGMMSegmentLib import options, segment
from DeepGMMSegmentLib.core.inputs import fine_axes, noise_level
from DeepGMMSegmentLib.core import gmm
from DeepGMMSegmentLib.core.label_mrf import neighbour_sum, potts_mean_field, relabel

FAST_DEEP = dict(max_iter=100, min_iter=40, depth=2, base_width=4, warm_start_iter=40, warm_start_learning_rate=None,
                 precision="float32", network="2d")


def test_the_neighbour_sum_adds_the_face_neighbours_along_the_given_axes_only():
    torch.manual_seed(0)
    grid = torch.rand(2, 4, 5, 6)
    total = neighbour_sum(grid, (0, 2))
    expected = torch.zeros_like(grid)
    for z in range(4):
        for y in range(5):
            for x in range(6):
                for dz, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    if 0 <= z + dz < 4 and 0 <= x + dx < 6:
                        expected[:, z, y, x] += grid[:, z + dz, y, x + dx]
    assert torch.allclose(total, expected, atol=1e-6)
    # a reused buffer is overwritten, whatever it held
    assert torch.allclose(neighbour_sum(grid, (0, 2), out=torch.full_like(grid, 7.0)), expected, atol=1e-6)
    # no axis with neighbours: nothing to add
    flat = torch.rand(2, 1, 5, 6)
    assert torch.equal(neighbour_sum(flat, (0,), out=torch.full_like(flat, 7.0)), torch.zeros_like(flat))


def test_thick_slices_are_not_fine_axes():
    assert fine_axes((8, 64, 64), (8.0, 1.25, 1.25)) == (1, 2)
    assert fine_axes((8, 64, 64), (1.5, 1.25, 1.25)) == (0, 1, 2)
    assert fine_axes((1, 64, 64), None) == (1, 2)  # a single slice has no neighbours along its axis


def test_without_strength_the_labels_are_the_unary_posterior():
    torch.manual_seed(0)
    mask = torch.ones(5, 6, dtype=torch.bool)
    unary = torch.randn(30, 3)
    assert torch.allclose(potts_mean_field(unary, mask, 0.0, 10, (0, 1)), unary.log_softmax(1))


def _noisy_field_with_a_line():
    """A 2-class 20 x 20 image's log-likelihoods: class 0 everywhere, a one-voxel row of class 1,
    and isolated voxels whose likelihood slightly favours class 1 (noise)."""
    truth = torch.zeros(20, 20, dtype=torch.long)
    truth[10] = 1
    unary = torch.stack([(truth == 0).float() * 3.0, (truth == 1).float() * 3.0], -1)  # a clear line
    flips = torch.zeros(20, 20, dtype=torch.bool)
    flips[2:8:3, 2:18:4] = True  # isolated voxels away from the line
    unary[flips] = torch.tensor([0.0, 0.5])  # weak evidence for class 1
    return truth, flips, unary.reshape(-1, 2)


def test_the_potts_prior_removes_isolated_flips_and_keeps_a_line_the_image_shows():
    truth, flips, unary = _noisy_field_with_a_line()
    mask = torch.ones(20, 20, dtype=torch.bool)
    alone = potts_mean_field(unary, mask, 0.0, 10, (0, 1)).argmax(1).reshape(20, 20)
    assert (alone[flips] == 1).all()  # the voxel's own evidence alone keeps the noise
    labels = potts_mean_field(unary, mask, options.LABEL_MRF, options.LABEL_MRF_ITER, (0, 1)).argmax(1).reshape(20, 20)
    assert (labels[flips] == 0).all()
    assert torch.equal(labels, truth)


def test_seeded_voxels_keep_their_class():
    truth, _, unary = _noisy_field_with_a_line()
    fixed = torch.full((400,), -1, dtype=torch.long)
    fixed[:20] = 1  # the first row is marked as class 1 against its likelihood
    log_q = potts_mean_field(unary, torch.ones(20, 20, dtype=torch.bool), 0.5, 10, (0, 1), fixed)
    assert torch.allclose(log_q[:20].exp(), torch.tensor([0.0, 1.0]).expand(20, 2))
    assert torch.allclose(log_q.exp().sum(1), torch.ones(400))


def test_the_network_output_stays_when_the_gaussians_would_empty_a_class():
    """Gaussians that do not separate the classes yet (a short, cold-started fit) lose the middle class."""
    torch.manual_seed(0)
    truth = torch.arange(3).repeat_interleave(100)  # (300,) voxels, a confident network output
    log_weights = torch.full((300, 3), -6.0).scatter_(1, truth[:, None], 0.0).log_softmax(1)
    params = gmm.make_parameters(torch.tensor([[0.0], [0.01], [0.02]]), torch.ones(3, 1, 1), "full")
    x = torch.randn(300, 1)
    mask = torch.ones(300, dtype=torch.bool)
    log_q, note = relabel(log_weights, torch.tensor([0.45, 0.1, 0.45]), params, x, mask, (0,), 0.5, (0.0, 1.0), 10)
    assert log_q is log_weights and "emptied a class" in note
    # the network's weights at full strength keep every class: the relabelling goes ahead
    log_q, note = relabel(log_weights, torch.tensor([0.45, 0.1, 0.45]), params, x, mask, (0,), 0.5, (1.0, 1.0), 10)
    assert note is None and torch.equal(log_q.argmax(1), truth)


def test_the_prior_moves_from_the_global_weights_to_the_networks_with_the_noise():
    floor, full = options.SMOOTHNESS_NOISE_FLOOR, options.LABEL_NOISE_FULL_NETWORK
    assert options.label_prior_exponents(0.0) == options.label_prior_exponents(floor) == (0.0, 1.0)
    noisy = (1.0, options.LABEL_GLOBAL_WEIGHT_NOISY)
    assert options.label_prior_exponents(full) == pytest.approx(noisy) and options.label_prior_exponents(2.0) == noisy
    network, overall = options.label_prior_exponents((floor + full) / 2)
    assert 0 < network < 1 and options.LABEL_GLOBAL_WEIGHT_NOISY < overall < 1


def thin_lines(noise: float, seed: int = 0):
    """Two flat halves crossed by one-voxel lines of a third, brighter tissue."""
    rng = np.random.default_rng(seed)
    truth = np.ones((48, 48), np.uint8)
    truth[:, 24:] = 2
    truth[4::8, :] = 3  # thin structures: every 8th row, one voxel wide
    image = np.array([1.0, 1.0, 1.6, 2.4])[truth] + rng.normal(0, noise, truth.shape)
    return image.astype(np.float32), truth


def _log_gaussians(image, means, covariances):
    """(V, K) log-densities of a one-channel image's voxels, float64."""
    x = image.reshape(-1).astype(np.float64)[:, None]
    var = covariances[:, 0, 0].astype(np.float64)
    return -0.5 * (np.log(2 * np.pi * var) + (x - means[:, 0]) ** 2 / var)


def test_the_labels_are_the_fitted_models_posterior_under_the_potts_prior():
    """segment() relabels its own fit: the maps equal the mean field recomputed from the network's
    output (label_mrf="off"), the Gaussians, the global weights and the image's noise."""
    image, truth = thin_lines(noise=0.18)  # noise level 0.43: between clean and noisy
    off = segment(image, 3, method="deepsvg", seed=0, label_mrf="off", **FAST_DEEP)
    on = segment(image, 3, method="deepsvg", seed=0, **FAST_DEEP)
    assert not off.notes  # a genuine network fit, not its EM start
    assert np.allclose(on.means, off.means) and np.allclose(on.weights, off.weights)
    norm = (image - image.mean()) / image.std()
    a, b = options.label_prior_exponents(noise_level(norm[None], np.ones(image.shape, bool)))
    assert 0 < a < 1 and b < 1  # both parts of the prior count here
    network = np.log(np.maximum(off.probabilities.reshape(3, -1).T.astype(np.float64), 1e-30))
    unary = a * network + b * np.log(off.weights) + _log_gaussians(image, off.means, off.covariances)
    expected = potts_mean_field(torch.from_numpy(unary), torch.ones(image.shape, dtype=torch.bool),
                                options.LABEL_MRF, options.LABEL_MRF_ITER, (0, 1)).exp()
    assert np.abs(on.probabilities.reshape(3, -1).T - expected.numpy()).max() < 1e-3
    assert np.array_equal(on.probabilities.argmax(0) + 1, on.labels)
    assert (on.labels != off.labels).any()  # the relabelling does something here
    lines_off, lines_on = (((r.labels == 3) & (truth == 3)).sum() for r in (off, on))
    assert lines_on >= lines_off


def test_a_bad_label_mrf_is_a_clear_error():
    image, _ = thin_lines(noise=0.08)
    with pytest.raises(ValueError, match="label_mrf.*'off'"):
        segment(image, 3, method="deepsvg", label_mrf=-0.5, **FAST_DEEP)

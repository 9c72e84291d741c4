"""A crop too large for the network's budget is fitted on the network's grid and lifted to the voxels
(``loss_grid="network"``, core.deep._fit_on_network_grid; real torch, CPU)."""

import numpy as np
import pytest
import torch
from phantoms import blob_phantom, matched_dice

from DeepGMMSegmentLib import segment
from DeepGMMSegmentLib.core.deep import lift_probabilities, pool_in_mask
from DeepGMMSegmentLib.options import LOSS_GRID, resolve_loss_grid, resolve_options

FAST = dict(depth=2, base_width=4, precision="float32", max_iter=25, min_iter=25, warm_start_iter=3)


def _one_class_log_resp(values: torch.Tensor) -> torch.Tensor:
    """(V,) probabilities of class 0 -> (V, 2) log responsibilities."""
    return torch.stack([values, 1 - values], 1).log()


def test_lifting_reproduces_a_linear_ramp_with_the_blocks_centred_on_their_voxels():
    # 7 voxels pooled by 2 give 4 blocks (the last one partial); a ramp over the block centres must
    # come back as the same ramp over the voxels, also at the partial block's end: interpolating to
    # the crop's own size would stretch the grid there.
    mask = torch.ones(7, 9, dtype=torch.bool)
    _, pooled_mask = pool_in_mask(torch.zeros(1, 7, 9), mask, (2, 2))
    assert tuple(pooled_mask.shape) == (4, 5)
    centres = torch.arange(4, dtype=torch.float32)[:, None].expand(4, 5)  # block row index
    share = 0.2 + 0.1 * centres  # class 0's probability, linear in the block's centre
    lifted = lift_probabilities(_one_class_log_resp(share[pooled_mask]), pooled_mask, mask, (2, 2)).exp()
    rows = (torch.arange(7, dtype=torch.float32) + 0.5) / 2 - 0.5  # each voxel's position in block units
    expected = (0.2 + 0.1 * rows.clamp(0, 3))[:, None].expand(7, 9)  # constant beyond the outer centres
    assert torch.allclose(lifted[:, 0], expected[mask], atol=1e-5)
    assert torch.allclose(lifted.sum(1), torch.ones(63), atol=1e-5)


def test_lifting_ignores_blocks_outside_the_pooled_mask():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, :4] = True  # the left half: blocks of columns 0-1 inside, 2-3 outside the pooled mask
    _, pooled_mask = pool_in_mask(torch.zeros(1, 8, 8), mask, (2, 2))
    assert pooled_mask[:, :2].all() and not pooled_mask[:, 2:].any()
    lifted = lift_probabilities(_one_class_log_resp(torch.full((8,), 0.7)), pooled_mask, mask, (2, 2)).exp()
    # every voxel next to the mask's edge still sees only its own blocks' 0.7
    assert torch.allclose(lifted[:, 0], torch.full((32,), 0.7), atol=1e-5)


@pytest.mark.cuda
def test_a_crop_above_the_budget_is_fitted_on_the_pooled_grid_and_its_gaussians_follow_on_the_voxels(monkeypatch,
                                                                                                      compute_device):
    from DeepGMMSegmentLib.core.networks import UNet
    channels, truth, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=0.15, seed=4)
    grids = []
    forward = UNet.forward

    def spy(self, x):
        grids.append(tuple(x.shape[2:]))
        return forward(self, x)

    monkeypatch.setattr(UNet, "forward", spy)
    assert resolve_loss_grid("auto", "deepsvg") == LOSS_GRID["deepsvg"] == "network"
    result = segment(channels, 3, method="deepsvg", seed=0, max_network_voxels=2**15, label_mrf="off",
                     device=compute_device, **FAST)
    assert grids and truth.shape not in grids  # the network never ran on the voxels' own grid
    assert len(result.nll_history) == result.n_iter + 1  # one per step, then the lifted fit's over the voxels
    assert max(np.prod(g) for g in grids) <= 2**15
    assert result.labels.shape == truth.shape and matched_dice(result.labels, truth, 3) > 0.85
    # the Gaussians and weights are the closed form of the lifted probabilities over the voxels
    prob = result.probabilities.reshape(3, -1).astype(np.float64)
    x = np.asarray(channels[0], np.float64).reshape(-1)
    means = (prob @ x) / prob.sum(1)
    variances = (prob * (x[None] - means[:, None]) ** 2).sum(1) / prob.sum(1)
    assert np.allclose(result.means[:, 0], means, rtol=1e-3, atol=1e-3 * x.std())
    assert np.allclose(result.covariances[:, 0, 0], variances, rtol=2e-2)
    assert np.allclose(result.weights, prob.mean(1), atol=1e-4)
    grids.clear()
    voxels = segment(channels, 3, method="deepsvg", seed=0, max_network_voxels=2**15, label_mrf="off",
                     loss_grid="voxels", full_resolution_iter=2, **FAST)
    assert voxels.labels.shape == truth.shape and not np.allclose(voxels.probabilities, result.probabilities, atol=1e-3)


def test_seeded_voxels_keep_their_class_after_the_lift():
    channels, truth, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=0.15, seed=4)
    seeds = np.zeros(truth.shape, np.int32)
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        where = np.argwhere(truth == k)
        for z, y, x in where[rng.choice(len(where), 5, replace=False)]:
            seeds[z, y, x] = k
    # one seed against its own neighbourhood's class, where the lifted probabilities disagree
    z, y, x = np.argwhere(truth == 1)[0]
    seeds[z, y, x] = 2
    # label_mrf="off": the labels are the lifted probabilities themselves (the relabelling pins seeds too)
    result = segment(channels, seeds=seeds, method="deepsvg", seed=0, max_network_voxels=2**15, label_mrf="off",
                     **FAST)
    marked = seeds > 0
    assert np.array_equal(result.labels[marked], seeds[marked])


def test_loss_grid_is_validated():
    with pytest.raises(ValueError, match="loss_grid"):
        resolve_options("deepsvg", loss_grid="blocks")


def test_auto_fits_noisy_images_on_the_voxels_and_the_others_on_the_network_grid():
    from DeepGMMSegmentLib.options import LABEL_NOISE_FULL_NETWORK
    assert resolve_loss_grid("auto", "deepsvg", None) == "network"
    assert resolve_loss_grid("auto", "deepsvg", LABEL_NOISE_FULL_NETWORK - 0.01) == "network"
    assert resolve_loss_grid("auto", "deepsvg", LABEL_NOISE_FULL_NETWORK) == "voxels"
    assert resolve_loss_grid("auto", "deepg", 0.1) == "voxels"
    assert resolve_loss_grid("network", "deepsvg", 0.9) == "network"  # an explicit choice stays


@pytest.mark.parametrize("noise, expected", [(0.02, "network"), (0.6, "voxels")])
def test_the_engine_chooses_the_loss_grid_from_the_images_noise(monkeypatch, noise, expected):
    from DeepGMMSegmentLib import engine
    from DeepGMMSegmentLib.core.inputs import noise_level, normalize_channels

    channels, truth, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=noise, seed=4)
    level = noise_level(normalize_channels(np.stack(channels), np.ones(truth.shape, bool))[0], np.ones(truth.shape, bool))
    seen = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(args[4].loss_grid)  # the DeepSettings the engine built
        raise Stop

    monkeypatch.setattr(engine, "fit_deep", spy)
    with pytest.raises(Stop):
        segment(channels, 3, method="deepsvg", seed=0, **FAST)
    assert seen == [expected], (level, seen)

"""The edge-aware spatial prior (edge_contrast): pairs across an intensity edge pull less (real torch, CPU)."""

import numpy as np
import pytest
import torch

from DeepGMMSegmentLib import options, segment
from DeepGMMSegmentLib.core.deep import _NeighbourSquares, neighbour_pairs

# One Adam at 1e-2 throughout (warm_start_learning_rate=None): the test is about the prior, not the start.
FAST_DEEP = dict(max_iter=100, min_iter=40, depth=2, base_width=4, warm_start_iter=40, warm_start_learning_rate=None,
                 precision="float32", network="2d")


def _step_image():
    image = torch.zeros(1, 6, 8)
    image[..., 4:] = 3.0  # one vertical edge between columns 3 and 4
    return image


def test_without_contrast_the_pairs_stay_plain_masks():
    mask = torch.ones(1, 6, 8, dtype=torch.bool)
    plain, _ = neighbour_pairs(mask, None)
    for edge_contrast, image in ((0.0, _step_image()), (1.0, None)):
        pairs, _ = neighbour_pairs(mask, None, image, edge_contrast)
        assert all(p.dtype == torch.bool and torch.equal(p, q) for p, q in zip(pairs, plain))


def test_pairs_across_an_edge_weigh_less_and_the_weights_average_one():
    mask = torch.ones(1, 6, 8, dtype=torch.bool)
    mask[0, 0, 0] = False
    (rows, columns), _ = neighbour_pairs(mask, None, _step_image(), 1.0)
    assert columns.dtype == torch.float32 and columns.shape == (1, 1, 6, 7)
    inside = mask[:, :, 1:] & mask[:, :, :-1]
    assert columns[0, 0][inside[0]].mean().item() == pytest.approx(1.0, rel=1e-5)
    assert (columns[0, 0][~inside[0]] == 0).all()  # pairs leaving the mask still count nothing
    across, along = columns[0, 0, 2:, 3], columns[0, 0, 2:, 1]
    assert (across < 0.2 * along).all(), (across, along)
    assert torch.equal(rows[0, 0] > 0, (mask[:, 1:] & mask[:, :-1])[0])  # no edge along the rows: even weights
    assert rows[0, 0][rows[0, 0] > 0].std().item() < 1e-6


def test_the_weighted_penalty_has_the_right_gradient():
    torch.manual_seed(0)
    mask = torch.ones(1, 5, 6, dtype=torch.bool)
    mask[0, 0, 0] = False
    image = torch.randn(2, 5, 6, dtype=torch.float64)
    pairs, weights = neighbour_pairs(mask, (1.0, 1.5), image, 1.0)
    log_resp = torch.randn(1, 3, 5, 6, dtype=torch.float64).log_softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: _NeighbourSquares.apply(a, pairs, weights), (log_resp,))
    prob = log_resp.detach().exp()
    expected = sum(w * (p * (prob.narrow(2 + axis, 1, prob.shape[2 + axis] - 1)
                             - prob.narrow(2 + axis, 0, prob.shape[2 + axis] - 1)).square()).sum()
                   for axis, (p, w) in enumerate(zip(pairs, weights)))
    assert _NeighbourSquares.apply(log_resp, pairs, weights).item() == pytest.approx(expected.item(), rel=1e-9)


def thin_lines(seed=0):
    """Two flat halves crossed by one-voxel lines of a third, brighter tissue; noise 0.25."""
    rng = np.random.default_rng(seed)
    truth = np.ones((48, 48), np.uint8)
    truth[:, 24:] = 2
    truth[4::8, :] = 3  # thin structures: every 8th row, one voxel wide
    image = np.array([1.0, 1.0, 1.6, 2.4])[truth] + rng.normal(0, 0.25, truth.shape)
    return image.astype(np.float32), truth


def test_the_edge_aware_prior_keeps_one_voxel_lines_that_the_plain_prior_erodes():
    image, truth = thin_lines()
    kept = {}
    for edge_contrast in (0.0, options.DeepSettings().edge_contrast):
        result = segment(image, 3, method="deepsvg", smoothness=1.0, edge_contrast=edge_contrast, seed=0,
                         **FAST_DEEP)
        lines = result.labels == 3  # the brightest class
        kept[edge_contrast] = 2 * (lines & (truth == 3)).sum() / (lines.sum() + (truth == 3).sum())
    assert kept[options.DeepSettings().edge_contrast] > 0.8, kept
    assert kept[options.DeepSettings().edge_contrast] > kept[0.0] + 0.2, kept


def test_a_negative_edge_contrast_is_a_clear_error():
    image, _ = thin_lines()
    with pytest.raises(ValueError, match=r"edge_contrast must be a number >= 0 \(0: every neighbour pair.*got -1"):
        segment(image, 3, method="deepsvg", edge_contrast=-1)
    with pytest.raises(ValueError, match="edge_contrast"):
        segment(image, 3, method="em-gmm", edge_contrast=1.0)  # an option of the deep methods only

"""The explicit spatial prior (smoothness) and the network's compute precision (real torch, CPU)."""

import numpy as np
import pytest
import torch
from phantoms import blob_phantom

from DeepGMMSegmentLib import options, segment
from DeepGMMSegmentLib.core.deep import smoothness_penalty
from DeepGMMSegmentLib.core.networks import UNet, resolve_precision


def _log(prob):
    return torch.log(prob.clamp_min(1e-12))


def test_penalty_is_zero_for_constant_labels_and_counts_each_boundary_pair():
    labels = torch.zeros(1, 6, 8, dtype=torch.long)
    labels[..., 4:] = 1  # one vertical boundary: 6 neighbour pairs across it, out of 6 * 7 along x
    one_hot = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    mask = torch.ones(1, 6, 8, dtype=torch.bool)
    assert smoothness_penalty(_log(torch.ones_like(one_hot) / 2), mask).item() == pytest.approx(0.0)
    # a pair across the boundary differs by 1 in both classes: squared difference 2
    assert smoothness_penalty(_log(one_hot), mask).item() == pytest.approx(2 * 6 / (6 * 7), rel=1e-5)


def test_penalty_ignores_pairs_leaving_the_mask_and_weights_thick_axes_less():
    labels = torch.zeros(1, 6, 8, dtype=torch.long)
    labels[..., 4:] = 1
    one_hot = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    left = torch.zeros(1, 6, 8, dtype=torch.bool)
    left[..., :4] = True  # the boundary pairs have one voxel outside the mask
    assert smoothness_penalty(_log(one_hot), left).item() == pytest.approx(0.0)
    rows = torch.zeros(1, 6, 8, dtype=torch.long)
    rows[:, 3:] = 1  # a horizontal boundary: pairs along the first axis
    one_hot_rows = torch.nn.functional.one_hot(rows, 2).permute(0, 3, 1, 2).float()
    full = torch.ones(1, 6, 8, dtype=torch.bool)
    fine = smoothness_penalty(_log(one_hot_rows), full, spacing=(1.0, 1.0)).item()
    thick = smoothness_penalty(_log(one_hot_rows), full, spacing=(3.0, 1.0)).item()
    assert thick == pytest.approx(fine / 9, rel=1e-5)  # (1 mm / 3 mm)^2


def _penalty_by_autograd(log_resp, mask, spacing):
    """The same prior written with plain tensor operations (autograd differentiates it)."""
    prob = log_resp.exp()
    finest = min(spacing)
    total = prob.new_zeros(())
    for axis, step in enumerate(spacing):
        size = prob.shape[2 + axis]
        diff = (prob.narrow(2 + axis, 1, size - 1) - prob.narrow(2 + axis, 0, size - 1)).pow(2).sum(1)
        both = mask.narrow(1 + axis, 1, size - 1) & mask.narrow(1 + axis, 0, size - 1)
        if both.any():
            total = total + (finest / step) ** 2 * diff[both].sum() / both.sum()
    return total


@pytest.mark.parametrize("shape, spacing", [((2, 3, 5, 6, 7), (3.0, 1.0, 1.5)), ((1, 4, 9, 8), (1.0, 1.0)),
                                            ((1, 2, 1, 6, 5), (1.0, 1.0, 1.0))])
def test_penalty_value_and_hand_written_gradient_match_autograd(shape, spacing):
    generator = torch.Generator().manual_seed(3)
    log_resp = torch.randn(shape, dtype=torch.float64, generator=generator).log_softmax(1).requires_grad_()
    mask = torch.rand((shape[0],) + shape[2:], generator=generator) > 0.3
    ours = smoothness_penalty(log_resp, mask, spacing)
    (grad_ours,) = torch.autograd.grad(ours, log_resp)
    reference = _penalty_by_autograd(log_resp, mask, spacing)
    (grad_reference,) = torch.autograd.grad(reference, log_resp)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    assert torch.allclose(grad_ours, grad_reference, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: smoothness_penalty(t, mask, spacing), (log_resp.detach().requires_grad_(),))


@pytest.mark.cuda
def test_smoothness_removes_speckle_under_heavy_noise(compute_device):
    channels, truth, _ = blob_phantom((48, 48), n_classes=3, n_channels=1, noise=0.45, seed=5)
    common = dict(method="deepsvg", seed=0, max_iter=60, depth=2, warm_start_iter=20, precision="float32",
                  device=compute_device)
    plain = segment(channels, 3, smoothness=0.0, **common)
    smooth = segment(channels, 3, smoothness=0.3, **common)
    accuracy = [(r.labels == truth).mean() for r in (plain, smooth)]
    # label changes between 4-neighbours: speckle makes many, the true map has two wavy boundaries
    changes = [(np.diff(r.labels, axis=0) != 0).sum() + (np.diff(r.labels, axis=1) != 0).sum()
               for r in (plain, smooth)]
    assert accuracy[1] > accuracy[0] + 0.02, accuracy
    assert changes[1] < 0.8 * changes[0], changes
    assert smooth.options["smoothness"] == 0.3


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) is None
    assert resolve_precision("bfloat16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="Unknown precision 'half'"):
        resolve_precision("half", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        segment(np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32), 2, method="deepg",
                precision="half", max_iter=2)


@pytest.mark.cuda
def test_bfloat16_network_gives_float32_logits_close_to_float32(compute_device):
    torch.manual_seed(0)
    net = UNet(3, 1, 3, base_width=4, depth=2).to(compute_device)
    x = torch.randn(1, 1, 8, 20, 20).to(compute_device)
    reference = net(x)
    net.autocast_dtype = torch.bfloat16
    fast = net(x)
    assert reference.dtype == fast.dtype == torch.float32
    assert torch.allclose(torch.softmax(fast, 1), torch.softmax(reference, 1), atol=0.05)
    assert not torch.equal(fast, reference)  # the convolutions really ran in bfloat16


def test_default_smoothness_is_per_method():
    image = np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32)
    fast = dict(max_iter=2, min_iter=1, warm_start_iter=1, depth=1)
    # deepsvg: from the noise; pure noise (noise level about 1) gets the largest weight
    assert segment(image, 2, method="deepsvg", **fast).options["smoothness"] == options.MAX_ADAPTIVE_SMOOTHNESS
    # deepg's probabilities reach the likelihood only through the M-step: no prior by default
    assert segment(image, 2, method="deepg", **fast).options["smoothness"] == 0.0
    assert segment(image, 2, method="deepg", smoothness=0.2, **fast).options["smoothness"] == 0.2
    with pytest.raises(ValueError, match="smoothness must be a number >= 0"):
        segment(image, 2, method="deepsvg", smoothness=-1, **fast)
    for bad in (None, 0, -1e-3, "fast"):
        with pytest.raises(ValueError, match="learning_rate must be a number > 0"):
            segment(image, 2, method="deepsvg", learning_rate=bad, **fast)

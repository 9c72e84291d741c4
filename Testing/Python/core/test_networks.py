"""U-Net shapes and the choice of network."""

import pytest
import torch

from DeepGMMSegmentLib.core.deep import choose_network, deep_gmm_loss
from DeepGMMSegmentLib.core.networks import UNet


@pytest.mark.parametrize("dims, shape, in_plane", [(2, (3, 2, 37, 29), False), (3, (1, 2, 5, 19, 22), True),
                                                   (3, (1, 2, 9, 17, 16), False)])
def test_unet_keeps_any_spatial_size(dims, shape, in_plane):
    net = UNet(dims, 2, 4, base_width=4, depth=3, pool_in_plane_only=in_plane)
    out = net(torch.randn(shape))
    assert out.shape == (shape[0], 4) + shape[2:]


@pytest.mark.parametrize("dims, shape, depth", [(2, (3, 2, 37, 29), 3), (3, (1, 2, 9, 17, 16), 2),
                                                (3, (1, 2, 5, 19, 22), 0)])
def test_the_last_level_on_cached_features_is_the_whole_network(dims, shape, depth):
    """core.deep.LastLevel trains the last block and head on to_last_level's output: together they are forward."""
    from DeepGMMSegmentLib.core.deep import LastLevel
    torch.manual_seed(0)
    net = UNet(dims, 2, 4, base_width=4, depth=depth)
    x = torch.randn(shape)
    with torch.no_grad():
        features = net.to_last_level(x)
        assert features.shape[1] == (8 if depth else 4)  # the last block's input: skip + reduced, or the first block
        assert torch.equal(LastLevel(net, tuple(shape[2:]))(features), net(x))
    assert (net.last_block is None) == (depth == 0)
    assert {id(p) for p in LastLevel(net, tuple(shape[2:])).parameters()} == \
        {id(p) for p in list(net.head.parameters()) + ([] if depth == 0 else list(net.up[-1].parameters()))}


def test_in_plane_only_never_pools_z():
    net = UNet(3, 1, 2, base_width=4, depth=2, pool_in_plane_only=True)
    assert net.pool_factor == (1, 2, 2)


def test_choose_network():
    assert choose_network((40, 40), None, "auto") == (2, False)
    assert choose_network((30, 64, 64), (1, 1, 1), "auto") == (3, False)
    assert choose_network((30, 64, 64), (1, 1, 1), "2d") == (2, False)
    assert choose_network((30, 64, 64), (1, 1, 1), "3d") == (3, False)
    assert choose_network((30, 64, 64), (5, 1, 1), "3d") == (3, True)  # thick slices
    assert choose_network((8, 64, 64), None, "3d") == (3, True)  # few slices
    assert choose_network((30, 64, 64), (1, 1, 1), "auto", "deepg") == (2, False)  # deepg: per slice
    assert choose_network((30, 64, 64), (1, 1, 1), "3d", "deepg") == (3, False)  # unless asked
    with pytest.raises(ValueError, match="Unknown network"):
        choose_network((8, 64, 64), None, "4d")


def test_deep_loss_gradients_reach_the_responsibilities_and_prior_adds_penalty():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    for method in ("deepg", "deepsvg"):
        loss, nll, fitted = deep_gmm_loss(x, logits.log_softmax(1), mask, method)
        assert torch.isfinite(loss) and loss == nll and len(fitted) == 2
        loss.backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        logits.grad = None
    prior = torch.tensor([[-1.0], [0.0], [1.0]])
    loss, nll, _ = deep_gmm_loss(x, logits.log_softmax(1), mask, "deepsvg", prior_means=prior, prior_weight=2.0)
    assert loss > nll


@pytest.mark.parametrize("dims, shape", [(2, (1, 4, 23, 19)), (3, (1, 4, 7, 13, 11)), (3, (2, 4, 7, 13, 11))])
def test_instance_norm_of_one_image_in_inference_mode_is_instance_norm(dims, shape):
    """The batch-norm shortcut (inference; float32 training of one image) is instance norm, values and gradients."""
    from DeepGMMSegmentLib.core.networks import InstanceNorm2d, InstanceNorm3d

    torch.manual_seed(0)
    ours = (InstanceNorm2d if dims == 2 else InstanceNorm3d)(shape[1], affine=True)
    reference = (torch.nn.InstanceNorm2d if dims == 2 else torch.nn.InstanceNorm3d)(shape[1], affine=True)
    with torch.no_grad():
        for module in (ours, reference):
            module.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
            module.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    x = (torch.randn(shape) * torch.arange(1, shape[0] + 1).view(-1, *[1] * (len(shape) - 1)) + 3.0)
    x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    x64 = x.double().requires_grad_()
    expected = reference.double()(x64)
    upstream = torch.randn(shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, [x64, reference.weight, reference.bias], upstream)
    # float32 training of one image takes the same batch-norm path; more images, or bfloat16, instance_norm
    x32 = x.clone().requires_grad_()
    got = ours(x32)
    got_grads = torch.autograd.grad(got, [x32, ours.weight, ours.bias], upstream.float())
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)
    assert ("NativeBatchNorm" in type(got.grad_fn).__name__) == (shape[0] == 1)
    if shape[0] == 1:  # the point of the shortcut: the channels-last layout is kept
        assert got.is_contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)


def test_unet_forward_in_inference_mode_matches_the_training_path():
    net = UNet(3, 2, 3, base_width=4, depth=2)
    x = torch.randn(1, 2, 9, 17, 16)
    with torch.no_grad():
        expected = net(x)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4)

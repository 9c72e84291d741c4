"""core.cpu_conv: one float32 image on the CPU stays on oneDNN, with PyTorch's values and gradients."""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from DeepGMMSegmentLib.core import cpu_conv
from DeepGMMSegmentLib.core.cpu_conv import Conv2d, Conv3d
from DeepGMMSegmentLib.core.networks import UNet

needs_measured_cpu = pytest.mark.skipif(not cpu_conv.MEASURED_CPU, reason="the oneDNN path is for x86-64 CPUs")


def _pair(dims: int, cin: int, cout: int, kernel: int, bias: bool, channels_last: bool, **conv_options):
    """Our convolution and a float64 nn.Conv with the same weights."""
    reference = (nn.Conv2d if dims == 2 else nn.Conv3d)(cin, cout, kernel, padding=kernel // 2, bias=bias,
                                                         **conv_options).double()
    ours = (Conv2d if dims == 2 else Conv3d)(cin, cout, kernel, padding=kernel // 2, bias=bias, **conv_options)
    ours.load_state_dict({name: value.float() for name, value in reference.state_dict().items()})
    layout = (torch.channels_last if dims == 2 else torch.channels_last_3d) if channels_last else torch.contiguous_format
    return ours.to(memory_format=layout), reference, layout


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference).abs().max() / reference.abs().max())


# (81, 80, 6) and (80, 90): N * C * D * H above IM2COL_LIMIT, where forward and input gradient are PyTorch's
@pytest.mark.parametrize("dims,shape", [(3, (8, 12, 12)), (3, (7, 9, 11)), (3, (2, 5, 6)), (3, (1, 5, 6)),
                                        (3, (81, 80, 6)), (2, (9, 11)), (2, (2, 7)), (2, (80, 90))])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@needs_measured_cpu
def test_values_and_gradients_match_pytorch(dims, shape, kernel, bias, channels_last):
    torch.manual_seed(0)
    ours, reference, layout = _pair(dims, 4, 6, kernel, bias, channels_last)
    x = torch.randn(1, 4, *shape, dtype=torch.float64)
    upstream = torch.randn(1, 6, *shape, dtype=torch.float64)
    x_ours = x.float().contiguous(memory_format=layout).requires_grad_()
    x_reference = x.clone().requires_grad_()
    y_ours, y_reference = ours(x_ours), reference(x_reference)
    assert type(y_ours.grad_fn).__name__ == "_OneDnnConvolutionBackward"  # the path under test was taken
    grads_ours = torch.autograd.grad(y_ours, [x_ours, *ours.parameters()], upstream.float())
    grads_reference = torch.autograd.grad(y_reference, [x_reference, *reference.parameters()], upstream)
    assert _relative_error(y_ours, y_reference) < 1e-5
    for got, expected in zip(grads_ours, grads_reference, strict=True):
        assert got.shape == expected.shape
        assert _relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("case", ["autocast", "batch", "strided", "float64"])
def test_other_convolutions_are_left_to_pytorch(case):
    options = {"stride": 2} if case == "strided" else {}
    ours, reference, layout = _pair(3, 4, 6, 3, True, True, **options)
    x = torch.randn(2 if case == "batch" else 1, 4, 6, 8, 8).contiguous(memory_format=layout)
    if case == "float64":
        ours, x = ours.double(), x.double()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        y = ours(x.requires_grad_())
    assert type(y.grad_fn).__name__ != "_OneDnnConvolutionBackward"
    if case == "autocast":
        assert y.dtype == torch.bfloat16
    else:
        expected = reference(x.detach().double())
        assert _relative_error(y, expected) < 1e-5


@needs_measured_cpu
def test_a_unet_step_on_a_small_crop_never_takes_im2col():
    """The reason for the module: PyTorch's rule would send these levels to slow_conv3d."""
    torch.manual_seed(0)
    network = UNet(3, 3, 4, base_width=8, depth=3)
    x = torch.randn(1, 3, 8, 48, 48)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        network(x).square().mean().backward()
    names = {event.key for event in prof.key_averages()}
    assert not any("slow_conv" in name or "im2col" in name for name in names), sorted(names)
    assert "_OneDnnConvolutionBackward" in names


def test_unet_gradients_match_pytorch_path(monkeypatch):
    torch.manual_seed(1)
    network = UNet(3, 2, 3, base_width=4, depth=2)
    x = torch.randn(1, 2, 7, 20, 18)

    def gradients():
        network.zero_grad(set_to_none=True)
        network(x).square().mean().backward()
        return [p.grad.clone() for p in network.parameters()]

    ours = gradients()
    monkeypatch.setattr(cpu_conv, "_takes_onednn_path", lambda conv, tensor: False)
    pytorch = gradients()
    # one scale for all: the biases before instance norm have gradients of rounding size only
    flat_ours = torch.cat([g.flatten() for g in ours])
    flat_pytorch = torch.cat([g.flatten() for g in pytorch]).double()
    assert _relative_error(flat_ours, flat_pytorch) < 1e-4


@needs_measured_cpu
@pytest.mark.parametrize("rows", [6, 7])
def test_gradients_of_a_plain_sum(rows):
    """``loss = y.sum()`` hands back an expanded gradient (all strides 0); the halves and oneDNN take it."""
    torch.manual_seed(2)
    ours, reference, layout = _pair(3, 3, 5, 3, True, True)
    x = torch.randn(1, 3, rows, 7, 8, dtype=torch.float64)
    x_ours = x.float().contiguous(memory_format=layout).requires_grad_()
    x_reference = x.clone().requires_grad_()
    ours(x_ours).sum().backward()
    reference(x_reference).sum().backward()
    assert _relative_error(x_ours.grad, x_reference.grad) < 1e-5
    for got, expected in zip(ours.parameters(), reference.parameters(), strict=True):
        assert _relative_error(got.grad, expected.grad) < 1e-5

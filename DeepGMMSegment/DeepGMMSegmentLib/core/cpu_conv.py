"""Convolutions of one image on the CPU in float32 that always take oneDNN's kernels.

PyTorch picks a convolution's CPU kernel by a size rule made for 2D images: a float32 input of
batch 1 whose ``N * C * D * H`` is at most 20480 goes to the im2col ("slow_conv") path. The rule is
applied again, on its own, in the backward pass. The per-image fits run batch 1, so most of the U-Net's
3D levels (a cardiac ROI: all of them) took that path. Measured on a 2-core AVX2 CPU (no native
bfloat16, so the network runs float32), a 3x3x3 convolution 8 -> 8 on 8 x 48 x 48: forward 0.9 ms with
oneDNN; the input gradient 14.5 ms and the weight gradient 9.6 ms through ``convolution_backward``,
against 0.8 ms and 4.2 ms as below (docs/speed.md has the whole fits).

:class:`Conv3d` and :class:`Conv2d` run as ``nn.Conv3d`` / ``nn.Conv2d`` except for a float32 batch of one
on the CPU outside autocast, with stride 1, no dilation, one group and "same" zero padding, where
:class:`_OneDnnConvolution` computes

* the output with ``mkldnn_convolution``;
* the input gradient as the forward convolution of the output gradient with the flipped, transposed
  kernel (exact for stride 1 and "same" padding);
* the weight and bias gradients with ``convolution_backward`` on a batch of two: the image's two
  halves along its first spatial axis, each with the rows of its neighbour that the kernel reaches. A
  batch above one takes oneDNN, the sum over the batch is the gradient of the whole image, and the
  work stays that of one image. oneDNN's weight gradient of a batch of two is also about twice as fast
  as of one image, so this part is used at every size (a 3x3x3 convolution 16 -> 8 on 96 x 116 x 96:
  307 ms against 144 ms).

Above PyTorch's size limit (``IM2COL_LIMIT``) the output and the input gradient are PyTorch's own,
which are oneDNN's there.

Everything else (bfloat16 under autocast, CUDA, batches, other convolutions, CPUs other than x86-64) is
left to PyTorch.
"""

from __future__ import annotations

import math
import platform

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


# PyTorch's rule sends a float32 batch of one to im2col while N * C * D * H (N * C * H * W in 2D) is at
# most this. Above it, its forward pass and input gradient are oneDNN's already and stay PyTorch's;
# only the weight gradient still gains from the batch of two (oneDNN's batch-1 kernel is about 2x slower).
IM2COL_LIMIT = 20480
# Measured on x86-64 only. Elsewhere (Apple silicon, ARM servers) oneDNN may lack fast float32 kernels
# and PyTorch's rule may be the better one, so the convolutions stay PyTorch's there.
MEASURED_CPU = platform.machine().lower() in ("x86_64", "amd64")


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _takes_onednn_path(conv: nn.Module, x: torch.Tensor) -> bool:
    return (
        MEASURED_CPU
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[0] == 1
        and not _cpu_autocast_enabled()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and conv.padding_mode == "zeros"
        and conv.groups == 1
        and all(s == 1 for s in conv.stride)
        and all(d == 1 for d in conv.dilation)
        and isinstance(conv.padding, tuple)
        and all(k % 2 == 1 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding))
    )


def _first_axis_halves(tensor: torch.Tensor, reach: int) -> torch.Tensor:
    """The two halves of one image along axis 2 as a batch of two, each with ``reach`` rows of halo.

    The halo rows are the neighbouring half's (zeros beyond the image), as a "same" convolution of the
    whole image sees them; an odd axis gets one zero row at its end, so the halves are equal.
    """
    rows = tensor.shape[2]
    half = (rows + 1) // 2
    layout = _layout_of(tensor)
    if reach == 0 and rows % 2 == 0 and layout is not torch.contiguous_format:
        # channels-last: the first spatial axis is outermost after the batch, so this is a view
        return tensor.unflatten(2, (2, half)).transpose(0, 2).squeeze(2)
    window = half + 2 * reach
    halves = torch.empty((2, tensor.shape[1], window) + tuple(tensor.shape[3:]), dtype=tensor.dtype,
                         device=tensor.device, memory_format=layout)
    for i in (0, 1):
        first = i * half - reach  # the window's first row in the image's coordinates
        start, stop = max(first, 0), min(first + window, rows)
        halves[i, :, :start - first].zero_()
        halves[i, :, start - first:stop - first].copy_(tensor[0, :, start:stop])
        halves[i, :, stop - first:].zero_()
    return halves


class _OneDnnConvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = list(padding)
        ctx.has_bias = bias is not None
        ctx.im2col_size = math.prod(x.shape[:4]) <= IM2COL_LIMIT
        ones = [1] * len(padding)
        if not ctx.im2col_size:
            return torch.ops.aten.convolution(x, weight, bias, ones, list(padding), ones, False, [0] * len(padding), 1)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), ones, ones, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        padding = ctx.padding
        ones = [1] * len(padding)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0] and not ctx.im2col_size:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, ones, padding, ones, False, [0] * len(padding), 1, [True, False, False])[0]
        elif ctx.needs_input_grad[0]:
            spatial = tuple(range(2, weight.dim()))
            flipped = weight.flip(spatial).transpose(0, 1).contiguous(memory_format=_layout_of(weight))
            grad_x = torch.ops.aten.mkldnn_convolution(grad, flipped, None, padding, ones, ones, 1)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = _weight_gradient(grad, x, weight, padding, ctx.has_bias)
        return grad_x, grad_weight, grad_bias, None


def _layout_of(tensor: torch.Tensor) -> torch.memory_format:
    layout = torch.channels_last_3d if tensor.dim() == 5 else torch.channels_last
    return layout if tensor.is_contiguous(memory_format=layout) else torch.contiguous_format


def _weight_gradient(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: list[int],
                     has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) gradient of a stride-1 "same" convolution of one image, on oneDNN."""
    mask = [False, True, has_bias]
    bias_sizes = [weight.shape[0]] if has_bias else None
    zeros, ones = [0] * len(padding), [1] * len(padding)
    rows = x.shape[2]
    if rows < 2:  # nothing to split: PyTorch's own path
        _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, ones, padding, ones, False, zeros, 1, mask)
        return grad_weight, grad_bias
    x_halves = _first_axis_halves(x, padding[0])
    grad_halves = _first_axis_halves(grad, 0)
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_halves, x_halves, weight, bias_sizes, ones, [0] + padding[1:], ones, False, zeros, 1, mask)
    return grad_weight, grad_bias


class _SingleImageOneDnn:
    """The forward pass of :class:`Conv3d` and :class:`Conv2d` (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _takes_onednn_path(self, x):
            return _OneDnnConvolution.apply(x, self.weight, self.bias, tuple(self.padding))
        return super().forward(x)


class Conv3d(_SingleImageOneDnn, nn.Conv3d):
    """``nn.Conv3d`` that keeps a single float32 image on oneDNN on the CPU (module docstring)."""


class Conv2d(_SingleImageOneDnn, nn.Conv2d):
    """``nn.Conv2d`` that keeps a single float32 image on oneDNN on the CPU (module docstring)."""

"""U-Nets that turn a multi-channel image into per-voxel class logits.

``UNet(2, ...)`` is the paper's per-slice network (slices go through it as a batch);
``UNet(3, ...)`` works on whole volumes. With ``pool_in_plane_only=True`` the 3D network never
pools or upsamples along z, which suits thick-slice acquisitions (few slices, coarse z spacing).
Inputs of any size are padded internally to a multiple of the total pooling factor.

The 3D network never has a level that is 2 voxels thick along any axis: oneDNN's bfloat16
backward pass of ``Conv3d`` (torch 2.13, AVX-512 BF16 CPU) returned NaN or 1e20..1e33 in a random
fraction of calls on such levels (a 16-slice box: levels 16/8/4/2; 2-slice volumes). So an axis is
pooled only while the next level keeps at least 3 voxels, and an axis of 2 is padded to 3.
:func:`guarded_step` is the second line of defence for any optimiser step.

Speed: the network keeps its weights and activations channels-last (oneDNN's fast layout on the
CPU) and can run its convolutions in bfloat16 (``precision``); the logits are always float32,
so the mixture maths downstream keeps full precision.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .cpu_conv import Conv2d, Conv3d
from .optim import Adam

PRECISIONS = ("auto", "float32", "bfloat16")
# Smallest extent of a 3D level along any axis (see the module docstring).
MIN_LEVEL_EXTENT = 3
# A gradient norm above this is garbage, not a steep loss. A chosen bound, not a measured one:
# it sits many orders of magnitude above the clip norm of the fits (12) and far below the 1e20 and
# more that the broken bfloat16 kernel returned (healthy steps of a U-Net on 16x64x64 noise had
# norms of about 1).
MAX_GRADIENT_NORM = 1e6


def check_precision(precision: str) -> None:
    """Refuse an unknown ``precision`` with the valid choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the network's convolutions, or None for plain float32.

    "auto" picks bfloat16 where the hardware computes it natively (CPUs with AVX-512 BF16 or AMX
    through oneDNN, CUDA GPUs that support it) and float32 elsewhere; measured on a 2-core
    AVX-512 BF16 CPU, a training step of the 3D U-Net on the 2 mm MNI volume took 0.57 s in
    bfloat16 against 1.1 s in float32 (both channels-last).
    """
    check_precision(precision)
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return torch.bfloat16 if supported is not None and supported() else None
        except RuntimeError:  # a build without oneDNN
            return None
    return None


def _conv(dims: int, cin: int, cout: int, kernel: int = 3) -> nn.Module:
    cls = Conv2d if dims == 2 else Conv3d
    return cls(cin, cout, kernel, padding=kernel // 2)


class _OneImageInstanceNorm:
    """Instance norm that, for one image in float32 on the CPU or under ``torch.inference_mode``, runs as batch norm.

    With one image the instance statistics are the batch statistics, and ``batch_norm`` works on the
    channels-last layout in place, where ``instance_norm`` copies to channels-first and back; its
    channels-first output then makes the next convolution (and its backward pass) copy again.

    * Inference, measured on the 1 mm MNI crop (trained model, bfloat16, 2 threads): forward pass
      1.75 s -> 1.29 s, labels 99.9 % the same (bfloat16 rounding).
    * Float32 training (CPUs without native bfloat16), forward + backward of the default 3D U-Net on a
      2-core AVX2 CPU: 86 -> 66 ms on 8 x 48 x 48, 342 -> 223 ms on 48 x 58 x 48, 3.55 -> 2.23 s on
      96 x 116 x 96 (docs/speed.md).
    * bfloat16 training keeps ``instance_norm``: there ``batch_norm`` on channels-last bfloat16 was about
      5x slower (docs/speed.md, "What was measured and not adopted").
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        float32_on_cpu = x.dtype == torch.float32 and x.device.type == "cpu"  # CUDA training: unmeasured, kept
        if x.shape[0] == 1 and (float32_on_cpu or torch.is_inference_mode_enabled()):
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)


class InstanceNorm2d(_OneImageInstanceNorm, nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_OneImageInstanceNorm, nn.InstanceNorm3d):
    pass


def _norm(dims: int, channels: int) -> nn.Module:
    cls = InstanceNorm2d if dims == 2 else InstanceNorm3d
    return cls(channels, affine=True)


class ConvBlock(nn.Sequential):
    """Two (conv → instance norm → LeakyReLU) layers."""

    def __init__(self, dims: int, cin: int, cout: int):
        super().__init__(
            _conv(dims, cin, cout), _norm(dims, cout), nn.LeakyReLU(0.01, inplace=True),
            _conv(dims, cout, cout), _norm(dims, cout), nn.LeakyReLU(0.01, inplace=True),
        )


class UNet(nn.Module):
    """A small U-Net: ``depth`` poolings, ``base_width`` filters at full resolution, doubling per level."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        base_width: int = 16,
        depth: int = 3,
        pool_in_plane_only: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.config = dict(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            base_width=base_width, depth=depth, pool_in_plane_only=pool_in_plane_only,
        )
        # In-plane-only pooling keeps every slice; 3x3x3 kernels still give z context.
        if spatial_dims == 3 and pool_in_plane_only:
            self.pool_factor: tuple[int, ...] = (1, 2, 2)
        else:
            self.pool_factor = (2,) * spatial_dims
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(ConvBlock(spatial_dims, cin, w))
            cin = w
        self.up_reduce = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up_reduce.append(_conv(spatial_dims, w * 2, w, 1))
            self.up.append(ConvBlock(spatial_dims, w * 2, w))
        self.head = _conv(spatial_dims, base_width, out_channels, 1)
        self.autocast_dtype: torch.dtype | None = None  # set by the caller (resolve_precision)
        self._memory_format = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
        self.to(memory_format=self._memory_format)

    def pooling_plan(self, spatial: tuple[int, ...]) -> tuple[list[int], list[tuple[int, ...]]]:
        """(padded size per axis, pooling kernel per level) for an input of ``spatial`` size.

        2D: every axis is pooled ``depth`` times. 3D: an axis is pooled only while the next level
        keeps at least MIN_LEVEL_EXTENT voxels, and an axis of 2 is padded to 3 (an axis of 1 stays 1).
        """
        if self.spatial_dims == 2:
            return [math.ceil(s / 2**self.depth) * 2**self.depth for s in spatial], [self.pool_factor] * self.depth
        padded, pools = [], []
        for size, factor in zip(spatial, self.pool_factor):
            size = MIN_LEVEL_EXTENT if size == 2 else size
            n_pool = 0
            while factor == 2 and n_pool < self.depth and math.ceil(size / 2 ** (n_pool + 1)) >= MIN_LEVEL_EXTENT:
                n_pool += 1
            padded.append(math.ceil(size / 2**n_pool) * 2**n_pool)
            pools.append(n_pool)
        return padded, [tuple(2 if level < p else 1 for p in pools) for level in range(self.depth)]

    def _pool(self, x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
        if all(k == 1 for k in kernel):
            return x
        if self.spatial_dims == 2:
            return F.max_pool2d(x, kernel)
        return F.max_pool3d(x, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) → float32 logits (N, K, *spatial)."""
        return last_level_logits(self.last_block, self.head, self.to_last_level(x), tuple(x.shape[2:]),
                                 self.autocast_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of the network's weights and activations (channels-last, oneDNN's fast one)."""
        return self._memory_format

    @property
    def last_block(self) -> nn.Module | None:
        """The decoder block at full resolution (None for depth 0, where the head follows the first block)."""
        return self.up[-1] if len(self.up) else None

    def to_last_level(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before :attr:`last_block`: its input on the padded grid, in the autocast dtype.

        A coarse-to-fine fit computes it once and trains only the last block and the head on it
        (core.deep.LastLevel).
        """
        x = x.contiguous(memory_format=self._memory_format)
        dtype = self.autocast_dtype
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self._to_last_level(x)

    def _to_last_level(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        padded, kernels = self.pooling_plan(tuple(spatial))
        pads = [p - s for s, p in zip(spatial, padded)]
        if any(pads):
            # F.pad takes the last dimension first.
            pad_arg: list[int] = []
            for p in reversed(pads):
                pad_arg += [0, p]
            x = F.pad(x, pad_arg, mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self._pool(x, kernels[i])
        levels = list(zip(self.up_reduce, self.up, reversed(skips)))
        for level, (reduce, block, skip) in enumerate(levels):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = torch.cat([skip, reduce(x)], dim=1)
            if level < len(levels) - 1:
                x = block(x)
        return x


def last_level_logits(block: nn.Module | None, head: nn.Module, features: torch.Tensor, spatial: tuple[int, ...],
                      dtype: torch.dtype | None) -> torch.Tensor:
    """A U-Net's last decoder block and head on :meth:`UNet.to_last_level` features.

    Returns float32 logits cropped to ``spatial`` (the padding of :meth:`UNet.pooling_plan` removed).
    """
    with torch.autocast(device_type=features.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        x = head(features if block is None else block(features))
    if tuple(x.shape[2:]) != tuple(spatial):
        x = x[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
    return x.float()


def gradient_norm(parameters) -> torch.Tensor:
    """The global 2-norm of the parameters' gradients (float32; NaN or inf if any gradient is)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0).float()


def guarded_step(network: nn.Module, optimiser: torch.optim.Optimizer | Adam, max_norm: float) -> bool:
    """Clip the gradients to ``max_norm`` and step, unless their norm is non-finite or absurd.

    Returns False (step skipped, gradients cleared, optimiser state untouched) when the global
    gradient norm is NaN, infinite or above MAX_GRADIENT_NORM; ``clip_grad_norm_`` would otherwise
    spread a NaN norm to every gradient and Adam would write it into every weight. The caller
    decides what to do next (e.g. :func:`fall_back_to_float32`).
    """
    params = [p for p in network.parameters() if p.grad is not None]
    norm = gradient_norm(params)
    if not bool(torch.isfinite(norm)) or float(norm) > MAX_GRADIENT_NORM:
        optimiser.zero_grad(set_to_none=True)
        return False
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimiser.step()
    return True


def fall_back_to_float32(network: nn.Module) -> str | None:
    """Run ``network`` in float32 from now on; returns a note when it was using a lower precision."""
    if network.autocast_dtype is None:
        return None
    old = str(network.autocast_dtype).replace("torch.", "")
    network.autocast_dtype = None
    return (f"A training step gave a non-finite or absurd gradient norm in {old}; the step was skipped "
            "and the network continues in float32.")

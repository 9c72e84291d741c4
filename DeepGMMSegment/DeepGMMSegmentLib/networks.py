"""U-Nets that turn a multi-channel image into per-voxel class logits.

``UNet(2, ...)`` is the paper's per-slice network (slices go through it as a batch);
``UNet(3, ...)`` works on whole volumes. With ``pool_in_plane_only=True`` the 3D network never
pools or upsamples along z, which suits thick-slice acquisitions (few slices, coarse z spacing).
Inputs of any size are padded internally to a multiple of the total pooling factor.

Speed: the network keeps its weights and activations channels-last (oneDNN's fast layout on the
CPU) and can run its convolutions in bfloat16 (``precision``); the logits are always float32,
so the mixture maths downstream keeps full precision.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

PRECISIONS = ("auto", "float32", "bfloat16")


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
    cls = nn.Conv2d if dims == 2 else nn.Conv3d
    return cls(cin, cout, kernel, padding=kernel // 2)


def _norm(dims: int, channels: int) -> nn.Module:
    cls = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
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

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 2:
            return F.max_pool2d(x, self.pool_factor)
        return F.max_pool3d(x, self.pool_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) → float32 logits (N, K, *spatial)."""
        x = x.contiguous(memory_format=self._memory_format)
        dtype = self.autocast_dtype
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self._forward(x).float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        multiple = [f**self.depth for f in self.pool_factor]
        pads = [(-s) % m for s, m in zip(spatial, multiple)]
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
                x = self._pool(x)
        for reduce, block, skip in zip(self.up_reduce, self.up, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([skip, reduce(x)], dim=1))
        x = self.head(x)
        if any(pads):
            x = x[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
        return x

"""Helpers for the command-line and preview tests: phantoms with real geometry, a PNG decoder, and
../trained_models.py (real model files and their phantom cases).

Test modules import helpers from here, never from ``conftest``: every folder's conftest.py is the
module ``conftest`` in turn, so ``from conftest import`` would depend on which folder was collected last."""

from __future__ import annotations

import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Non-unit, anisotropic spacing, a non-zero origin and an oblique direction (rotation about the
# x axis by 30 degrees, then about z by 20 degrees), in SimpleITK's (x, y, z) order.
SPACING = (0.8, 1.1, 2.5)
ORIGIN = (-12.5, 30.0, 7.25)


def _rotation() -> tuple[float, ...]:
    a, b = np.deg2rad(30.0), np.deg2rad(20.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return tuple((rz @ rx).ravel())


DIRECTION = _rotation()
# (z, y, x) shape of the phantom: small, so the EM runs take well under a second.
SHAPE = (10, 22, 26)


def phantom_truth(shape=SHAPE) -> np.ndarray:
    """Labels 1..3: a background block (1), a slab (2) and a box inside it (3)."""
    truth = np.ones(shape, np.uint8)
    z, y, x = shape
    truth[:, y // 4:, :] = 2
    truth[z // 5: z - z // 5, y // 2: y - 3, x // 4: x - x // 4] = 3
    return truth


def make_image(array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION,
               dimension: int = 3) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[:dimension])
    image.SetOrigin(origin[:dimension])
    if dimension == 3:
        image.SetDirection(direction)
    return image


def decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit greyscale or RGB PNG (any filter types) into an array; checks the CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    position, idat, header = 8, b"", None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        position += 12 + length
    assert header is not None, "no IHDR chunk"
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour_type in (0, 2)
    channels = 3 if colour_type == 2 else 1
    stride = width * channels
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, stride + 1)
    pixels = np.zeros((height, stride), np.int32)
    for row in range(height):
        kind, line = raw[row, 0], raw[row, 1:].astype(np.int32)
        up = pixels[row - 1] if row else np.zeros(stride, np.int32)
        if kind in (0, 2):
            pixels[row] = (line + (up if kind == 2 else 0)) % 256
            continue
        assert kind in (1, 3, 4), f"unknown PNG filter type {kind}"
        current = pixels[row]
        for i in range(stride):  # filters that refer to the pixel on the left: byte by byte
            left = current[i - channels] if i >= channels else 0
            upper_left = up[i - channels] if i >= channels else 0
            if kind == 1:
                predictor = left
            elif kind == 3:
                predictor = (left + up[i]) // 2
            else:  # Paeth
                p = left + up[i] - upper_left
                pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upper_left)
                predictor = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else upper_left)
            current[i] = (line[i] + predictor) % 256
    shape = (height, width, 3) if channels == 3 else (height, width)
    return pixels.astype(np.uint8).reshape(shape)


def trained_models():
    """../trained_models.py, loaded by path (Testing/Python must stay off sys.path, see there)."""
    spec = importlib.util.spec_from_file_location("_trained_models_loader_cli",
                                                  Path(__file__).parents[1] / "trained_models.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    return loader.load()

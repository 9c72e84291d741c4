"""Draw the DeepGMMSegment icon (128x128 PNG): three Gaussian tissue blobs and their mixture curve.

Run from the repository root: ``python Utilities/make_icon.py``. It writes the extension icon
(``DeepGMMSegment.png``) and the module icon (``DeepGMMSegment/Resources/Icons/DeepGMMSegment.png``).
Drawn with numpy + Pillow so the picture is reproducible and needs no design tool.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SUPERSAMPLE = 4  # draw at 4x and downsample for smooth edges
CLASS_COLORS = [(236, 104, 74), (96, 190, 120), (84, 148, 236)]  # three tissue classes
BACKGROUND = (24, 32, 48)


def gaussianBlobs(size):
    """Return an RGBA float image of three soft, overlapping 2D Gaussian blobs."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    centers = [(0.33, 0.31), (0.67, 0.31), (0.50, 0.57)]
    sigma = 0.13
    weights = np.stack([np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)) for cx, cy in centers])
    # Colour each pixel by its responsibilities (like a soft segmentation), opacity by the mixture density.
    responsibilities = weights / weights.sum(axis=0, keepdims=True)
    rgb = np.tensordot(responsibilities.transpose(1, 2, 0), np.array(CLASS_COLORS, float), axes=1)
    density = weights.max(axis=0)
    alpha = np.clip((density - 0.22) / 0.22, 0.0, 1.0)
    return rgb, alpha


def mixtureCurve(size):
    """Return (x, y) pixel points of a three-component 1D Gaussian mixture density along the bottom."""
    x = np.linspace(0.0, 1.0, 400)
    components = [(0.25, 0.07, 0.8), (0.52, 0.08, 1.0), (0.78, 0.06, 0.9)]
    y = sum(w * np.exp(-((x - m) ** 2) / (2 * s**2)) for m, s, w in components)
    y = y / y.max()
    left, right, base, height = 0.12 * size, 0.88 * size, 0.92 * size, 0.17 * size
    return [(left + xi * (right - left), base - yi * height) for xi, yi in zip(x, y)]


def drawIcon():
    """Return the icon as a Pillow RGBA image of SIZE x SIZE pixels."""
    big = SIZE * SUPERSAMPLE
    canvas = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rounded_rectangle([0, 0, big - 1, big - 1], radius=22 * SUPERSAMPLE, fill=BACKGROUND + (255,))

    rgb, alpha = gaussianBlobs(big)
    background = np.asarray(canvas, float)[..., :3]
    composed = background * (1 - alpha[..., None]) + rgb * alpha[..., None]
    mask = np.asarray(canvas)[..., 3]
    image = Image.fromarray(np.dstack([composed.astype(np.uint8), mask]), "RGBA")

    draw = ImageDraw.Draw(image)
    draw.line(mixtureCurve(big), fill=(255, 255, 255, 255), width=3 * SUPERSAMPLE, joint="curve")
    image = image.filter(ImageFilter.SMOOTH)
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def main():
    """Write the icon to both places Slicer looks for it."""
    repositoryRoot = Path(__file__).resolve().parents[1]
    icon = drawIcon()
    for path in (repositoryRoot / "DeepGMMSegment.png",
                 repositoryRoot / "DeepGMMSegment" / "Resources" / "Icons" / "DeepGMMSegment.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        icon.save(path, optimize=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

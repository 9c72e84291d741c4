"""PNG preview of a segmentation: orthogonal mid slices with the label overlay.

The picture is composed with numpy and written by SimpleITK's PNG writer (no Pillow), so the
preview works wherever the command line does.
The class palette (:func:`class_colors`) is shared with the Slicer side so a class has the same
colour in the preview and in the segmentation node.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from ..result import class_colors

__all__ = [
    "OVERLAY_ALPHA",
    "class_colors",
    "render_curve",
    "render_preview",
    "write_image_preview",
    "write_png",
    "write_preview",
]

#: Opacity of the class colour over the greyscale background.
OVERLAY_ALPHA = 0.5

# Gap between the views of a 3D preview, in output pixels.
_VIEW_GAP = 4
# Small images are enlarged so the preview is readable; never more than this factor.
_MAX_UPSCALE = 4
_TARGET_EXTENT = 256


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) or (H, W) uint8 array to ``path`` as PNG (SimpleITK's PNG writer).

    Raises ``ValueError`` for pixels a PNG cannot hold or a file that cannot be written.
    """
    import SimpleITK as sitk

    array = np.asarray(rgb)
    if array.dtype != np.uint8:
        raise ValueError(f"PNG pixels must be uint8, got {array.dtype}; scale and cast first")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"PNG pixels must have shape (H, W) or (H, W, 3), got {array.shape}")
    if 0 in array.shape[:2]:
        raise ValueError(f"cannot write an empty image of shape {array.shape}")
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("PNGImageIO")  # PNG whatever the file name ends in
    writer.SetFileName(str(path))
    try:
        writer.Execute(sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=array.ndim == 3))
    except RuntimeError as error:
        reason = [line for line in str(error).splitlines() if line.strip()][-1:] or ["unknown error"]
        raise ValueError(f"cannot write the PNG '{path}' ({reason[0].strip()}); "
                         "choose a writable file name") from None


def _window(image: np.ndarray) -> np.ndarray:
    """Map intensities to 0..1 with a 1st–99th percentile window (robust to outliers)."""
    values = image[np.isfinite(image)]
    if values.size == 0:
        return np.zeros(image.shape, np.float32)
    low, high = np.percentile(values, [1.0, 99.0])
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.full(image.shape, 0.5, np.float32)
    scaled = (np.nan_to_num(image.astype(np.float64), nan=low) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def _resize_nearest(view: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = (np.arange(shape[0]) * view.shape[0] // shape[0]).astype(np.intp)
    cols = (np.arange(shape[1]) * view.shape[1] // shape[1]).astype(np.intp)
    return view[np.ix_(rows, cols)]


def _mid_views(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid slices of a (z, y, x) volume.

    Coronal and sagittal views are flipped vertically so the highest z (superior, for volumes in
    LPS orientation) is at the top.
    """
    z, y, x = (n // 2 for n in volume.shape)
    return [volume[z], volume[::-1, y, :], volume[::-1, :, x]]


def _view_spacings(spacing: Sequence[float]) -> list[tuple[float, float]]:
    sz, sy, sx = spacing
    return [(sy, sx), (sz, sx), (sz, sy)]


def render_preview(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float] | None = None,
    n_classes: int | None = None,
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """Render the preview as an (H, W, 3) uint8 array.

    Parameters
    ----------
    image:
        Background intensities, 2D (y, x) or 3D (z, y, x).
    labels:
        Label map of the same shape; 0 is left uncoloured, class k gets ``class_colors(K)[k-1]``.
    spacing:
        Voxel size in the array's axis order ((sz, sy, sx) or (sy, sx)), used for the aspect ratio;
        ``None`` means isotropic.
    n_classes:
        Number of classes K (defaults to the largest label).
    alpha:
        Opacity of the class colours.

    A 3D input gives three orthogonal mid slices side by side (axial, coronal, sagittal); a 2D
    input gives one view.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim not in (2, 3):
        raise ValueError(f"preview needs a 2D or 3D image, got {image.ndim} dimensions")
    if labels.shape != image.shape:
        raise ValueError(f"labels shape {labels.shape} differs from image shape {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if spacing is None:
        spacing = (1.0,) * image.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != image.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} must hold {image.ndim} positive values")
    label_values = labels.astype(np.int64)
    if label_values.min(initial=0) < 0:
        raise ValueError("labels must be >= 0")
    if n_classes is None:
        n_classes = int(label_values.max(initial=0))
    elif label_values.max(initial=0) > n_classes:
        raise ValueError(f"labels go up to {label_values.max()} but n_classes is {n_classes}")

    grey = _window(image)
    if image.ndim == 3:
        grey_views, label_views = _mid_views(grey), _mid_views(label_values)
        view_spacings = _view_spacings(spacing)
    else:
        grey_views, label_views = [grey], [label_values]
        view_spacings = [spacing]

    # One physical pixel size for every view, so the views share a scale and keep their aspect.
    pixel_mm = min(min(s) for s in view_spacings)
    extents_mm = [max(v.shape[0] * s[0], v.shape[1] * s[1])
                  for v, s in zip(grey_views, view_spacings)]
    upscale = int(np.clip(_TARGET_EXTENT * pixel_mm // max(extents_mm), 1, _MAX_UPSCALE))
    pixel_mm /= upscale

    palette = np.zeros((n_classes + 1, 3), np.float32)
    if n_classes:
        palette[1:] = np.asarray(class_colors(n_classes), np.float32)
    rendered = []
    for grey_view, label_view, (row_mm, col_mm) in zip(grey_views, label_views, view_spacings):
        shape = (max(1, int(round(grey_view.shape[0] * row_mm / pixel_mm))),
                 max(1, int(round(grey_view.shape[1] * col_mm / pixel_mm))))
        grey_view = _resize_nearest(grey_view, shape)
        label_view = _resize_nearest(label_view, shape)
        rgb = np.repeat(grey_view[..., None], 3, axis=2)
        inside = label_view > 0
        rgb[inside] = (1.0 - alpha) * rgb[inside] + alpha * palette[label_view[inside]]
        rendered.append(rgb)

    height = max(view.shape[0] for view in rendered)
    width = sum(view.shape[1] for view in rendered) + _VIEW_GAP * (len(rendered) - 1)
    canvas = np.zeros((height, width, 3), np.float32)
    column = 0
    for view in rendered:
        top = (height - view.shape[0]) // 2
        canvas[top:top + view.shape[0], column:column + view.shape[1]] = view
        column += view.shape[1] + _VIEW_GAP
    return np.round(canvas * 255.0).astype(np.uint8)


def write_preview(
    path: str | os.PathLike,
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float] | None = None,
    n_classes: int | None = None,
    alpha: float = OVERLAY_ALPHA,
) -> None:
    """Render the preview (see :func:`render_preview`) and write it to ``path`` as PNG."""
    write_png(path, render_preview(image, labels, spacing, n_classes, alpha))


def write_image_preview(path: str | os.PathLike, reference, label_image, n_classes: int) -> None:
    """The preview of a SimpleITK image and its label image, 3D views in radiological LPS orientation."""
    import SimpleITK as sitk

    background, label_view = reference, label_image
    if reference.GetDimension() == 3 and reference.GetSize()[2] > 1:
        # Show the views in radiological LPS orientation (superior up) whatever the file's
        # axis order; DICOMOrient only permutes and flips axes, it never resamples.
        background = sitk.DICOMOrient(reference, "LPS")
        label_view = sitk.DICOMOrient(label_image, "LPS")
    background_array = sitk.GetArrayFromImage(background)
    label_array = sitk.GetArrayFromImage(label_view)
    spacing = tuple(reversed(background.GetSpacing()))
    if background_array.ndim == 3 and background_array.shape[0] == 1:
        background_array, label_array, spacing = background_array[0], label_array[0], spacing[1:]
    write_preview(path, background_array, label_array, spacing=spacing, n_classes=n_classes)


def render_curve(history: Sequence[dict], best_epoch: int, size: tuple[int, int] = (320, 480)) -> np.ndarray:
    """RGB image of the training (blue) and held-out (orange) loss per epoch; grey line at the best epoch."""
    height, width = size
    image = np.full((height, width, 3), 255, np.uint8)
    margin = 24
    epochs = [h["epoch"] for h in history]
    series = [([h["train_loss"] for h in history], (31, 119, 180)),
              ([h["val_loss"] for h in history], (255, 127, 14))]
    values = [v for s, _ in series for v in s if v is not None and math.isfinite(v)]
    image[height - margin, margin:width - margin] = (0, 0, 0)  # axes
    image[margin:height - margin + 1, margin] = (0, 0, 0)
    if not epochs or not values:
        return image
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    e_hi = max(max(epochs), 2)

    def to_pixel(epoch, value):
        col = margin + (epoch - 1) / (e_hi - 1) * (width - 2 * margin - 1)
        row = (height - margin) - (value - lo) / (hi - lo) * (height - 2 * margin - 1)
        return row, col

    if best_epoch >= 1:
        _, col = to_pixel(best_epoch, lo)
        image[margin:height - margin, int(round(col))] = (190, 190, 190)
    for ys, colour in series:
        points = [to_pixel(e, v) for e, v in zip(epochs, ys) if v is not None and math.isfinite(v)]
        for (r0, c0), (r1, c1) in zip(points, points[1:] or points):
            n = int(max(abs(r1 - r0), abs(c1 - c0))) * 2 + 2
            rows = np.clip(np.round(np.linspace(r0, r1, n)).astype(int), 0, height - 2)
            cols = np.clip(np.round(np.linspace(c0, c1, n)).astype(int), 0, width - 2)
            for dr in (0, 1):  # two pixels thick
                for dc in (0, 1):
                    image[rows + dr, cols + dc] = colour
    return image

"""The PNG preview (written by SimpleITK, read back by an independent decoder), the palette and the CLI's progress bar."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest

from DeepGMMSegmentLib.cli.common import ProgressBar
from DeepGMMSegmentLib.cli.preview import OVERLAY_ALPHA, class_colors, render_preview, write_png

from cli_phantoms import decode_png


def test_png_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    write_png(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(decode_png((tmp_path / "rgb.png").read_bytes()), rgb)
    grey = rng.integers(0, 256, size=(5, 9), dtype=np.uint8)
    write_png(tmp_path / "grey.png", grey)
    np.testing.assert_array_equal(decode_png((tmp_path / "grey.png").read_bytes()), grey)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((0, 4, 3), np.uint8)])
def test_png_rejects_bad_pixel_arrays(bad, tmp_path):
    with pytest.raises(ValueError):
        write_png(tmp_path / "bad.png", bad)
    assert not (tmp_path / "bad.png").exists()


def test_class_colors_are_stable_valid_and_distinct():
    twelve = class_colors(12)
    assert len(twelve) == 12
    assert all(len(c) == 3 and all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in c)
               for c in twelve)
    # A class keeps its colour whatever K is, so "class 2" looks the same in every run.
    for k in range(2, 12):
        assert class_colors(k) == twelve[:k]
    distances = [np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(twelve, 2)]
    assert min(distances) > 0.2
    # No colour is (nearly) grey: each stands out on the greyscale background.
    assert min(max(c) - min(c) for c in twelve) > 0.3
    many = class_colors(20)
    assert len(set(many)) == 20 and many[:12] == twelve


@pytest.mark.parametrize("bad", [-1, 2.5, "3", True])
def test_class_colors_rejects_bad_counts(bad):
    with pytest.raises(ValueError):
        class_colors(bad)


def test_overlay_blends_the_class_colour_and_leaves_label_0_grey():
    image = np.tile(np.linspace(0, 100, 40), (30, 1))
    labels = np.zeros(image.shape, np.uint8)
    labels[5:15, 5:15] = 1
    labels[15:25, 20:35] = 2
    rgb = render_preview(image, labels, n_classes=2).astype(float)
    assert rgb.shape[:2][0] * 40 == rgb.shape[1] * 30  # one view, aspect kept
    scale = rgb.shape[0] // 30
    grey = render_preview(image, np.zeros_like(labels), n_classes=2).astype(float)
    outside = np.kron(labels == 0, np.ones((scale, scale), bool))
    np.testing.assert_array_equal(rgb[outside], grey[outside])
    assert (np.ptp(rgb[outside], axis=1) == 0).all()
    for k, colour in enumerate(class_colors(2), start=1):
        inside = np.kron(labels == k, np.ones((scale, scale), bool))
        expected = (1 - OVERLAY_ALPHA) * grey[inside] + OVERLAY_ALPHA * 255 * np.asarray(colour)
        np.testing.assert_allclose(rgb[inside], expected, atol=1.0)


def test_background_window_ignores_outliers():
    image = np.tile(np.linspace(0, 100, 50), (50, 1))
    image[0, 0] = 1e6  # one hot voxel must not turn the rest black
    rgb = render_preview(image, np.zeros(image.shape, np.uint8))
    assert np.median(rgb) > 100


def test_anisotropic_spacing_gives_the_physical_aspect():
    image = np.random.default_rng(0).normal(size=(10, 12))
    rgb = render_preview(image, np.zeros(image.shape, np.uint8), spacing=(3.0, 1.0))
    height, width = rgb.shape[:2]
    assert height * 12 == 3 * 10 * width  # 30 mm tall, 12 mm wide


def test_3d_preview_has_three_views_sized_by_spacing():
    volume = np.random.default_rng(0).normal(size=(8, 20, 30)) + 5
    rgb = render_preview(volume, np.zeros(volume.shape, np.uint8), spacing=(4.0, 1.0, 1.0))
    # Views: axial 20 x 30, coronal 32 x 30, sagittal 32 x 20 (mm), gap 4 px between views.
    gaps = np.flatnonzero(rgb.max(axis=(0, 2)) == 0)
    scale = rgb.shape[0] // 32
    assert rgb.shape[0] == 32 * scale
    assert rgb.shape[1] == (30 + 30 + 20) * scale + 2 * 4
    assert len(gaps) >= 8


@pytest.mark.parametrize("image, labels, kwargs", [
    (np.zeros((4, 4)), np.zeros((4, 5)), {}),
    (np.zeros((4,)), np.zeros((4,)), {}),
    (np.zeros((4, 4)), np.full((4, 4), 3), {"n_classes": 2}),
    (np.zeros((4, 4)), np.zeros((4, 4)), {"spacing": (1.0, 0.0)}),
    (np.zeros((4, 4)), np.zeros((4, 4)), {"alpha": 1.5}),
])
def test_render_preview_rejects_bad_input(image, labels, kwargs):
    with pytest.raises(ValueError):
        render_preview(image, labels, **kwargs)


def test_progress_bar_in_a_log_writes_one_line_per_tenth():
    stream = io.StringIO()
    bar = ProgressBar(stream, "em-gmm")
    for iteration in range(1, 101):
        assert bar(iteration, 100, 1.0 / iteration, iteration * 0.1) is True
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11  # iteration 1 and every 10 %
    assert lines[0].startswith("em-gmm: iteration 1/100") and lines[-1].startswith(
        "em-gmm: iteration 100/100")
    assert "\r" not in stream.getvalue()


def test_progress_bar_on_a_terminal_redraws_in_place():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = ProgressBar(stream, "deepsvg")
    for iteration in range(1, 11):
        bar(iteration, 10, 0.5, 2.0)
    bar.close()
    text = stream.getvalue()
    # tqdm redraws the line with carriage returns and ends it when the bar closes.
    assert text.startswith("\rdeepsvg:") and "\r" in text[1:] and text.endswith("\n")
    assert "10/10" in text.splitlines()[-1] and "NLL 0.5" in text

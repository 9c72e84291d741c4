"""deepgmm-segment --bias-field-order / --bias-field / --corrected on real files."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepGMMSegmentLib.cli import segment as segment_cli

from cli_phantoms import make_image
from test_cli_segment import assert_geometry, run_cli


def linear_field(shape, amplitude=0.4):
    """1 - amplitude .. 1 + amplitude along x and (half as strong) along y."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (1 + amplitude * (2 * x + y) / 3).astype(np.float32)


@pytest.fixture
def biased(phantom):
    field = linear_field(phantom["truth"].shape)
    path = phantom["dir"] / "biased.nii.gz"
    sitk.WriteImage(make_image(phantom["channel"] * field), str(path))
    return path, field


def test_writes_the_field_and_the_corrected_image_with_the_input_geometry(phantom, biased, capsys):
    path, true_field = biased
    out = phantom["dir"]
    code, err = run_cli(capsys, path, "--classes", 3, "--method", "em-gmm", "--mask", phantom["mask_path"],
                        "--output", out / "labels.nii.gz", "--bias-field", out / "field.nii.gz",
                        "--corrected", out / "corrected.nrrd")  # the files alone imply --bias-field-order auto
    assert code == 0, err
    field = sitk.ReadImage(str(out / "field.nii.gz"))
    corrected = sitk.ReadImage(str(out / "corrected.nrrd"))
    mask = phantom["mask"]
    for image in (field, corrected):
        assert image.GetPixelID() == sitk.sitkFloat32 and image.GetNumberOfComponentsPerPixel() == 1
        assert image.GetSize() == tuple(reversed(mask.shape))
        assert_geometry(image)
    field_array, corrected_array = sitk.GetArrayFromImage(field), sitk.GetArrayFromImage(corrected)
    assert np.corrcoef(field_array[mask], true_field[mask])[0, 1] > 0.9
    assert (field_array[~mask] == 1).all()
    biased_array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    np.testing.assert_allclose(corrected_array, np.where(mask, biased_array / field_array, biased_array), rtol=1e-5)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    assert (labels[mask] == phantom["truth"][mask]).mean() > 0.95


def test_several_channels_give_vector_images(phantom, biased, capsys):
    path, _ = biased
    out = phantom["dir"]
    second = out / "second.nii.gz"
    sitk.WriteImage(make_image(phantom["channel"] * 0.5 + 30.0), str(second))
    code, err = run_cli(capsys, path, second, "--classes", 3, "--method", "em-svgmm", "--mask", phantom["mask_path"],
                        "--bias-field-order", "2", "--output", out / "labels.nii.gz",
                        "--bias-field", out / "field.mha")
    assert code == 0, err
    field = sitk.ReadImage(str(out / "field.mha"))
    assert field.GetNumberOfComponentsPerPixel() == 2 and field.GetPixelID() == sitk.sitkVectorFloat32
    assert_geometry(field)


def test_an_unknown_order_is_refused_by_the_parser(phantom, capsys):
    out = phantom["dir"]
    with pytest.raises(SystemExit) as stop:
        segment_cli.main([str(phantom["channel_path"]), "--classes", "3", "--output", str(out / "labels.nii.gz"),
                          "--bias-field-order", "9"])
    assert stop.value.code == segment_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--bias-field-order" in err and "invalid choice: '9'" in err, err


def test_output_files_without_a_field_are_refused(phantom, capsys):
    out = phantom["dir"]
    code, err = run_cli(capsys, phantom["channel_path"], "--classes", 3, "--output", out / "labels.nii.gz",
                        "--bias-field-order", "none", "--corrected", out / "corrected.nii.gz")
    assert code == segment_cli.EXIT_USAGE and "need a bias field" in err and "auto" in err, err
    assert not (out / "labels.nii.gz").exists()


def test_a_signed_image_is_refused_with_the_fix(phantom, capsys):
    out = phantom["dir"]
    signed = out / "signed.nii.gz"
    sitk.WriteImage(make_image(phantom["channel"] - 200.0), str(signed))
    code, err = run_cli(capsys, signed, "--classes", 3, "--method", "em-gmm", "--output", out / "labels.nii.gz",
                        "--bias-field-order", "auto")
    assert code == segment_cli.EXIT_USAGE and "bias_field='none'" in err, err
    assert not (out / "labels.nii.gz").exists()


def test_detect_without_a_field_writes_the_identity_correction(phantom, biased, capsys):
    """The phantom spans a few cm, where "detect" looks for no field: the files say nothing was corrected."""
    path, _ = biased
    out = phantom["dir"]
    code, err = run_cli(capsys, path, "--classes", 3, "--method", "em-gmm", "--mask", phantom["mask_path"],
                        "--bias-field-order", "detect", "--output", out / "labels.nii.gz",
                        "--bias-field", out / "field.nii.gz", "--corrected", out / "corrected.nii.gz")
    assert code == 0, err
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "field.nii.gz")))
    corrected = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "corrected.nii.gz")))
    assert (field == 1).all()
    np.testing.assert_array_equal(corrected, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    assert "bias field was detected" not in err


def test_the_default_corrects_a_field_it_detects_and_says_so(phantom, capsys):
    """The same phantom on a head-sized grid (4 mm voxels) under a +-40 % field: the default corrects it."""
    mask = phantom["mask"]
    field = linear_field(mask.shape)
    out = phantom["dir"]
    image = make_image(phantom["channel"] * field)
    image.SetSpacing((8.0, 8.0, 8.0))
    mask_image = sitk.ReadImage(str(phantom["mask_path"]))
    mask_image.SetSpacing((8.0, 8.0, 8.0))
    sitk.WriteImage(image, str(out / "large.nii.gz"))
    sitk.WriteImage(mask_image, str(out / "large_mask.nii.gz"))
    code, err = run_cli(capsys, out / "large.nii.gz", "--classes", 3, "--method", "em-gmm",
                        "--mask", out / "large_mask.nii.gz", "--output", out / "labels.nii.gz")
    assert code == 0, err
    assert "bias field was detected" in err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    assert (labels[mask] == phantom["truth"][mask]).mean() > 0.95

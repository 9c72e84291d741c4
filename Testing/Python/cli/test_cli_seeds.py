"""deepgmm-segment --seeds LABELMAP on real NIfTI / NRRD files: identity, constraints, resampling, errors."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepGMMSegmentLib.cli import segment as segment_cli

from scipy.ndimage import distance_transform_edt

from cli_phantoms import DIRECTION, ORIGIN, make_image

# Seed label of each phantom class (1 background, 2 slab, 3 box): not the intensity order.
LABEL_OF_TRUTH = {1: 3, 2: 1, 3: 2}


def run_cli(capsys, *arguments) -> tuple[int, str]:
    code = segment_cli.main([str(a) for a in arguments])
    return code, capsys.readouterr().err


def strokes(truth: np.ndarray, label_of_truth=LABEL_OF_TRUTH, per_class: int = 5) -> np.ndarray:
    """A short line of voxels inside each class, labelled by ``label_of_truth``."""
    seeds = np.zeros(truth.shape, np.uint8)
    for true_class, label in label_of_truth.items():
        z, y, x = np.argwhere(truth == true_class)[len(np.argwhere(truth == true_class)) // 2]
        line = [(z, y, xx) for xx in range(x, x + 20) if xx < truth.shape[2] and truth[z, y, xx] == true_class]
        for voxel in line[:per_class]:
            seeds[voxel] = label
    return seeds


def blobs(truth: np.ndarray, label_of_truth=LABEL_OF_TRUTH) -> np.ndarray:
    """A small ball of voxels deep inside each class (it survives a coarser grid), labelled by ``label_of_truth``."""
    seeds = np.zeros(truth.shape, np.uint8)
    grid = np.indices(truth.shape)
    for true_class, label in label_of_truth.items():
        depth = distance_transform_edt(np.pad(truth == true_class, 1))[1:-1, 1:-1, 1:-1]
        centre = np.unravel_index(depth.argmax(), truth.shape)
        near = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= 4
        seeds[near & (truth == true_class)] = label
    return seeds


def write(path: Path, array: np.ndarray, **geometry) -> Path:
    sitk.WriteImage(make_image(array, **geometry), str(path))
    return path


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("seed_name", ["seeds.nii.gz", "seeds.nrrd"])
def test_seeds_give_the_class_count_and_order_and_keep_their_voxels(phantom, capsys, seed_name):
    out = phantom["dir"]
    seeds = strokes(phantom["truth"])
    seed_path = write(out / seed_name, seeds)
    digest = hashlib.sha256(seed_path.read_bytes()).hexdigest()
    code, err = run_cli(capsys, phantom["channel_path"], "--seeds", seed_path, "-m", "em-gmm",
                        "-o", out / "labels.nii.gz", "-p", out / "probabilities.nrrd")
    assert code == 0, err
    labels = read(out / "labels.nii.gz")
    expected = np.vectorize(LABEL_OF_TRUTH.get)(phantom["truth"])
    assert (labels == expected).mean() > 0.97  # no --classes, class k = seed label k
    assert np.array_equal(labels[seeds > 0], seeds[seeds > 0])
    assert read(out / "probabilities.nrrd").shape[-1] == 3
    assert "class 3" in err and "class 4" not in err
    assert hashlib.sha256(seed_path.read_bytes()).hexdigest() == digest  # the input is untouched


def test_more_classes_than_seed_labels_leaves_the_rest_free(phantom, capsys):
    out = phantom["dir"]
    seeds = strokes(phantom["truth"], {3: 1, 1: 2})
    code, err = run_cli(capsys, phantom["channel_path"], "--seeds", write(out / "seeds.nii.gz", seeds),
                        "-k", "3", "-m", "deepsvg", "--max-iter", "10", "-o", out / "labels.nii.gz")
    assert code == 0, err
    labels = read(out / "labels.nii.gz")
    assert (labels == np.vectorize({3: 1, 1: 2, 2: 3}.get)(phantom["truth"])).mean() > 0.95
    assert np.array_equal(labels[seeds > 0], seeds[seeds > 0])


def test_seeds_on_another_grid_are_resampled_nearest_neighbour(phantom, capsys):
    out = phantom["dir"]
    fine = make_image(blobs(phantom["truth"]))
    # Twice the spacing in x and y, shifted by 0.3 mm: the strokes survive, thinned.
    coarse_reference = sitk.Image([13, 11, 10], sitk.sitkUInt8)
    coarse_reference.SetSpacing((1.6, 2.2, 2.5))
    coarse_reference.SetOrigin(tuple(o + 0.3 for o in ORIGIN))
    coarse_reference.SetDirection(DIRECTION)
    coarse = sitk.Resample(fine, coarse_reference, sitk.Transform(), sitk.sitkNearestNeighbor)
    sitk.WriteImage(coarse, str(out / "coarse_seeds.nrrd"))
    expected = sitk.GetArrayFromImage(sitk.Resample(coarse, fine, sitk.Transform(), sitk.sitkNearestNeighbor))
    assert set(np.unique(expected)) == {0, 1, 2, 3}

    code, err = run_cli(capsys, phantom["channel_path"], "--seeds", out / "coarse_seeds.nrrd", "-m", "em-gmm",
                        "-o", out / "labels.nii.gz")
    assert code == 0, err
    assert "resampled seeds" in err and "nearest neighbour" in err
    labels = read(out / "labels.nii.gz")
    assert np.array_equal(labels[expected > 0], expected[expected > 0])
    assert (labels == np.vectorize(LABEL_OF_TRUTH.get)(phantom["truth"])).mean() > 0.97


def _gap(d, truth):
    seeds = strokes(truth)
    seeds[seeds == 1] = 0
    return [write(d / "gap.nii.gz", seeds)], r"Seed label\(s\) 1 mark no voxels"


def _outside_mask(d, truth):
    seeds = blobs(truth) * read(d / "mask.nii.gz")
    seeds[0, 0, 0] = 2  # the mask leaves the first slice out
    return [write(d / "outside.nii.gz", seeds), "--mask", d / "mask.nii.gz"], r"1 seed voxel\(s\) lie outside the mask"


def _non_integer(d, truth):
    return [write(d / "float.nrrd", strokes(truth).astype(np.float32) * 0.5)], r"non-integer value.*nearest-neighbour"


def _one_class(d, truth):
    return [write(d / "one.nii.gz", strokes(truth, {2: 1}))], r"only one class.*n_classes >= 2"


def _too_few_classes(d, truth):
    return [write(d / "three.nii.gz", strokes(truth)), "-k", "2"], r"mark 3 classes.*n_classes >= 3"


def _two_d(d, truth):
    sitk.WriteImage(make_image(strokes(truth)[4], dimension=2), str(d / "slice.nrrd"))
    return [d / "slice.nrrd"], r"seeds '.*slice.nrrd' is 2D but channel 1 is 3D"


def _with_prior_means(d, truth):
    return [write(d / "s.nii.gz", strokes(truth)), "--prior-means", "0;60;100"], "--seeds and --prior-means exclude"


def _output_is_the_seeds(d, truth):
    return [write(d / "s.nii.gz", strokes(truth))], r"--output '.*s.nii.gz' is also an input"


@pytest.mark.parametrize("case", [_gap, _outside_mask, _non_integer, _one_class, _too_few_classes, _two_d,
                                  _with_prior_means, _output_is_the_seeds])
def test_bad_seeds_exit_2_with_one_line_naming_the_problem(phantom, capsys, case):
    d = phantom["dir"]
    extra, message = case(d, phantom["truth"])
    output = extra[0] if case is _output_is_the_seeds else d / "labels.nii.gz"
    code, err = run_cli(capsys, phantom["channel_path"], "--seeds", *extra, "-m", "em-gmm", "-o", output)
    assert code == 2
    assert err.startswith("deepgmm-segment: error:") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (d / "labels.nii.gz").exists()


def test_classes_are_required_without_seeds(phantom, capsys):
    code, err = run_cli(capsys, phantom["channel_path"], "-o", phantom["dir"] / "labels.nii.gz")
    assert code == 2 and "--classes K is required unless --seeds" in err

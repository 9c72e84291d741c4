"""segment(..., seeds=label_array): class identity and order from the seeds, constraints, inputs untouched, errors."""

import numpy as np
import pytest

from phantoms import blob_phantom
from DeepGMMSegmentLib import segment

METHODS = ("em-gmm", "em-svgmm", "deepg", "deepsvg")
# Deep methods without the EM start: the result is the network's own output, not the (seeded) EM fit.
QUICK = {"deepg": dict(warm_start="none"), "deepsvg": dict(warm_start="none")}
# Seed label of each true class (truth 1..3): not the channel-1 order the unseeded run uses.
LABEL_OF_TRUTH = {1: 2, 2: 3, 3: 1}


def _strokes(truth, label_of_truth, per_class=6, seed=0):
    """A few marked voxels of each true class, labelled by ``label_of_truth``."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(truth.shape, np.int16)
    for true_class, label in label_of_truth.items():
        where = np.flatnonzero(truth.ravel() == true_class)
        seeds.flat[rng.choice(where, per_class, replace=False)] = label
    return seeds


@pytest.fixture(scope="module")
def phantom():
    channels, truth, means = blob_phantom((40, 40), n_classes=3, n_channels=2, noise=0.15)
    return channels, truth, means


@pytest.mark.parametrize("method", METHODS)
def test_class_k_is_seed_label_k_with_no_matching(phantom, method):
    channels, truth, means = phantom
    seeds = _strokes(truth, LABEL_OF_TRUTH)
    result = segment(channels, method=method, seeds=seeds, device="cpu", **QUICK.get(method, {}))
    assert result.n_classes == 3
    expected = np.vectorize(LABEL_OF_TRUTH.get)(truth)
    assert np.mean(result.labels == expected) > 0.9  # identity from the seeds, no matching
    for true_class, label in LABEL_OF_TRUTH.items():
        assert np.allclose(result.means[label - 1], means[true_class - 1], atol=0.2)


@pytest.mark.parametrize("method", METHODS)
def test_marked_voxels_keep_their_class_even_against_the_image(phantom, method):
    channels, truth, _ = phantom
    seeds = _strokes(truth, LABEL_OF_TRUTH)
    # Two marked voxels contradict the image (the darkest class painted as the brightest and back).
    seeds[tuple(np.argwhere(truth == 1)[0])] = LABEL_OF_TRUTH[3]
    seeds[tuple(np.argwhere(truth == 3)[-1])] = LABEL_OF_TRUTH[1]
    result = segment(channels, method=method, seeds=seeds, device="cpu", max_iter=20, **QUICK.get(method, {}))
    marked = seeds > 0
    assert np.array_equal(result.labels[marked], seeds[marked])
    assert np.allclose(result.probabilities[:, marked].max(0), 1.0)


def test_unseeded_order_differs_so_the_seeds_decide(phantom):
    channels, truth, _ = phantom
    result = segment(channels, 3, method="em-gmm", device="cpu")
    assert np.mean(result.labels == truth) > 0.9  # channel-1 order, not the seeds' order


@pytest.mark.parametrize("method", ["em-gmm", "deepsvg"])
def test_extra_classes_are_free_and_come_after_the_seed_classes(phantom, method):
    channels, truth, means = phantom
    seeds = _strokes(truth, {3: 1, 1: 2})  # class 2 of the truth is not marked
    result = segment(channels, 3, method=method, seeds=seeds, device="cpu", **QUICK.get(method, {}))
    assert np.mean(result.labels == np.vectorize({3: 1, 1: 2, 2: 3}.get)(truth)) > 0.9
    assert np.allclose(result.means[2], means[1], atol=0.2)
    assert np.array_equal(result.labels[seeds > 0], seeds[seeds > 0])


def test_a_class_marked_on_one_voxel_stays_at_its_seed_mean_with_one_seed_class(phantom):
    channels, truth, _ = phantom
    seeds = _strokes(truth, {2: 1}, per_class=10)
    result = segment(channels, 3, method="em-gmm", seeds=seeds, device="cpu")
    assert np.mean(result.labels[truth == 2] == 1) > 0.9


def test_inputs_are_not_modified(phantom):
    channels, truth, _ = phantom
    seeds = _strokes(truth, LABEL_OF_TRUTH).astype(np.float64)
    mask = np.ones(truth.shape, bool)
    before = ([c.copy() for c in channels], seeds.copy(), mask.copy())
    segment(channels, method="em-gmm", mask=mask, seeds=seeds, device="cpu", bias_field="none")
    assert all(np.array_equal(a, b) for a, b in zip(before[0], channels))
    assert np.array_equal(before[1], seeds) and seeds.dtype == np.float64 and np.array_equal(before[2], mask)


def test_seeds_with_a_bias_field_still_hold(phantom):
    channels, truth, _ = phantom
    positive = [c + 5.0 for c in channels]
    seeds = _strokes(truth, LABEL_OF_TRUTH)
    result = segment(positive, method="em-gmm", seeds=seeds, device="cpu", bias_field="auto")
    assert np.array_equal(result.labels[seeds > 0], seeds[seeds > 0])
    assert np.mean(result.labels == np.vectorize(LABEL_OF_TRUTH.get)(truth)) > 0.9


def _seeds(marks, shape=(16, 16)):
    s = np.zeros(shape, np.int16)
    for (y, x), label in marks.items():
        s[y, x] = label
    return s


@pytest.mark.parametrize(
    "seeds, kwargs, match",
    [
        (_seeds({(1, 1): 1, (2, 2): 3}), {}, r"Seed label\(s\) 2 mark no voxels.*1..L without gaps"),
        (np.zeros((16, 16), int), {}, "seeds mark no voxels.*seeds=None"),
        (_seeds({(1, 1): 1}), {}, r"only one class.*n_classes >= 2"),
        (_seeds({(1, 1): 1}), dict(n_classes=1), "at least 2"),
        (_seeds({(1, 1): 1, (2, 2): 2, (3, 3): 3}), dict(n_classes=2), r"mark 3 classes.*n_classes >= 3"),
        (_seeds({(1, 1): 1, (2, 2): 2}, (8, 8)), {}, r"seeds have shape \(8, 8\).*channels' grid"),
        (_seeds({(1, 1): 1, (2, 2): 2}).astype(float) + 0.5 * np.eye(16), {}, "non-integer value.*nearest-neighbour"),
        (_seeds({(1, 1): 1, (2, 2): 2}) > 0, {}, "dtype bool.*integer label array"),
        (_seeds({(1, 1): 1, (2, 2): -2}), {}, "negative label -2"),
        (_seeds({(0, 0): 1, (8, 8): 2}), dict(mask=np.pad(np.ones((14, 14), bool), 1)),
         r"1 seed voxel\(s\) lie outside the mask \(label\(s\) 1\).*enlarge the mask"),
        (_seeds({(1, 1): 1, (2, 2): 2}), dict(prior_means=[0.0, 1.0]), "seeds or prior_means, not both"),
        (_seeds({(1, 1): 1, (2, 2): 2}), dict(method="deepsvg", model="m.pt"), "trained model"),
    ],
)
def test_bad_seeds_are_a_clear_value_error(seeds, kwargs, match):
    img = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    args = dict(n_classes=None, method="em-gmm")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        segment(img, args.pop("n_classes"), seeds=seeds, **args)


def test_n_classes_is_required_without_seeds():
    with pytest.raises(ValueError, match="n_classes is missing.*or seeds"):
        segment(np.random.default_rng(0).normal(size=(8, 8)), method="em-gmm")

"""Metric code of the evaluation: confusion counts, Hungarian matching, Dice, NLL units."""

import numpy as np
import pytest

from evaluation import metrics


def three_class_labels(shape=(20, 30), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 4, size=shape)


def test_confusion_matrix_counts_and_ignores_outside():
    labels = np.array([1, 1, 2, 3, 0, 2])
    reference = np.array([1, 2, 2, 3, 3, 0])
    counts = metrics.confusion_matrix(labels, reference, 3)
    expected = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(counts, expected)


def test_dice_per_class_by_hand():
    labels = np.array([1, 1, 2, 2, 2, 3])
    reference = np.array([1, 2, 2, 2, 3, 3])
    # class 1: 2*1/(2+1); class 2: 2*2/(3+3); class 3: 2*1/(1+2)
    np.testing.assert_allclose(metrics.dice_per_class(labels, reference, 3), [2 / 3, 2 / 3, 2 / 3])
    assert np.isnan(metrics.dice_per_class(np.array([1]), np.array([1]), 2)[1])


def test_hungarian_recovers_a_permutation():
    reference = three_class_labels()
    permutation = np.array([0, 3, 1, 2])  # cluster ids as an unsupervised method might number them
    clusters = permutation[reference]
    mapping = metrics.hungarian_mapping(clusters, reference, 3)
    np.testing.assert_array_equal(mapping[clusters], reference)
    dice, _ = metrics.matched_dice(clusters, reference, 3, identity_from_method=False)
    np.testing.assert_allclose(dice, 1.0)


def test_identity_from_method_is_scored_as_is():
    reference = three_class_labels()
    swapped = np.array([0, 2, 1, 3])[reference]  # CSF and GM swapped by the "method"
    dice, mapping = metrics.matched_dice(swapped, reference, 3, identity_from_method=True)
    np.testing.assert_array_equal(mapping, [0, 1, 2, 3])
    assert dice[0] < 0.5 and dice[1] < 0.5 and dice[2] == 1.0


def test_hungarian_prefers_largest_total_overlap_not_greedy():
    # greedy per-row choice would give cluster 1 -> class 1 (overlap 5) and force 2 -> 2 (overlap 0);
    # the optimum is 1 -> 2 (4) and 2 -> 1 (4)
    labels = np.array([1] * 9 + [2] * 4)
    reference = np.array([1] * 5 + [2] * 4 + [1] * 4)
    mapping = metrics.hungarian_mapping(labels, reference, 2)
    np.testing.assert_array_equal(mapping, [0, 2, 1])


def test_pairwise_agreement_is_one_for_relabelled_copy_and_lower_otherwise():
    labels = three_class_labels((10, 12))
    mask = np.ones(labels.shape, dtype=bool)
    assert metrics.pairwise_agreement(labels, np.array([0, 3, 1, 2])[labels], mask, 3) == pytest.approx(1.0)
    other = three_class_labels((10, 12), seed=5)
    assert metrics.pairwise_agreement(labels, other, mask, 3) < 0.6


def test_gmm_nll_matches_scikit_learn_and_unit_conversion():
    from sklearn.mixture import GaussianMixture
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(10, 2, (400, 2)), rng.normal(30, 5, (600, 2))])
    model = GaussianMixture(2, covariance_type="full", random_state=0).fit(x)
    nll = metrics.gmm_nll(x, model.weights_, model.means_, model.covariances_)
    assert nll == pytest.approx(-model.score(x), rel=1e-10)
    # the same mixture expressed on z-scored data has the converted NLL
    centre, scale = x.mean(0), x.std(0)
    z = (x - centre) / scale
    z_means = (model.means_ - centre) / scale
    z_covs = model.covariances_ / np.outer(scale, scale)
    nll_z = metrics.gmm_nll(z, model.weights_, z_means, z_covs)
    assert metrics.to_normalised_units(nll, x) == pytest.approx(nll_z, rel=1e-10)


def test_best_threshold_split_finds_the_separating_thresholds():
    rng = np.random.default_rng(3)
    reference = np.repeat([1, 2, 3], [300, 500, 200])
    values = np.array([0.0, 10.0, 50.0, 90.0])[reference] + rng.uniform(-5, 5, reference.size)
    dice, (low, high) = metrics.best_threshold_split(values, reference, bins=100)
    assert dice == pytest.approx(1.0)
    assert 15 <= low <= 45 and 55 <= high <= 85
    # overlapping classes: the oracle is below 1 but at least as good as any fixed split
    noisy = values + rng.normal(0, 15, values.size)
    best, _ = metrics.best_threshold_split(noisy, reference, bins=100)
    fixed = np.digitize(noisy, [30.0, 70.0]) + 1
    assert np.mean(metrics.dice_per_class(fixed, reference, 3)) <= best + 1e-9 < 1.0

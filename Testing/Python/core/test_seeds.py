"""core/seeds.py and the seeded fits of core/em.py and core/deep.py: marked voxels keep their class."""

import numpy as np
import torch

from DeepGMMSegmentLib.core import em, seeds
from DeepGMMSegmentLib.core.deep import deep_gmm_loss, fit_deep
from DeepGMMSegmentLib.options import DeepSettings


def test_fix_responsibilities_sets_marked_voxels_one_hot_and_keeps_the_rest():
    log_resp = torch.log_softmax(torch.randn(6, 3, requires_grad=True), 1)
    labels = torch.tensor([-1, 2, -1, 0, -1, 1])
    fixed = seeds.fix_responsibilities(log_resp, labels)
    marked = labels >= 0
    assert torch.equal(fixed[~marked], log_resp[~marked])
    assert torch.equal(fixed[marked].argmax(1), labels[marked])
    assert torch.allclose(fixed[marked].exp().sum(1), torch.ones(3))
    assert fixed[marked].exp().max(1).values.min() == 1.0
    # the constant rows pass no gradient back; the free rows do
    grad, = torch.autograd.grad(fixed[:, 0].sum(), log_resp)
    assert torch.all(grad[marked] == 0) and torch.all(grad[~marked, 0] == 1)


def test_fix_responsibilities_on_a_grid_with_the_class_axis_first():
    log_resp = torch.log_softmax(torch.randn(1, 4, 5, 5), 1)
    labels = torch.full((1, 5, 5), seeds.FREE)
    labels[0, 2, 3] = 3
    fixed = seeds.fix_responsibilities(log_resp, labels, class_dim=1)
    assert fixed[0, :, 2, 3].argmax() == 3 and fixed[0, 3, 2, 3] == 0.0
    assert torch.equal(fixed[0, :, 0, 0], log_resp[0, :, 0, 0])
    assert seeds.fix_responsibilities(log_resp, None) is log_resp


def test_class_means_average_the_marked_voxels_of_each_class():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [10.0, 10.0], [4.0, 5.0]])
    labels = torch.tensor([1, 1, -1, 0])
    assert torch.allclose(seeds.class_means(x, labels, 2), torch.tensor([[4.0, 5.0], [1.0, 2.0]]))


def test_initial_means_put_the_seed_means_first_and_give_free_classes_the_other_centres():
    seed_means = torch.tensor([[5.0], [0.1]])
    centres = torch.tensor([[0.0], [2.5], [5.2]])
    start = seeds.initial_means(seed_means, 3, centres)
    assert torch.equal(start, torch.tensor([[5.0], [0.1], [2.5]]))
    assert seeds.initial_means(seed_means, 2) is seed_means


def _two_clusters(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n, 1, generator=g) * 0.3, 3 + torch.randn(n, 1, generator=g) * 0.3])
    return x


def test_em_keeps_seeded_voxels_in_their_class_even_against_the_data():
    x = _two_clusters()
    labels = torch.full((x.shape[0],), seeds.FREE)
    labels[:5] = 1  # voxels of the low cluster marked as the high class
    labels[-5:] = 1
    labels[400:405] = 0  # and high-cluster voxels marked as the low class
    for fit in (em.fit_gmm(x, 2, generator=torch.Generator().manual_seed(0), means_init=torch.tensor([[0.0], [3.0]]),
                           fixed_labels=labels),
                em.fit_svgmm(x, 2, generator=torch.Generator().manual_seed(0), means_init=torch.tensor([[0.0], [3.0]]),
                             fixed_labels=labels)):
        predicted = fit.log_resp.argmax(1)
        assert torch.equal(predicted[labels >= 0], labels[labels >= 0])
        # the unmarked voxels still follow the data
        assert (predicted[5:400] == 0).float().mean() > 0.98 and (predicted[405:-5] == 1).float().mean() > 0.98
    unconstrained = em.fit_gmm(x, 2, generator=torch.Generator().manual_seed(0), means_init=torch.tensor([[0.0], [3.0]]))
    assert (unconstrained.log_resp.argmax(1)[:5] == 0).all()


def test_a_partial_prior_pulls_only_the_first_classes():
    x = torch.randn(1, 1, 8, 8)
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    with_prior, nll, fitted = deep_gmm_loss(x, torch.log_softmax(logits, 1), mask, "deepsvg",
                                            prior_means=torch.tensor([[5.0], [-5.0]]), prior_weight=1.0)
    means = fitted[0][1].means
    expected = ((means[0, 0] - 5.0) ** 2 + (means[1, 0] + 5.0) ** 2).item()
    assert abs((with_prior - nll).item() - expected) < 1e-4


def test_deep_fit_keeps_seeded_voxels_in_their_class():
    torch.manual_seed(0)
    img = torch.zeros(1, 16, 16)
    img[0, :, 8:] = 1.0
    img += 0.1 * torch.randn(1, 16, 16)
    mask = torch.ones(16, 16, dtype=torch.bool)
    labels = torch.full((16, 16), seeds.FREE)
    labels[2, 2], labels[3, 12] = 1, 0  # each marked as the other side's class
    labels[10, 3], labels[10, 13] = 0, 1
    settings = DeepSettings(max_iter=15, min_iter=15, warm_start="none", base_width=4, depth=2)
    for method in ("deepg", "deepsvg"):
        fit, _ = fit_deep(img, mask, 2, method, settings, fixed_labels=labels)
        predicted = fit.log_resp.argmax(1).reshape(16, 16)
        assert torch.equal(predicted[labels >= 0], labels[labels >= 0])

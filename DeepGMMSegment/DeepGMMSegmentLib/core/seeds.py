"""Seeds: a few voxels per class marked by the user, which fix class identity and constrain the fit.

A seed label array on the input grid marks class k with label k > 0 (0 = unmarked). The engine
checks it (:func:`.inputs.validate_seeded_inputs`) and turns it into ``seed_labels``: the class
index 0..L-1 of each marked voxel and :data:`FREE` (-1) elsewhere. Then:

* the seed classes come first, class k = label k; classes beyond the L seed labels are free;
* the seed classes' mean intensities become prior means (:func:`class_means`), and every method
  starts from them (:func:`initial_means` fills the free classes' means from k-means++);
* the marked voxels are **hard constraints**: their responsibilities are set to their class after
  every E-step (EM) and after every forward pass of the network (deepg, deepsvg), by
  :func:`fix_responsibilities`. Hard rather than a loss term because it holds exactly in all four
  methods with one meaning (the classic semi-supervised EM, where labelled voxels enter the
  M-step with their known class), needs no weight that would have to be tuned against the NLL per
  method and per number of marked voxels, and cannot be overruled by the likelihood: a painted
  voxel always comes out as painted.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FREE", "SEED_LOG_FLOOR", "class_means", "fix_responsibilities", "initial_means"]

FREE = -1  # seed_labels value of an unmarked voxel
# Log responsibility of the other classes at a marked voxel: exp(-100) is 0 in float32 sums, and
# unlike -inf it keeps 0 * log(p) (cross-entropy to a one-hot target) finite.
SEED_LOG_FLOOR = -100.0


def fix_responsibilities(log_resp: torch.Tensor, seed_labels: torch.Tensor | None, class_dim: int = -1) -> torch.Tensor:
    """``log_resp`` with every marked voxel one-hot on its seed class (log 0 there, SEED_LOG_FLOOR elsewhere).

    seed_labels: long, ``log_resp``'s shape without ``class_dim``; FREE (-1) = unmarked. A new tensor
    (differentiable at the unmarked voxels); ``None`` returns ``log_resp`` itself.
    """
    if seed_labels is None:
        return log_resp
    class_dim = class_dim % log_resp.ndim
    shape = [1] * log_resp.ndim
    shape[class_dim] = -1
    classes = torch.arange(log_resp.shape[class_dim], device=log_resp.device).view(shape)
    labels = seed_labels.unsqueeze(class_dim)
    one_hot = torch.where(labels == classes, 0.0, SEED_LOG_FLOOR).to(log_resp.dtype)
    return torch.where(labels != FREE, one_hot, log_resp)


def class_means(x: torch.Tensor, seed_labels: torch.Tensor, n_seed_classes: int) -> torch.Tensor:
    """(L, C) mean of each seed class over its marked voxels; x (V, C), seed_labels (V,). Accumulated in float64."""
    marked = seed_labels != FREE
    labels = seed_labels[marked]
    sums = torch.zeros((n_seed_classes, x.shape[1]), dtype=torch.float64, device=x.device)
    sums.index_add_(0, labels, x[marked].double())
    counts = torch.bincount(labels, minlength=n_seed_classes).double()
    return (sums / counts[:, None]).to(x.dtype)


def initial_means(seed_means: torch.Tensor, n_classes: int, centres: torch.Tensor | None = None) -> torch.Tensor:
    """(K, C) starting means: the L seed means first, then K - L of ``centres`` (K, C) for the free classes.

    ``centres`` (e.g. k-means++ of the data) are needed only when K > L; each seed class takes the
    centre nearest to it (an optimal one-to-one assignment), and the centres left over, in their
    own order, start the free classes.
    """
    n_seed = seed_means.shape[0]
    if n_classes == n_seed:
        return seed_means
    # Only a seeded run with free classes needs scipy: every other run works with numpy and torch alone.
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(seed_means.double(), centres.double()).cpu().numpy() ** 2
    _, taken = linear_sum_assignment(cost)
    left = np.setdiff1d(np.arange(centres.shape[0]), taken)[: n_classes - n_seed]
    return torch.cat([seed_means, centres[torch.as_tensor(left, device=centres.device)].to(seed_means.dtype)])

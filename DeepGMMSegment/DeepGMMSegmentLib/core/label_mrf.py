"""Final labels of a fitted mixture under a Potts prior on the labels (mean field).

A deepsvg fit ends with per-voxel weights pi_vk (the network's output), global weights w_k (their
mean) and Gaussians N_k. Its labels used to be argmax_k pi_vk: the network's output alone, which its
U-Net and its spatial prior keep smooth, so structures one or two voxels wide (sulcal CSF) go to the
class around them. Here the labels come from the fitted model's posterior together with a Potts
prior that favours agreeing neighbours:

    q_vk  proportional to  w_k^b pi_vk^a N_k(x_v) exp(strength * sum over the neighbours u of v of q_uk),

with (a, b) from the image's noise (options.label_prior_exponents: the global weights on clean
images, the network's on noisy ones), solved by mean-field iterations (Zhang 1992; the Potts/MRF
labelling of FSL FAST and ANTs Atropos). The voxel's own likelihood takes thin structures back where
the image shows them; the network's weights and the neighbours keep the labels smooth where noise is
the problem.

Neighbours are the face neighbours along the image's fine axes (``inputs.fine_axes``, as for
the noise estimate): across thick slices neighbours are different anatomy. Everything is float32 on
the fit's device; the grid is the mask's bounding box.

The Gaussians of a fit stopped early (a cold start and a few steps) may not separate the classes
yet while the network's output already does: when the relabelling would empty a class the network
holds (its label count below ``deep.EMPTY_SHARE`` of the network's), the network's output stays.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import gmm
from .deep import EMPTY_SHARE, bounding_box
from .seeds import fix_responsibilities


def neighbour_sum(grid: torch.Tensor, axes: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """(K, *spatial) -> the sum of each voxel's face neighbours along ``axes`` (spatial axis indices).

    Voxels outside the grid count as zero, so a grid that is zero outside the mask sums mask
    neighbours only. ``out`` (the grid's shape) is overwritten and returned: a buffer reused over
    iterations saves allocating, zeroing and first touching a tensor of the grid's size each time.
    """
    total = torch.empty_like(grid) if out is None else out
    started = False
    for axis in axes:
        dim, n = axis + 1, grid.shape[axis + 1]
        if n < 2:
            continue
        if started:
            total.narrow(dim, 1, n - 1).add_(grid.narrow(dim, 0, n - 1))
        else:  # the first shift is copied, so that nothing needs zeroing but its edge
            total.narrow(dim, 1, n - 1).copy_(grid.narrow(dim, 0, n - 1))
            total.narrow(dim, 0, 1).zero_()
            started = True
        total.narrow(dim, 0, n - 1).add_(grid.narrow(dim, 1, n - 1))
    return total if started else total.zero_()


def potts_mean_field(log_unary: torch.Tensor, mask: torch.Tensor, strength: float, n_iter: int,
                     axes: Sequence[int], fixed_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Log responsibilities (V, K) of the mask voxels under ``log_unary`` (V, K) and a Potts prior.

    ``mask`` (*spatial) bool selects the V voxels (C order, as ``log_unary``'s rows); ``strength``
    is the Potts weight per neighbour (0: the unary's own posterior); ``fixed_labels`` (V,) long,
    -1 where free, keeps seeded voxels in their class.
    """
    log_unary = fix_responsibilities(log_unary.float(), fixed_labels)  # seeds: one-hot, whatever the neighbours
    # (K, V): the class axis outermost, so that the normalisation over K runs along long rows (a
    # log-softmax over rows of K = 3 took a third of the time)
    unary = log_unary.T.contiguous()
    log_q = torch.log_softmax(unary, dim=0)
    if strength > 0 and n_iter > 0 and axes:
        box = bounding_box(mask, margin=0)
        inside = mask[box].reshape(-1).nonzero().squeeze(1)  # the mask voxels' positions in the box, found once
        shape = (unary.shape[0],) + tuple(mask[box].shape)
        grid = torch.zeros(shape, dtype=unary.dtype, device=unary.device)
        sums = torch.empty_like(grid)
        for _ in range(n_iter):
            grid.view(shape[0], -1).index_copy_(1, inside, log_q.exp_())
            field = neighbour_sum(grid, axes, out=sums).view(shape[0], -1).index_select(1, inside)
            log_q = torch.log_softmax(field.mul_(strength).add_(unary), dim=0)
    return log_q.T.contiguous()


def relabel(log_weights: torch.Tensor, global_weights: torch.Tensor, params: gmm.GaussianParameters,
            x: torch.Tensor, mask: torch.Tensor, axes: Sequence[int], strength: float,
            exponents: tuple[float, float], n_iter: int,
            fixed_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, str | None]:
    """(log responsibilities (V, K), note) of a deepsvg fit's final labels.

    ``log_weights`` (V, K): the network's log weights; ``global_weights`` (K,); ``x`` (V, C) the
    voxels. With ``exponents`` (a, b) the prior of voxel v is global_weights^b * exp(a * log_weights[v]).
    Returns ``log_weights`` itself and a note saying why when the relabelling would empty a class.
    """
    network, overall = exponents
    unary = (network * log_weights.float() + overall * global_weights.float().clamp_min(1e-30).log()
             + gmm.log_gaussian(x, params))
    log_q = potts_mean_field(unary, mask, strength, n_iter, axes, fixed_labels)
    n_classes = log_weights.shape[1]
    before = torch.bincount(log_weights.argmax(1), minlength=n_classes)
    after = torch.bincount(log_q.argmax(1), minlength=n_classes)
    if bool((after < EMPTY_SHARE * before).any()):
        return log_weights, ("The labels are the network's output: labelling by the fitted Gaussians (label_mrf) "
                             "would have emptied a class, so the fit's Gaussians do not separate the classes yet "
                             "(a short or cold-started fit).")
    return log_q, None

"""Adam for the per-image deep fits, without ``torch.optim``'s one-off import of ``torch._dynamo``.

Every ``torch.optim`` optimiser imports ``torch._dynamo`` the first time one is built or stepped
(torch wraps their methods to keep the compiler out). Measured on this 2-core machine (torch 2.13, CPU):
the import takes 1.0 s, once per process. A fresh process is what a benchmark case, the CLI and the
Slicer panel's worker start from, and 1.0 s is two thirds of issue 10's 1.5 s budget for a cardiac
ROI. The update below is ``torch.optim.Adam`` with its defaults (no weight decay, no amsgrad): the
same operations in the same order as torch's single-tensor path, which is what torch runs on the
CPU. Testing/Python/core/test_optim.py checks it step for step against ``torch.optim.Adam``.
Cohort training (:mod:`..trained.training`) keeps ``torch.optim.AdamW``: it runs for minutes.
"""

from __future__ import annotations

from typing import Iterable

import torch


class Adam:
    """Adam (Kingma & Ba 2015) over ``params``: ``zero_grad`` / ``step`` as in ``torch.optim.Adam``.

    State (moments and step count) starts at a parameter's first gradient; parameters without a
    gradient are skipped, as torch does.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"Adam's learning rate must be > 0, got {lr!r}.")
        self.params = [p for p in params if p.requires_grad]
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self._moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # first and second, per parameter
        self._steps = [0] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if i not in self._moments:
                self._moments[i] = tuple(torch.zeros_like(p, memory_format=torch.preserve_format) for _ in range(2))
            exp_avg, exp_avg_sq = self._moments[i]
            self._steps[i] += 1
            step = self._steps[i]
            grad = p.grad
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            step_size = self.lr / (1 - self.beta1 ** step)
            denom = (exp_avg_sq.sqrt() / (1 - self.beta2 ** step) ** 0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)


__all__ = ["Adam"]

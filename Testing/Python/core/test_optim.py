"""core.optim.Adam: the same steps as torch.optim.Adam, and a deep fit that never imports torch._dynamo."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from DeepGMMSegmentLib.core.networks import UNet
from DeepGMMSegmentLib.core.optim import Adam

PACKAGE_PARENT = Path(__file__).resolve().parents[3] / "DeepGMMSegment"


def _network_and_batch(seed: int):
    torch.manual_seed(seed)
    network = UNet(3, 2, 3, base_width=4, depth=2)
    x = torch.randn(1, 2, 8, 12, 12)
    return network, x


def _train(network, optimiser, x, steps: int, skip_first_layer_at: int | None = None):
    for step in range(steps):
        optimiser.zero_grad(set_to_none=True)
        loss = network(x).square().mean()
        loss.backward()
        if step == skip_first_layer_at:  # a parameter without a gradient in one step is skipped
            next(network.parameters()).grad = None
        optimiser.step()
    return [p.detach().clone() for p in network.parameters()]


@pytest.mark.parametrize("lr", [1e-2, 3e-2])
def test_adam_matches_torch_adam_step_for_step(lr):
    ours_net, x = _network_and_batch(0)
    torch_net, _ = _network_and_batch(0)
    ours = _train(ours_net, Adam(ours_net.parameters(), lr=lr), x, 12, skip_first_layer_at=3)
    reference = _train(torch_net, torch.optim.Adam(torch_net.parameters(), lr=lr), x, 12, skip_first_layer_at=3)
    start = [p.detach() for p in _network_and_batch(0)[0].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(ours, start))  # the weights moved
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_grad_clears_or_zeroes():
    network, x = _network_and_batch(1)
    optimiser = Adam(network.parameters(), lr=1e-2)
    network(x).sum().backward()
    optimiser.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in network.parameters())
    optimiser.zero_grad()
    assert all(p.grad is None for p in network.parameters())


def test_learning_rate_must_be_positive():
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.0)


def test_a_deep_fit_does_not_import_dynamo():
    """The import costs about 1 s per process (core/optim.py); a fresh process must not pay it."""
    code = (
        "import sys, numpy as np\n"
        "from DeepGMMSegmentLib.engine import segment\n"
        "rng = np.random.default_rng(0)\n"
        "image = np.where(np.arange(12)[:, None, None] < 6, 0.0, 4.0) + rng.normal(0, 1, (12, 16, 16))\n"
        "r = segment([image.astype(np.float32)], 2, method='deepsvg', max_iter=3, min_iter=1, seed=0)\n"
        "assert r.n_iter > 0\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE_PARENT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"

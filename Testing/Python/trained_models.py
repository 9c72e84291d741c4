"""Real trained-model files for the panel, logic and widget tests (gui/ and slicer/ conftests).

``trainedModelFile`` trains tiny models with the project's own training code (about a second
each), so those tests exercise real model files, not mocks. The conftests load this file by
path with :func:`load` (``Testing/Python`` itself must not be on ``sys.path``: the folder
``Testing/Python/slicer`` would then join the ``slicer`` package of the slicer-core wheel).
Models are trained once per session and argument set, whichever folder asks first.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_MODELS: dict = {}


def load():
    """This module, loaded once from its file (shared by the conftests that use it)."""
    name = "deepgmmsegment_test_trained_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def phantomCase(seed: int, shape=(4, 16, 18), numberOfChannels: int = 2) -> np.ndarray:
    """(C, z, y, x) float32: three blocky tissues along x, like the Slicer tests' phantom, with noise."""
    random = np.random.default_rng(seed)
    labels = np.clip(np.arange(shape[2]) * 3 // shape[2], 0, 2)[None, None, :] * np.ones(shape, int)
    labels[:, : shape[1] // 3][labels[:, : shape[1] // 3] == 0] = 1
    means = np.array([[100.0, 200.0], [200.0, 50.0], [300.0, 120.0]])[:, :numberOfChannels]
    image = means[labels].transpose(3, 0, 1, 2) + random.normal(0, 8, (numberOfChannels,) + tuple(shape))
    return image.astype(np.float32)


@pytest.fixture(scope="session")
def trainedModelFile(tmp_path_factory):
    """``make(channelNames=("T1", "T2"), spatialDims=3, method="deepsvg", accurate=False, classNames=None)``
    -> path of a real model file (``classNames``: stored in the model).

    Trained once per argument set and session on four phantom cases: a tiny U-Net for 3 optimiser
    steps (a real file, not a useful segmenter), or with ``accurate`` 80 steps of a wider one,
    which segments a new phantom case without error (for tests of what the model outputs).
    """
    models = _MODELS

    def make(channelNames=("T1", "T2"), spatialDims=3, method="deepsvg", accurate=False, classNames=None):
        key = (tuple(channelNames), spatialDims, method, accurate, None if classNames is None else tuple(classNames))
        if key not in models:
            import torch

            from DeepGMMSegmentLib.trained.training import train

            cases = [phantomCase(seed, numberOfChannels=len(channelNames)) for seed in range(4)]
            if spatialDims == 2:
                cases = [case[:, 0] for case in cases]
            path = tmp_path_factory.mktemp("trained") / f"{'-'.join(channelNames)}_{spatialDims}d_{method}.pt"
            steps = (dict(base_width=8, max_epochs=20, min_epochs=20, patience=20, warm_start_steps=40, batch_size=1,
                          learning_rate=0.02) if accurate else
                     dict(base_width=4, max_epochs=3, min_epochs=0, patience=3, warm_start_steps=8, batch_size=4))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny tensors; the 2 cores are shared
            try:
                train(cases, 3, method=method, spatial_dims=spatialDims, channel_names=list(channelNames),
                      output=path, prior_means="auto", class_names=classNames, depth=1, device="cpu", seed=0,
                      **steps)
            finally:
                torch.set_num_threads(threads)
            models[key] = path
        return models[key]

    return make

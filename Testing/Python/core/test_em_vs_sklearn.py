"""Our torch EM reaches the same log-likelihood as scikit-learn's GaussianMixture from the same start."""

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from DeepGMMSegmentLib.core import em, gmm


def _data(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [2.5, 1.0], [0.5, 3.0]])
    covs = [np.array([[0.5, 0.2], [0.2, 0.3]]), np.array([[0.2, -0.1], [-0.1, 0.6]]), np.eye(2) * 0.4]
    parts = [rng.multivariate_normal(c, s, n // 3) for c, s in zip(centres, covs)]
    return np.concatenate(parts).astype(np.float64)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("quantised", [False, True])
def test_same_start_same_log_likelihood(covariance_type, quantised):
    x = _data()
    if quantised:
        # few distinct tuples (like 8-bit MR): exercises the unique-tuple EM path
        x = np.round(x * 8) / 8
        x = np.tile(x, (4, 1))
    rng = np.random.default_rng(1)
    means0 = x[rng.choice(len(x), 3, replace=False)]
    weights0 = np.array([0.2, 0.5, 0.3])
    if covariance_type == "full":
        covs0 = np.stack([np.cov(x.T) for _ in range(3)])
        precisions0 = np.linalg.inv(covs0)
    else:
        covs0 = np.stack([x.var(0) for _ in range(3)])
        precisions0 = 1 / covs0
    reg = 1e-6
    n_steps = 25
    sk = GaussianMixture(3, covariance_type=covariance_type, weights_init=weights0, means_init=means0,
                         precisions_init=precisions0, max_iter=n_steps, tol=0.0, reg_covar=reg)
    with pytest.warns(Warning):  # sklearn warns that it did not converge within max_iter (tol=0)
        sk.fit(x)
    sk_nll = -sk.score(x)

    xt = torch.as_tensor(x, dtype=torch.float32)
    init = (torch.log(torch.as_tensor(weights0, dtype=torch.float32)),
            gmm.make_parameters(torch.as_tensor(means0, dtype=torch.float32),
                                torch.as_tensor(covs0, dtype=torch.float32), covariance_type))
    fit = em.fit_gmm(xt, 3, covariance_type=covariance_type, max_iter=n_steps, tol=0.0, reg_covar=reg,
                     generator=torch.Generator().manual_seed(0), init=init, compress=quantised)
    assert fit.n_iter == n_steps
    ours = fit.nll_history[-1]
    assert abs(ours - sk_nll) / abs(sk_nll) < 1e-4, (ours, sk_nll)
    np.testing.assert_allclose(np.sort(fit.params.means.numpy()[:, 0]), np.sort(sk.means_[:, 0]), atol=1e-3)


def test_unique_tuple_path_matches_voxelwise_path():
    x = np.round(_data(3000) * 4) / 4
    x = np.tile(x, (10, 1))  # 30000 voxels, few distinct tuples
    xt = torch.as_tensor(x, dtype=torch.float32)
    init = em.initial_parameters(xt, 3, "full", 1e-4, torch.Generator().manual_seed(3))
    kwargs = dict(covariance_type="full", max_iter=30, tol=0.0, reg_covar=1e-4, init=init)
    a = em.fit_gmm(xt, 3, generator=torch.Generator().manual_seed(3), compress=True, **kwargs)
    b = em.fit_gmm(xt, 3, generator=torch.Generator().manual_seed(3), compress=False, **kwargs)
    assert em._compress(xt) is not None  # the fast path really ran
    assert abs(a.nll_history[-1] - b.nll_history[-1]) < 1e-4
    np.testing.assert_allclose(a.log_resp.exp().numpy(), b.log_resp.exp().numpy(), atol=1e-3)


def test_single_channel_unique_path_matches_voxelwise_path():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(m, 0.3, 10000) for m in (0.0, 1.5, 3.0)])
    xt = torch.as_tensor(np.round(x * 16) / 16, dtype=torch.float32)[:, None]
    uniq, inverse, counts = em._compress(xt)
    torch.testing.assert_close(uniq[inverse], xt)  # the compressed rows rebuild the data
    assert counts.sum() == len(xt)
    init = em.initial_parameters(xt, 3, "full", 1e-4, torch.Generator().manual_seed(1))
    kwargs = dict(covariance_type="full", max_iter=20, tol=0.0, reg_covar=1e-4, init=init,
                  generator=torch.Generator().manual_seed(1))
    a = em.fit_gmm(xt, 3, compress=True, **kwargs)
    b = em.fit_gmm(xt, 3, compress=False, **kwargs)
    assert abs(a.nll_history[-1] - b.nll_history[-1]) < 1e-4

"""Our torch EM reaches the same log-likelihood as scikit-learn's GaussianMixture from the same start."""

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from DeepGMMSegmentLib.core import em, gmm
from DeepGMMSegmentLib.options import EMSettings


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


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_fused_sweep_matches_the_reference_m_step(covariance_type, monkeypatch):
    """e_step + m_step (whitened sums, small blocks) give gmm.weighted_mstep's parameters from the same posterior."""
    x = torch.as_tensor(_data(3000), dtype=torch.float32)
    counts = torch.as_tensor(np.random.default_rng(2).integers(1, 4, len(x)), dtype=torch.float32)
    log_w, params = em.initial_parameters(x, 3, covariance_type, 1e-4, torch.Generator().manual_seed(4))
    monkeypatch.setattr(em, "BLOCK_ELEMENTS", 2100)  # several blocks, the last one partial
    monkeypatch.setattr(em, "MIN_BLOCK_VOXELS", 1)
    log_resp = torch.empty(len(x), 3)
    stats = em.e_step(x.T.contiguous(), log_w, params, counts, log_resp_out=log_resp)
    mass, fused = em.m_step(stats, params, 1e-4, gmm.channel_variances(x, counts))
    reference_log_resp, ll = gmm.posterior(log_w, gmm.log_gaussian(x, params))
    nk, reference = gmm.weighted_mstep(x, reference_log_resp.exp(), covariance_type, 1e-4, counts)
    torch.testing.assert_close(log_resp, reference_log_resp.float(), atol=1e-4, rtol=1e-5)
    assert abs(float(stats.mean_nll) + float(gmm.weighted_mean(ll, counts))) < 1e-5
    torch.testing.assert_close(mass, nk, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(fused.means, reference.means, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.covariances, reference.covariances, rtol=0, atol=1e-5)


def test_starts_side_by_side_equal_starts_one_by_one():
    x = torch.as_tensor(_data(2400), dtype=torch.float32)
    centres = em.kmeans_starts(x, 3, torch.tensor([True, False, True]), torch.Generator().manual_seed(5))
    log_w, params = em.hard_assignment_parameters(x, centres, "full", 1e-4)
    settings = EMSettings(max_iter=60, tol=1e-6)
    nll, race_log_w, race_params = em.race_starts(x, log_w, params, settings, None, None)
    for s in range(3):
        _, alone, alone_log_w, history, _, _ = em._iterate(x, log_w[s], params.select(s), settings, None, None)
        assert abs(float(nll[s]) - history[-1]) < 1e-6
        torch.testing.assert_close(race_params.means[s], alone.means, rtol=0, atol=1e-6)
        torch.testing.assert_close(race_log_w[s], alone_log_w, rtol=0, atol=1e-6)


def test_identical_channels_reach_scikit_learns_likelihood():
    """reg_covar counts towards the eigenvalue floor: no extra variance in the degenerate direction."""
    rng = np.random.default_rng(3)
    a = np.concatenate([rng.normal(m, 0.4, 2000) for m in (-1.5, 0.0, 1.5)])
    x = np.stack([a, a], 1)
    x = (x - x.mean(0)) / x.std(0)
    sk = GaussianMixture(3, covariance_type="full", reg_covar=1e-4, tol=1e-8, max_iter=500, random_state=0).fit(x)
    fit = em.fit_gmm(torch.as_tensor(x, dtype=torch.float32), 3, generator=torch.Generator().manual_seed(0),
                     n_init=4, tol=1e-8, max_iter=500)
    assert fit.nll_history[-1] <= -sk.score(x) + 1e-4, (fit.nll_history[-1], -sk.score(x))

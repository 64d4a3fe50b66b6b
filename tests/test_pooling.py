"""Rubin's rules against hand-computed values (three fake fits) and exact identities."""

import math

import numpy as np
import pytest

from torchmix import pooling as pl

# Three fake fits, two coefficients.
#   beta_1: 10, 12, 14  (mean 12, squared deviations 4 + 0 + 4 = 8), SEs 1, 2, 3
#   beta_2:  1,  1,  4  (mean 2,  squared deviations 1 + 1 + 4 = 6), SEs 0.5 each
EST = np.array([[10.0, 1.0], [12.0, 1.0], [14.0, 4.0]])
SE = np.array([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5]])
# Covariances with the SEs above on the diagonal and known off-diagonals 0.1, 0.2, 0.6.
COV = np.array([[[1.0, 0.1], [0.1, 0.25]],
                [[4.0, 0.2], [0.2, 0.25]],
                [[9.0, 0.6], [0.6, 0.25]]])
TOL = 1e-12


def test_scalar_rule_by_hand():
    res = pl.rubin_scalar(EST, SE)
    # V_imp = (K+1)/((K-1)K) * sum dev^2 = 4/6 * (8, 6) = (16/3, 4)
    # V_samp = mean SE^2 = ((1+4+9)/3, 0.25) = (14/3, 1/4)
    np.testing.assert_allclose(res.estimate, [12.0, 2.0], rtol=0, atol=TOL)
    np.testing.assert_allclose(res.var_imputation, [16 / 3, 4.0], rtol=0, atol=TOL)
    np.testing.assert_allclose(res.var_sampling, [14 / 3, 0.25], rtol=0, atol=TOL)
    np.testing.assert_allclose(res.var_total, [10.0, 4.25], rtol=0, atol=TOL)
    np.testing.assert_allclose(res.se, [math.sqrt(10.0), math.sqrt(4.25)], rtol=0, atol=TOL)
    assert res.n_pv == 3


def test_matrix_rule_by_hand():
    res = pl.rubin_matrix(EST, COV)
    # deviations (-2,-1), (0,-1), (2,2): B = 1/2 [[8, 6], [6, 6]] = [[4, 3], [3, 3]]
    np.testing.assert_allclose(res.between, [[4.0, 3.0], [3.0, 3.0]], rtol=0, atol=TOL)
    np.testing.assert_allclose(res.within, [[14 / 3, 0.3], [0.3, 0.25]], rtol=0, atol=TOL)
    # T = Ubar + 4/3 B
    np.testing.assert_allclose(res.total, [[14 / 3 + 16 / 3, 0.3 + 4.0], [0.3 + 4.0, 0.25 + 4.0]],
                               rtol=0, atol=TOL)
    # diagonal of T equals the scalar rule
    np.testing.assert_allclose(np.diag(res.total), pl.rubin_scalar(EST, SE).var_total, rtol=0, atol=TOL)


def test_relative_increase_and_fmi_by_hand():
    u = np.array([14 / 3, 0.25])
    b = np.array([4.0, 3.0])
    r = pl.relative_increase_in_variance(u, b, 3)
    # r = (4/3) B / U = (16/3)/(14/3) = 8/7 and 4/0.25 = 16
    np.testing.assert_allclose(r, [8 / 7, 16.0], rtol=0, atol=TOL)
    # df = inf: fmi = r/(r+1) = lambda = (8/15, 16/17)
    np.testing.assert_allclose(pl.fraction_missing_information(u, b, 3), [8 / 15, 16 / 17], rtol=0, atol=TOL)
    # finite df: (r + 2/(nu+3)) / (r + 1) with nu = 7 and 2
    np.testing.assert_allclose(pl.fraction_missing_information(u, b, 3, df=np.array([7.0, 2.0])),
                               [(8 / 7 + 0.2) / (15 / 7), (16 + 0.4) / 17], rtol=0, atol=TOL)


def test_barnard_rubin_df_by_hand():
    u = np.array([14 / 3, 0.25])
    b = np.array([4.0, 3.0])
    # lambda = (8/15, 16/17); nu_old = (K-1)/lambda^2
    nu_old = np.array([2 * 225 / 64, 2 * 289 / 256])
    np.testing.assert_allclose(pl.barnard_rubin_df(u, b, 3), nu_old, rtol=0, atol=TOL)
    # complete-data df 20: nu_obs = (21/23) * 20 * (1 - lambda)
    nu_obs = 21 / 23 * 20 * np.array([7 / 15, 1 / 17])
    expected = nu_old * nu_obs / (nu_old + nu_obs)
    np.testing.assert_allclose(pl.barnard_rubin_df(u, b, 3, df_complete=20), expected, rtol=0, atol=TOL)
    # the adjusted df never exceeds the complete-data df nor Rubin's df
    assert np.all(expected < 20) and np.all(expected < nu_old)


def test_v14_identical_values_give_zero_imputation_variance():
    one = np.array([3.5, -1.25, 0.75])
    se = np.array([0.3, 0.2, 0.1])
    k = 5
    res = pl.rubin_scalar(np.tile(one, (k, 1)), np.tile(se, (k, 1)))
    assert np.all(res.var_imputation == 0.0)
    np.testing.assert_allclose(res.estimate, one, rtol=0, atol=TOL)
    np.testing.assert_allclose(res.se, se, rtol=0, atol=TOL)
    cov = np.diag(se ** 2)
    mat = pl.rubin_matrix(np.tile(one, (k, 1)), np.tile(cov, (k, 1, 1)))
    assert np.all(mat.between == 0.0)
    np.testing.assert_allclose(mat.total, cov, rtol=0, atol=TOL)
    # no imputation variance: df are the complete-data df (Rubin: infinite), fmi is 0
    assert np.all(np.isinf(pl.barnard_rubin_df(np.diag(cov), np.zeros(3), k)))
    nu_c = 176.0
    np.testing.assert_allclose(pl.barnard_rubin_df(np.diag(cov), np.zeros(3), k, nu_c),
                               (nu_c + 1) / (nu_c + 3) * nu_c, rtol=0, atol=1e-9)
    assert np.all(pl.fraction_missing_information(np.diag(cov), np.zeros(3), k) == 0.0)


def test_single_value_reduces_to_the_fit():
    res = pl.rubin_scalar(EST[:1], SE[:1])
    np.testing.assert_array_equal(res.estimate, EST[0])
    np.testing.assert_array_equal(res.se, SE[0])
    np.testing.assert_array_equal(res.var_imputation, 0.0)
    mat = pl.rubin_matrix(EST[:1], COV[:1])
    np.testing.assert_array_equal(mat.total, COV[0])
    assert np.all(np.isinf(pl.barnard_rubin_df(np.diag(COV[0]), np.zeros(2), 1)))


def test_correlations_pool_through_fisher_z():
    rho = np.array([0.1, 0.5, 0.9])
    expected = math.tanh((math.atanh(0.1) + math.atanh(0.5) + math.atanh(0.9)) / 3)
    assert abs(float(pl.pool_correlations(rho)) - expected) < TOL
    # not the plain mean
    assert abs(float(pl.pool_correlations(rho)) - 0.5) > 1e-3
    # identical correlations come back unchanged; perfect correlations stay perfect
    np.testing.assert_allclose(pl.pool_correlations(np.full((4, 2), -0.37)), [-0.37, -0.37], rtol=0, atol=TOL)
    assert float(pl.pool_correlations(np.array([1.0, 0.2]))) == 1.0
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        pl.pool_correlations(np.array([0.2, 1.5]))


def test_icc_is_the_mean_of_per_value_iccs():
    # two values with different variances: the mean ICC differs from the ICC of the mean variances
    tau = np.array([600.0, 720.0])
    sigma2 = np.array([900.0, 850.0])
    iccs = tau / (tau + sigma2)
    pooled = pl.pool_icc(iccs)
    assert abs(pooled - (0.4 + 720 / 1570) / 2) < TOL
    assert abs(pooled - tau.mean() / (tau.mean() + sigma2.mean())) > 1e-4
    assert math.isnan(pl.pool_icc(np.array([0.3, np.nan])))


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        pl.rubin_scalar(EST, SE[:, :1])
    with pytest.raises(ValueError, match="covariances must have shape"):
        pl.rubin_matrix(EST, COV[:, :1, :1])
    with pytest.raises(ValueError, match="df_complete"):
        pl.barnard_rubin_df([1.0], [1.0], 3, df_complete=0)

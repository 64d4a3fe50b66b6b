"""Families and links: a contract every registered link and family must pass, and response checks.

A new link is covered by these tests as soon as it is registered (defining a ``Link`` subclass
with a ``name`` registers it); the cauchit link of ``glmm_support`` is such a user-defined link.
"""

import math
import warnings

import numpy as np
import pytest
import torch

import glmm_support  # noqa: F401  (registers the user-defined cauchit link)
from glmm_support import one_thread  # noqa: F401
from torchmix.errors import ConfigError, DataError, DataWarning
from torchmix.families import (Binomial, Family, Gaussian, Link, LogitLink, Poisson, get_family, get_link,
                               list_families, list_links, register_link)

F64 = torch.float64
WIDE = torch.linspace(-30, 30, 1201, dtype=F64)
MID = torch.linspace(-5, 5, 201, dtype=F64)
CENTRAL = torch.linspace(-3, 3, 121, dtype=F64)


def _positive(link: Link) -> bool:
    """Links whose mean is positive everywhere (log-scale methods are meaningful)."""
    return bool((link.inverse(WIDE) > 0).all()) or type(link).__name__ in ("CloglogLink",)


def _probability(link: Link) -> bool:
    mu = link.inverse(WIDE)
    return bool(((mu >= 0) & (mu <= 1)).all()) and 0 < float(link.inverse(torch.zeros(1, dtype=F64))) < 1


def _fd(fn, eta, h=1e-6):
    return (fn(eta + h) - fn(eta - h)) / (2 * h)


@pytest.mark.parametrize("name", list_links())
def test_link_contract(name):
    link = get_link(name)
    assert link.name == name
    mu = link.inverse(WIDE)
    # monotone, strictly on a central range
    assert bool(torch.isfinite(mu).all())
    assert bool((mu[1:] >= mu[:-1]).all())
    mid = link.inverse(CENTRAL)
    assert bool((mid[1:] > mid[:-1]).all())
    # finite at |eta| = 30
    edge = torch.tensor([-30.0, 30.0], dtype=F64)
    assert bool(torch.isfinite(link.mu_eta(edge)).all())
    # round trip where the inverse is not saturated
    if link.has_link:
        grid = torch.linspace(-3, 3, 61, dtype=F64)
        torch.testing.assert_close(link.link(link.inverse(grid)), grid, rtol=0, atol=1e-6)
    # autograd derivatives equal finite differences; closed forms equal the autograd defaults
    torch.testing.assert_close(link.mu_eta(MID), _fd(link.inverse, MID), rtol=1e-7, atol=1e-9)
    inner = CENTRAL[CENTRAL.abs() <= 2]  # where the autograd defaults are themselves accurate
    torch.testing.assert_close(link.mu_eta(inner), Link.mu_eta(link, inner), rtol=1e-9, atol=1e-300)
    if _positive(link):
        for fn in (link.log_inverse, link.dlog_inverse, link.d2log_inverse):
            assert bool(torch.isfinite(fn(edge)).all()), fn
        torch.testing.assert_close(link.dlog_inverse(MID), _fd(link.log_inverse, MID), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(link.d2log_inverse(MID), _fd(link.dlog_inverse, MID), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(link.dlog_inverse(MID), Link.dlog_inverse(link, MID), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(link.d2log_inverse(MID), Link.d2log_inverse(link, MID), rtol=1e-7, atol=1e-10)
    if _probability(link):
        for fn in (link.log1m_inverse, link.dlog1m_inverse, link.d2log1m_inverse):
            assert bool(torch.isfinite(fn(edge)).all()), fn
        torch.testing.assert_close(link.dlog1m_inverse(MID), -_fd(link.log1m_inverse, MID), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(link.dlog1m_inverse(MID), Link.dlog1m_inverse(link, MID), rtol=1e-8,
                                   atol=1e-12)
        torch.testing.assert_close(link.d2log1m_inverse(MID), Link.d2log1m_inverse(link, MID), rtol=1e-7,
                                   atol=1e-10)


def _family_cases():
    cases = [("gaussian", "identity"), ("poisson", "log")]
    cases += [("binomial", name) for name in list_links() if _probability(get_link(name))]
    assert {c[0] for c in cases} == set(list_families())
    return cases


@pytest.mark.parametrize("fam_name,link_name", _family_cases())
def test_family_contract(fam_name, link_name):
    fam = get_family(fam_name, link_name)
    eta = torch.linspace(-8, 8, 161, dtype=F64)
    if fam_name == "binomial":
        ys = [0.0, 1.0]
    elif fam_name == "poisson":
        ys, eta = [0.0, 1.0, 4.0], torch.linspace(-4, 3, 71, dtype=F64)
    else:
        ys = [-1.3, 0.0, 2.5]
    kappa = 2.0 if fam.has_dispersion else None
    for yv in ys:
        y = torch.full_like(eta, yv)
        lf = fam.logf(y, eta, kappa)
        assert bool(torch.isfinite(lf).all())
        d1, w, curv = fam.derivs(y, eta, kappa)
        torch.testing.assert_close(d1, fam.d1(y, eta, kappa))
        torch.testing.assert_close(w, fam.fisher_w(eta, kappa))
        torch.testing.assert_close(curv, -fam.d2(y, eta, kappa))
        torch.testing.assert_close(fam.d1(y, eta, kappa), _fd(lambda e: fam.logf(y, e, kappa), eta), rtol=1e-6,
                                   atol=1e-8)
        torch.testing.assert_close(fam.d1(y, eta, kappa), Family.d1(fam, y, eta, kappa), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fam.d2(y, eta, kappa), Family.d2(fam, y, eta, kappa), rtol=1e-7, atol=1e-10)
    mu = fam.linkinv(eta)
    mid = eta.abs() <= 2  # the textbook formula loses precision in the tails
    w_def = fam.mu_eta(eta[mid]) ** 2 / fam.variance(mu[mid]) / (kappa or 1.0)
    torch.testing.assert_close(fam.fisher_w(eta[mid], kappa), w_def, rtol=1e-9, atol=0)
    # exact identities: the density sums to one, the score has mean 0, E[-d2] = fisher_w
    if fam_name == "binomial":
        one, zero = torch.ones_like(eta), torch.zeros_like(eta)
        mu, mu1m = fam.link.log_inverse(eta).exp(), fam.link.log1m_inverse(eta).exp()
        total = fam.logf(one, eta).exp() + fam.logf(zero, eta).exp()
        torch.testing.assert_close(total, torch.ones_like(eta), rtol=1e-12, atol=0)
        torch.testing.assert_close(mu * fam.d1(one, eta) + mu1m * fam.d1(zero, eta), zero, rtol=0, atol=1e-12)
        expected_info = -(mu * fam.d2(one, eta) + mu1m * fam.d2(zero, eta))
        torch.testing.assert_close(expected_info, fam.fisher_w(eta), rtol=1e-9, atol=1e-15)
    elif fam_name == "poisson":
        yy = torch.arange(0, 400, dtype=F64)[:, None]
        total = fam.logf(yy, eta[None, :]).exp().sum(0)
        torch.testing.assert_close(total, torch.ones_like(eta), rtol=1e-12, atol=0)
    else:
        yy = torch.linspace(-40, 40, 40001, dtype=F64)[:, None]
        dens = fam.logf(yy, eta[None, ::20], kappa).exp()
        torch.testing.assert_close(torch.trapezoid(dens, yy[:, 0], dim=0), torch.ones_like(eta[::20]), rtol=1e-9,
                                   atol=0)


@pytest.mark.parametrize("name", [n for n in list_links() if _probability(get_link(n))])
def test_binomial_pieces_finite_at_extremes(name):
    fam = get_family("binomial", name)
    eta = torch.tensor([-30.0, -10.0, 10.0, 30.0], dtype=F64)
    for yv in (0.0, 1.0):
        y = torch.full_like(eta, yv)
        for part in fam.derivs(y, eta) + (fam.logf(y, eta),):
            assert bool(torch.isfinite(part).all())
    assert bool((fam.fisher_w(eta) >= 0).all())


def test_stable_closed_forms_at_the_tails():
    logit = get_family("binomial")
    assert float(logit.logf(torch.tensor(1.0, dtype=F64), torch.tensor(-30.0, dtype=F64))) == pytest.approx(
        -30.0 - math.log1p(math.exp(-30.0)), rel=1e-15)
    probit = get_family("binomial", "probit")
    # log Phi(-30) = -454.3212...; the naive log(ndtr(-30)) would be finite too, log(1 - ndtr(30)) not
    assert float(probit.logf(torch.tensor(0.0, dtype=F64), torch.tensor(30.0, dtype=F64))) == pytest.approx(
        -454.3212439955, rel=1e-10)
    cloglog = get_family("binomial", "cloglog")
    assert float(cloglog.logf(torch.tensor(1.0, dtype=F64), torch.tensor(-30.0, dtype=F64))) == pytest.approx(
        -30.0 - 0.5 * math.exp(-30.0), rel=1e-15)
    pois = get_family("poisson")
    assert math.isfinite(float(pois.logf(torch.tensor(3.0, dtype=F64), torch.tensor(800.0, dtype=F64))))


def test_registry_resolves_names_instances_and_classes():
    assert isinstance(get_family("Binomial"), Binomial)
    assert isinstance(get_family(" POISSON "), Poisson)
    fam = get_family("binomial", "probit")
    assert fam.link.name == "probit" and get_family(fam) is fam and get_family(fam, "probit") is fam
    assert isinstance(get_family(Gaussian), Gaussian)
    assert get_family("binomial").link == LogitLink()
    assert get_family("gaussian").is_gaussian_identity
    assert not get_family("gaussian", "log").is_gaussian_identity
    assert not get_family("binomial").is_gaussian_identity
    assert get_family("binomial", glmm_support.CauchitLink()).link.name == "cauchit"
    assert get_family("binomial", "Cauchit").link.name == "cauchit"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown family 'Gamma'.*binomial.*gaussian.*poisson"):
        get_family("Gamma")
    with pytest.raises(ConfigError, match=r"unknown link 'inverse'.*cloglog.*identity.*log.*logit.*probit"):
        get_family("binomial", "inverse")
    with pytest.raises(ConfigError, match="already has link"):
        get_family(get_family("binomial"), "probit")
    with pytest.raises(ConfigError):
        get_family(3)


def test_register_link_decorator():
    @register_link(name="loglog_test")
    class LogLog(Link):
        def inverse(self, eta):
            return torch.exp(-torch.exp(-eta))

    try:
        link = get_link("loglog_test")
        assert isinstance(link, LogLog) and not link.has_link
        eta = torch.linspace(-2, 2, 9, dtype=F64)
        torch.testing.assert_close(link.mu_eta(eta), torch.exp(-eta - torch.exp(-eta)))
    finally:
        from torchmix import links

        links._LINKS.pop("loglog_test")


def test_binomial_validate_recoding_and_errors():
    fam = get_family("binomial")
    out = fam.validate(np.array([0, 1, 1, 0]))
    assert out.dtype == np.float64 and out.tolist() == [0, 1, 1, 0]
    assert fam.validate(np.array([True, False])).tolist() == [1.0, 0.0]
    assert fam.validate(np.array([1.0, 1.0])).tolist() == [1.0, 1.0]
    with pytest.warns(DataWarning, match="recoded"):
        assert fam.validate(np.array([1, 2, 2, 1])).tolist() == [0, 1, 1, 0]
    with pytest.warns(DataWarning, match="recoded"):
        assert fam.validate(np.array(["Y", "N", "Y"], dtype=object)).tolist() == [1, 0, 1]
    with pytest.raises(DataError, match=r"found 2 other value\(s\): 2\.0, 5\.0"):
        fam.validate(np.array([0, 1, 2, 5, 1]))
    with pytest.raises(DataError, match=r"\(7 distinct\)"):
        fam.validate(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8]))
    with pytest.raises(DataError, match="non-finite"):
        fam.validate(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(DataError, match="3.0"):
        fam.validate(np.array([3.0, 3.0]))
    with pytest.raises(DataError, match="exactly two"):
        fam.validate(np.array(["a", "b", "c"], dtype=object))


def test_poisson_and_gaussian_validate():
    pois = get_family("poisson")
    assert pois.validate(np.array([0, 3, 7])).tolist() == [0, 3, 7]
    with pytest.raises(DataError, match=r"negative value\(s\): -2\.0, -1\.0"):
        pois.validate(np.array([1, -1, -2, 4]))
    with pytest.warns(DataWarning, match="non-integer"):
        pois.validate(np.array([0.5, 2.0]))
    with pytest.raises(DataError, match="numeric"):
        pois.validate(np.array(["a", "b"], dtype=object))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_family("gaussian").validate(np.array([1.5, -2.0])).tolist() == [1.5, -2.0]
    with pytest.raises(DataError):
        get_family("gaussian").validate(np.array([1.0, np.inf]))

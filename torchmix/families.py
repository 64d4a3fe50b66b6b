r"""Response families (MATH.md 1.4) with a name registry; links live in :mod:`torchmix.links`.

A **family** provides, elementwise and vectorised over tensors of any shape,

==========================  =====================================================================
``logf(y, eta, kappa)``     :math:`\log f(y\mid\eta,\kappa)` including all constants
``linkinv(eta)``            :math:`\mu = h(\eta)`
``mu_eta(eta)``             :math:`h'(\eta)`
``variance(mu)``            :math:`V(\mu)`
``fisher_w(eta, kappa)``    :math:`h'(\eta)^2/(\kappa V(\mu))` (curvature used for adaptation)
``d1(y, eta, kappa)``       :math:`\partial_\eta\log f`
``d2(y, eta, kappa)``       :math:`\partial^2_\eta\log f` (observed)
``validate(y)``             domain check / recoding of the response (numpy in, float64 numpy out)
==========================  =====================================================================

The binomial family is Bernoulli. Its pieces are written through the link's
:math:`a(\eta)=\partial_\eta\log\mu` and :math:`b(\eta)=-\partial_\eta\log(1-\mu)`:
:math:`\partial_\eta\log f = y\,a - (1-y)\,b`, :math:`W = a\,b`,
:math:`\partial^2_\eta\log f = y\,a' - (1-y)\,b'`, which stay finite at :math:`|\eta| = 30`
for every built-in link. Link classes and ``get_link`` are re-exported here. Pure tensor math
(the response check uses numpy only).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from .errors import ConfigError, DataError, DataWarning
from .links import (_ETA_CLAMP, register_in, CloglogLink, IdentityLink, Link, LogitLink, LogLink, ProbitLink,
                    _elementwise_derivative, get_link, list_links, register_link)
from .warn import warn

__all__ = [
    "Link",
    "Family",
    "IdentityLink",
    "LogitLink",
    "ProbitLink",
    "CloglogLink",
    "LogLink",
    "Gaussian",
    "Binomial",
    "Poisson",
    "register_link",
    "register_family",
    "get_link",
    "get_family",
    "list_links",
    "list_families",
]

_FAMILIES: dict[str, type] = {}


# ---------------------------------------------------------------------------------------------
# families
# ---------------------------------------------------------------------------------------------

def register_family(cls=None, *, name: Optional[str] = None):
    """Register a :class:`Family` subclass under ``name`` (default ``cls.name``); usable as a decorator."""
    return register_in(_FAMILIES, "family", cls, name)


class Family:
    r"""Base class of response families.

    A subclass sets ``name`` and ``canonical_link`` and implements :meth:`logf`,
    :meth:`variance` and :meth:`validate`; :meth:`d1`, :meth:`d2` default to autograd of
    :meth:`logf` and :meth:`fisher_w` to :math:`h'^2/(\kappa V(h(\eta)))`.
    ``kappa`` is the dispersion (:math:`\sigma^2` for the gaussian family; ignored by the others).
    """

    name: str = ""
    canonical_link: str = "identity"
    has_dispersion: bool = False
    _log_concave_links: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register_family(cls)

    def __init__(self, link: Union[str, Link, None] = None):
        self.link = get_link(link, default=self.canonical_link)

    # -- the table of MATH.md 1.4 -----------------------------------------------------------------
    def logf(self, y, eta, kappa=None):
        raise NotImplementedError(f"family {self.name!r} must implement logf (abstract method)")

    def linkinv(self, eta):
        return self.link.inverse(eta)

    def mu_eta(self, eta):
        return self.link.mu_eta(eta)

    def variance(self, mu):
        raise NotImplementedError(f"family {self.name!r} must implement variance (abstract method)")

    def fisher_w(self, eta, kappa=None):
        mu = self.linkinv(eta)
        w = self.mu_eta(eta) ** 2 / self.variance(mu)
        return w if kappa is None else w / kappa

    def d1(self, y, eta, kappa=None):
        return _elementwise_derivative(lambda e: self.logf(y, e, kappa), eta)

    def d2(self, y, eta, kappa=None):
        return _elementwise_derivative(lambda e: self.logf(y, e, kappa), eta, order=2)

    def dfisher_w(self, eta, kappa=None):
        r""":math:`\partial_\eta` of :meth:`fisher_w` (autograd by default)."""
        return _elementwise_derivative(lambda e: self.fisher_w(e, kappa), eta)

    def derivs(self, y, eta, kappa=None):
        r"""``(d1, fisher_w, -d2)`` at once (families override this to share work)."""
        return self.d1(y, eta, kappa), self.fisher_w(eta, kappa), -self.d2(y, eta, kappa)

    def validate(self, y) -> np.ndarray:
        return _finite_numeric(y, self.name)

    def starting_mu(self, y: torch.Tensor) -> torch.Tensor:
        """A mean inside the link's domain used to start the fixed-effects fit."""
        return y

    def unit_deviance(self, y, mu):
        r"""Unit deviance :math:`d_i` (deviance residuals are :math:`\operatorname{sign}(y-\mu)\sqrt{d_i}`)."""
        raise NotImplementedError(f"family {self.name!r} does not implement unit_deviance (abstract method)")

    # -- conveniences ---------------------------------------------------------------------------
    @property
    def is_canonical(self) -> bool:
        return self.link.name == self.canonical_link

    @property
    def log_concave(self) -> bool:
        """Whether :math:`\\log f` is concave in :math:`\\eta` (then the mode search is exact Newton)."""
        return type(self.link).__name__ in self._log_concave_links and type(self.link).__module__ == Link.__module__

    @property
    def is_gaussian_identity(self) -> bool:
        """True for the gaussian family with the identity link (closed-form likelihood)."""
        return self.name == "gaussian" and self.link.name == "identity"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(link={self.link.name!r})"


def _finite_numeric(y, family: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    try:
        out = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"the response must be numeric for the {family} family, "
                        f"got values such as {_examples(np.unique(arr.astype(str)))}") from None
    bad = out[~np.isfinite(out)]
    if bad.size:
        raise DataError(f"the response has {bad.size} non-finite value(s) ({_examples(np.unique(bad))}); "
                        "drop those rows first")
    return out


def _examples(values, limit: int = 5) -> str:
    vals = list(values)
    shown = ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in vals[:limit])
    return shown + (f", ... ({len(vals)} distinct)" if len(vals) > limit else "")


class Gaussian(Family):
    r"""Normal response; :math:`\kappa = \sigma^2`."""

    name = "gaussian"
    canonical_link = "identity"
    has_dispersion = True
    _log_concave_links = ("IdentityLink",)

    def logf(self, y, eta, kappa=None):
        kappa = 1.0 if kappa is None else kappa
        mu = eta if self.is_canonical else self.linkinv(eta)
        kappa_t = torch.as_tensor(kappa, dtype=mu.dtype, device=mu.device)
        return -0.5 * torch.log(2 * math.pi * kappa_t) - (y - mu) ** 2 / (2 * kappa_t)

    def variance(self, mu):
        return torch.ones_like(mu)

    def fisher_w(self, eta, kappa=None):
        w = torch.ones_like(eta) if self.is_canonical else self.mu_eta(eta) ** 2
        return w if kappa is None else w / kappa

    def dfisher_w(self, eta, kappa=None):
        return torch.zeros_like(eta) if self.is_canonical else super().dfisher_w(eta, kappa)

    def d1(self, y, eta, kappa=None):
        if not self.is_canonical:
            return super().d1(y, eta, kappa)
        r = y - eta
        return r if kappa is None else r / kappa

    def d2(self, y, eta, kappa=None):
        if not self.is_canonical:
            return super().d2(y, eta, kappa)
        one = torch.full_like(eta, -1.0)
        return one if kappa is None else one / kappa

    def unit_deviance(self, y, mu):
        return (y - mu) ** 2


class Binomial(Family):
    r"""Bernoulli response in :math:`\{0,1\}`: :math:`\log f = y\log\mu+(1-y)\log(1-\mu)`.

    A two-valued response is recoded (smaller value, or first in sorted order, to 0) with a
    :class:`~torchmix.errors.DataWarning`; anything outside :math:`\{0,1\}` afterwards is a
    :class:`~torchmix.errors.DataError` listing up to five offending values.
    """

    name = "binomial"
    canonical_link = "logit"
    _log_concave_links = ("LogitLink", "ProbitLink", "CloglogLink")

    def logf(self, y, eta, kappa=None):
        if isinstance(self.link, LogitLink):
            return y * eta - torch.nn.functional.softplus(eta)
        return y * self.link.log_inverse(eta) + (1 - y) * self.link.log1m_inverse(eta)

    def variance(self, mu):
        return mu * (1 - mu)

    def d1(self, y, eta, kappa=None):
        if isinstance(self.link, LogitLink):
            return y - torch.sigmoid(eta)
        return y * self.link.dlog_inverse(eta) - (1 - y) * self.link.dlog1m_inverse(eta)

    def fisher_w(self, eta, kappa=None):
        return self.link.dlog_inverse(eta) * self.link.dlog1m_inverse(eta)

    def d2(self, y, eta, kappa=None):
        if isinstance(self.link, LogitLink):
            return -self.link.mu_eta(eta)
        return y * self.link.d2log_inverse(eta) - (1 - y) * self.link.d2log1m_inverse(eta)

    def derivs(self, y, eta, kappa=None):
        if isinstance(self.link, LogitLink):
            mu = torch.sigmoid(eta)
            w = torch.sigmoid(-eta) * mu
            return y - mu, w, w
        return super().derivs(y, eta, kappa)

    def dfisher_w(self, eta, kappa=None):
        if isinstance(self.link, LogitLink):
            mu = torch.sigmoid(eta)
            return mu * torch.sigmoid(-eta) * (1.0 - 2.0 * mu)  # W (1 - 2 mu)
        return super().dfisher_w(eta, kappa)

    def starting_mu(self, y):
        return (y + 0.5) / 2.0

    def unit_deviance(self, y, mu):
        return -2.0 * (torch.xlogy(y, mu) + torch.xlogy(1 - y, 1 - mu))

    def validate(self, y) -> np.ndarray:
        arr = np.asarray(y)
        if arr.dtype == bool:
            return arr.astype(np.float64)
        numeric = arr.dtype.kind in "iuf"
        if numeric:
            arr = _finite_numeric(arr, self.name)
        elif arr.dtype.kind in "OUS":
            if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in arr.ravel()):
                raise DataError("the response has missing values; drop those rows first")
        else:
            raise DataError(f"the binomial response must be numeric, boolean or two-valued, got dtype {arr.dtype}")
        try:
            uniq = np.unique(arr)
        except TypeError:   # values of different types cannot be ordered
            raise DataError("the binomial response mixes values of different types, such as "
                            f"{_examples(np.unique(arr.astype(str)))}; give 0/1, booleans or two values of "
                            "one type") from None
        if numeric and np.all(np.isin(uniq, [0.0, 1.0])):
            return arr.astype(np.float64)
        if len(uniq) == 2:
            lo, hi = uniq[0], uniq[1]
            warn(f"binomial response recoded: {_examples([lo])} -> 0, {_examples([hi])} -> 1",
                 DataWarning)
            return (arr == hi).astype(np.float64)
        if not numeric:
            raise DataError(f"the binomial response must have exactly two distinct values, got "
                            f"{len(uniq)}: {_examples(uniq)}")
        bad = uniq[~np.isin(uniq, [0.0, 1.0])]
        raise DataError(f"the binomial response must be 0/1 (or two-valued), found {bad.size} other "
                        f"value(s): {_examples(bad)}")


class Poisson(Family):
    r"""Counts: :math:`\log f = y\log\mu-\mu-\log\Gamma(y+1)`."""

    name = "poisson"
    canonical_link = "log"
    _log_concave_links = ("LogLink",)

    def logf(self, y, eta, kappa=None):
        if isinstance(self.link, LogLink):
            e = eta.clamp(-_ETA_CLAMP, _ETA_CLAMP)
            return y * e - torch.exp(e) - torch.lgamma(y + 1)
        return torch.xlogy(y, self.linkinv(eta)) - self.linkinv(eta) - torch.lgamma(y + 1)

    def variance(self, mu):
        return mu

    def d1(self, y, eta, kappa=None):
        if isinstance(self.link, LogLink):
            return y - self.link.inverse(eta)
        return y * self.link.dlog_inverse(eta) - self.link.mu_eta(eta)

    def fisher_w(self, eta, kappa=None):
        if isinstance(self.link, LogLink):
            return self.link.inverse(eta)
        return self.link.mu_eta(eta) * self.link.dlog_inverse(eta)

    def d2(self, y, eta, kappa=None):
        if isinstance(self.link, LogLink):
            return -self.link.inverse(eta)
        return super().d2(y, eta, kappa)

    def derivs(self, y, eta, kappa=None):
        if isinstance(self.link, LogLink):
            mu = self.link.inverse(eta)
            return y - mu, mu, mu
        return super().derivs(y, eta, kappa)

    def dfisher_w(self, eta, kappa=None):
        if isinstance(self.link, LogLink):
            return self.link.inverse(eta) * self.link.dlog_inverse(eta)
        return super().dfisher_w(eta, kappa)

    def starting_mu(self, y):
        return y + 0.1

    def unit_deviance(self, y, mu):
        return 2.0 * (torch.xlogy(y, y) - torch.xlogy(y, mu) - (y - mu))

    def validate(self, y) -> np.ndarray:
        arr = _finite_numeric(y, self.name)
        neg = np.unique(arr[arr < 0])
        if neg.size:
            raise DataError(f"the poisson response must be a non-negative count, found {int((arr < 0).sum())} "
                            f"negative value(s): {_examples(neg)}")
        frac = np.unique(arr[arr != np.floor(arr)])
        if frac.size:
            warn(f"the poisson response has {frac.size} distinct non-integer value(s) "
                 f"({_examples(frac)}); log f uses lgamma(y + 1)", DataWarning)
        return arr


def get_family(family: Union[str, Family, type] = "gaussian", link: Union[str, Link, None] = None) -> Family:
    """Resolve a family given as a name (case-insensitive), a :class:`Family` instance or class.

    ``link`` (a name, a :class:`Link`, or None for the family's canonical link) replaces the
    link of a family given by name or class; for an instance it must be None or equal to the
    instance's link.

    Raises
    ------
    ConfigError
        Unknown family or link name (the message lists the valid ones), or a wrong type.
    """
    if isinstance(family, Family):
        if link is not None and get_link(link) != family.link:
            raise ConfigError(f"family {family!r} already has link {family.link.name!r}; "
                              f"got link={link!r} as well")
        return family
    if isinstance(family, type) and issubclass(family, Family):
        return family(link)
    if isinstance(family, str):
        key = family.strip().lower()
        if key not in _FAMILIES:
            raise ConfigError(f"unknown family {family!r}; valid families: {', '.join(sorted(_FAMILIES))}")
        return _FAMILIES[key](link)
    raise ConfigError(f"family must be a name or a Family instance, got {type(family).__name__}")


def list_families() -> list[str]:
    """Names of the registered families."""
    return sorted(_FAMILIES)

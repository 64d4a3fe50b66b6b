r"""Response families and link functions (MATH.md 1.4), with a name registry.

A **link** maps the linear predictor :math:`\eta` to the mean :math:`\mu = h(\eta)`. A new
link needs only :meth:`Link.inverse` (and, optionally, :meth:`Link.link` for starting
values); every derivative falls back to autograd. Subclasses with a ``name`` register
themselves, so the string resolves everywhere a link is accepted::

    class CauchitLink(Link):
        name = "cauchit"

        def inverse(self, eta):
            return 0.5 + torch.atan(eta) / torch.pi

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
for every built-in link (``softplus``, ``log_ndtr``, ``expm1``; :math:`\eta` is clamped to
:math:`[-700, 700]` for ``log`` and ``cloglog``). Pure tensor math (the response check uses
numpy only).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Union

import numpy as np
import torch

from .errors import ConfigError, DataError, DataWarning

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

_LINKS: dict[str, type] = {}
_FAMILIES: dict[str, type] = {}

_ETA_CLAMP = 700.0
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# autograd helpers: elementwise first and second derivatives of a scalar function
# ---------------------------------------------------------------------------------------------

def _elementwise_derivative(fn: Callable[[torch.Tensor], torch.Tensor], eta: torch.Tensor,
                            order: int = 1) -> torch.Tensor:
    """``d^order fn / d eta^order`` for an elementwise ``fn``, by autograd.

    The result stays differentiable when ``eta`` carries a graph (so it can be used inside a
    differentiable likelihood); otherwise it is detached.
    """
    keep_graph = eta.requires_grad and torch.is_grad_enabled()
    with torch.enable_grad():
        e = eta if keep_graph else eta.detach().requires_grad_(True)
        out = fn(e)
        for k in range(order):
            if not out.requires_grad:  # a constant derivative (e.g. a linear function)
                out = torch.zeros_like(e)
                break
            last = k == order - 1
            (out,) = torch.autograd.grad(out, e, grad_outputs=torch.ones_like(out),
                                         create_graph=keep_graph or not last)
    return out if keep_graph else out.detach()


# ---------------------------------------------------------------------------------------------
# links
# ---------------------------------------------------------------------------------------------

def register_link(cls=None, *, name: Optional[str] = None):
    """Register a :class:`Link` subclass under ``name`` (default ``cls.name``); usable as a decorator."""

    def deco(c):
        key = (name or getattr(c, "name", "") or "").lower()
        if not key:
            raise ConfigError(f"link class {c.__name__} has no name to register")
        _LINKS[key] = c
        return c

    return deco(cls) if cls is not None else deco


class Link:
    r"""Base class of link functions :math:`\mu = h(\eta)`.

    Subclasses must implement :meth:`inverse`; setting the class attribute ``name``
    registers them (``get_link(name)`` then returns an instance). Everything else has a
    default: derivatives by autograd, logarithms by ``log(inverse)``. Override the
    ``log_*``/``dlog*`` methods with closed forms where the defaults lose precision.
    """

    name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register_link(cls)

    # -- required -----------------------------------------------------------------------------
    def inverse(self, eta: torch.Tensor) -> torch.Tensor:
        r""":math:`\mu = h(\eta)`, elementwise."""
        raise NotImplementedError(f"link {self.name!r} must implement inverse(eta)")

    # -- optional -----------------------------------------------------------------------------
    def link(self, mu: torch.Tensor) -> torch.Tensor:
        r""":math:`\eta = h^{-1}(\mu)` (optional; used for starting values)."""
        raise NotImplementedError(f"link {self.name!r} does not implement link(mu)")

    @property
    def has_link(self) -> bool:
        """Whether :meth:`link` is implemented."""
        return type(self).link is not Link.link

    def mu_eta(self, eta: torch.Tensor) -> torch.Tensor:
        r""":math:`h'(\eta)` (autograd by default)."""
        return _elementwise_derivative(self.inverse, eta)

    def log_inverse(self, eta: torch.Tensor) -> torch.Tensor:
        r""":math:`\log\mu`."""
        return torch.log(self.inverse(eta))

    def log1m_inverse(self, eta: torch.Tensor) -> torch.Tensor:
        r""":math:`\log(1-\mu)` (used by the binomial family)."""
        return torch.log1p(-self.inverse(eta))

    def dlog_inverse(self, eta: torch.Tensor) -> torch.Tensor:
        r""":math:`a(\eta)=\partial_\eta\log\mu = h'/\mu`."""
        return _elementwise_derivative(self.log_inverse, eta)

    def dlog1m_inverse(self, eta: torch.Tensor) -> torch.Tensor:
        r""":math:`b(\eta)=-\partial_\eta\log(1-\mu) = h'/(1-\mu)`."""
        return -_elementwise_derivative(self.log1m_inverse, eta)

    def d2log_inverse(self, eta: torch.Tensor) -> torch.Tensor:
        r""":math:`a'(\eta)`."""
        return _elementwise_derivative(self.log_inverse, eta, order=2)

    def d2log1m_inverse(self, eta: torch.Tensor) -> torch.Tensor:
        r""":math:`b'(\eta)`."""
        return -_elementwise_derivative(self.log1m_inverse, eta, order=2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class IdentityLink(Link):
    r""":math:`\mu = \eta`."""

    name = "identity"

    def inverse(self, eta):
        return eta

    def link(self, mu):
        return mu

    def mu_eta(self, eta):
        return torch.ones_like(eta)

    def dlog_inverse(self, eta):
        return 1.0 / eta

    def d2log_inverse(self, eta):
        return -1.0 / eta ** 2


class LogitLink(Link):
    r""":math:`\mu = 1/(1+e^{-\eta})`; :math:`\log\mu = -\operatorname{softplus}(-\eta)`."""

    name = "logit"

    def inverse(self, eta):
        return torch.sigmoid(eta)

    def link(self, mu):
        return torch.logit(mu)

    def mu_eta(self, eta):
        return torch.sigmoid(eta) * torch.sigmoid(-eta)

    def log_inverse(self, eta):
        return -torch.nn.functional.softplus(-eta)

    def log1m_inverse(self, eta):
        return -torch.nn.functional.softplus(eta)

    def dlog_inverse(self, eta):
        return torch.sigmoid(-eta)

    def dlog1m_inverse(self, eta):
        return torch.sigmoid(eta)

    def d2log_inverse(self, eta):
        return -self.mu_eta(eta)

    def d2log1m_inverse(self, eta):
        return self.mu_eta(eta)


def _log_phi(x):
    return -0.5 * x * x - _LOG_SQRT_2PI


def _mills(x):
    r"""Inverse Mills ratio :math:`\lambda(x)=\varphi(x)/\Phi(x)`, stable for large :math:`|x|`."""
    return torch.exp(_log_phi(x) - torch.special.log_ndtr(x))


class ProbitLink(Link):
    r""":math:`\mu = \Phi(\eta)`; logarithms through ``log_ndtr``."""

    name = "probit"

    def inverse(self, eta):
        return torch.special.ndtr(eta)

    def link(self, mu):
        return torch.special.ndtri(mu)

    def mu_eta(self, eta):
        return torch.exp(_log_phi(eta))

    def log_inverse(self, eta):
        return torch.special.log_ndtr(eta)

    def log1m_inverse(self, eta):
        return torch.special.log_ndtr(-eta)

    def dlog_inverse(self, eta):
        return _mills(eta)

    def dlog1m_inverse(self, eta):
        return _mills(-eta)

    def d2log_inverse(self, eta):
        lam = _mills(eta)
        return -lam * (eta + lam)

    def d2log1m_inverse(self, eta):
        lam = _mills(-eta)
        return lam * (lam - eta)


class CloglogLink(Link):
    r""":math:`\mu = 1-\exp(-e^\eta)`; :math:`\eta` clamped to :math:`[-700, 700]`."""

    name = "cloglog"

    def inverse(self, eta):
        return -torch.expm1(-torch.exp(eta.clamp(-_ETA_CLAMP, _ETA_CLAMP)))

    def link(self, mu):
        return torch.log(-torch.log1p(-mu))

    def mu_eta(self, eta):
        e = eta.clamp(-_ETA_CLAMP, _ETA_CLAMP)
        return torch.exp(e - torch.exp(e))

    def log_inverse(self, eta):
        return torch.log(-torch.expm1(-torch.exp(eta.clamp(-_ETA_CLAMP, _ETA_CLAMP))))

    def log1m_inverse(self, eta):
        return -torch.exp(eta.clamp(-_ETA_CLAMP, _ETA_CLAMP))

    def dlog_inverse(self, eta):
        t = torch.exp(eta.clamp(-_ETA_CLAMP, _ETA_CLAMP))
        return t / torch.expm1(t)

    def dlog1m_inverse(self, eta):
        return torch.exp(eta.clamp(-_ETA_CLAMP, _ETA_CLAMP))

    def d2log_inverse(self, eta):
        t = torch.exp(eta.clamp(-_ETA_CLAMP, _ETA_CLAMP))
        a = t / torch.expm1(t)
        # 1 - t / (1 - e^{-t}), with its series -t/2 - t^2/12 where t is small
        small = t < 1e-4
        t_safe = torch.where(small, torch.ones_like(t), t)
        factor = torch.where(small, -t / 2 - t * t / 12, 1.0 - t_safe / (-torch.expm1(-t_safe)))
        return a * factor

    def d2log1m_inverse(self, eta):
        return torch.exp(eta.clamp(-_ETA_CLAMP, _ETA_CLAMP))


class LogLink(Link):
    r""":math:`\mu = e^\eta`; :math:`\eta` clamped to :math:`[-700, 700]`."""

    name = "log"

    def inverse(self, eta):
        return torch.exp(eta.clamp(-_ETA_CLAMP, _ETA_CLAMP))

    def link(self, mu):
        return torch.log(mu)

    def mu_eta(self, eta):
        return self.inverse(eta)

    def log_inverse(self, eta):
        return eta.clamp(-_ETA_CLAMP, _ETA_CLAMP)

    def dlog_inverse(self, eta):
        return ((eta >= -_ETA_CLAMP) & (eta <= _ETA_CLAMP)).to(eta.dtype)

    def d2log_inverse(self, eta):
        return torch.zeros_like(eta)


def get_link(link: Union[str, Link, type, None], default: str = "identity") -> Link:
    """Resolve a link given as a name (case-insensitive), a :class:`Link` instance or class.

    Raises
    ------
    ConfigError
        For an unknown name (the message lists the registered links) or a wrong type.
    """
    if link is None:
        link = default
    if isinstance(link, Link):
        return link
    if isinstance(link, type) and issubclass(link, Link):
        return link()
    if isinstance(link, str):
        key = link.strip().lower()
        if key not in _LINKS:
            raise ConfigError(f"unknown link {link!r}; valid links: {', '.join(sorted(_LINKS))}")
        return _LINKS[key]()
    raise ConfigError(f"link must be a name or a Link instance, got {type(link).__name__}")


def list_links() -> list[str]:
    """Names of the registered links."""
    return sorted(_LINKS)


# ---------------------------------------------------------------------------------------------
# families
# ---------------------------------------------------------------------------------------------

def register_family(cls=None, *, name: Optional[str] = None):
    """Register a :class:`Family` subclass under ``name`` (default ``cls.name``)."""

    def deco(c):
        key = (name or getattr(c, "name", "") or "").lower()
        if not key:
            raise ConfigError(f"family class {c.__name__} has no name to register")
        _FAMILIES[key] = c
        return c

    return deco(cls) if cls is not None else deco


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
        raise NotImplementedError

    def linkinv(self, eta):
        return self.link.inverse(eta)

    def mu_eta(self, eta):
        return self.link.mu_eta(eta)

    def variance(self, mu):
        raise NotImplementedError

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
        raise NotImplementedError

    # -- conveniences ---------------------------------------------------------------------------
    @property
    def is_canonical(self) -> bool:
        return self.link.name == self.canonical_link

    @property
    def log_concave(self) -> bool:
        """Whether :math:`\\log f` is concave in :math:`\\eta` (then the mode search is exact Newton)."""
        return type(self.link).__name__ in self._log_concave_links and type(self.link).__module__ == __name__

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
        uniq = np.unique(arr)
        if numeric and np.all(np.isin(uniq, [0.0, 1.0])):
            return arr.astype(np.float64)
        if len(uniq) == 2:
            lo, hi = uniq[0], uniq[1]
            warnings.warn(f"binomial response recoded: {_examples([lo])} -> 0, {_examples([hi])} -> 1",
                          DataWarning, stacklevel=2)
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
            warnings.warn(f"the poisson response has {frac.size} distinct non-integer value(s) "
                          f"({_examples(frac)}); log f uses lgamma(y + 1)", DataWarning, stacklevel=2)
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

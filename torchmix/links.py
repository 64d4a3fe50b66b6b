r"""Link functions :math:`\mu = h(\eta)` with a name registry (MATH.md 1.4).

A new link needs only :meth:`Link.inverse` (and, optionally, :meth:`Link.link` for starting
values); every derivative falls back to autograd. Subclasses with a ``name`` register
themselves, so the string resolves everywhere a link is accepted::

    class CauchitLink(Link):
        name = "cauchit"

        def inverse(self, eta):
            return 0.5 + torch.atan(eta) / torch.pi

Built-in links give closed forms that stay finite at :math:`|\eta| = 30` (``softplus``,
``log_ndtr``, ``expm1``; :math:`\eta` is clamped to :math:`[-700, 700]` for ``log`` and
``cloglog``). Besides :math:`h` and :math:`h'` a link provides :math:`\log\mu`, :math:`\log(1-\mu)`
and their first two derivatives, which the binomial and poisson families are written with.
Pure tensor math.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from .errors import ConfigError

__all__ = [
    "Link",
    "IdentityLink",
    "LogitLink",
    "ProbitLink",
    "CloglogLink",
    "LogLink",
    "register_link",
    "get_link",
    "list_links",
]

_LINKS: dict[str, type] = {}

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

def register_in(table: dict, kind: str, cls=None, name: Optional[str] = None):
    """Register class ``cls`` in ``table`` under ``name`` (default ``cls.name``, lower-cased);
    without ``cls``, return a decorator. Shared by the link and family registries."""

    def deco(c):
        key = (name or getattr(c, "name", "") or "").lower()
        if not key:
            raise ConfigError(f"{kind} class {c.__name__} has no name to register")
        table[key] = c
        return c

    return deco(cls) if cls is not None else deco


def register_link(cls=None, *, name: Optional[str] = None):
    """Register a :class:`Link` subclass under ``name`` (default ``cls.name``); usable as a decorator."""
    return register_in(_LINKS, "link", cls, name)


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
        raise NotImplementedError(f"link {self.name!r} must implement inverse(eta) (abstract method)")

    # -- optional -----------------------------------------------------------------------------
    def link(self, mu: torch.Tensor) -> torch.Tensor:
        r""":math:`\eta = h^{-1}(\mu)` (optional; used for starting values)."""
        raise NotImplementedError(f"link {self.name!r} does not implement link(mu) (optional, abstract method)")

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

"""The names a formula term may resolve when formulaic evaluates it (the second wall).

Even if the allow-list check of :mod:`torchmix.formula_safety` were bypassed, terms are
evaluated in :func:`evaluation_context`: the allowed transforms, ``np`` and ``contr`` as
namespaces of their allowed members only, the caller's ``transforms``, and every Python builtin
and every other formulaic transform bound to a stub that refuses to run. :class:`ContextSpec`
keeps that context attached to a model spec for later evaluation (``predict``).
"""

from __future__ import annotations

import builtins
from types import SimpleNamespace
from typing import Mapping, Optional

import numpy as np
from formulaic.transforms import TRANSFORMS

from .errors import FormulaError
from .formula_safety import _FORMULAIC, _MATH, CONTRAST_NAMES, NUMPY_CONSTANTS, NUMPY_NAMES, check_transforms

__all__ = ["evaluation_context", "ContextSpec"]


class _Refused:
    """Stands in for a name a formula may not use; refuses to be called."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise FormulaError(f"{self._name!r} may not be used in a formula")

    def __repr__(self):
        return f"<refused {self._name}>"


def evaluation_context(transforms: Optional[Mapping] = None) -> dict:
    """The names formulaic may resolve besides data columns (the second wall).

    Allowed transforms, ``np`` and ``contr`` as namespaces of the allowed members, the caller's
    ``transforms``; every Python builtin and every other formulaic transform bound to a refusing
    stub, so that nothing outside the allow-list resolves even if the check were bypassed.
    """
    ctx: dict = {name: _Refused(name) for name in dir(builtins)}
    ctx.update({name: _Refused(name) for name in TRANSFORMS})
    ctx.update({name: TRANSFORMS[name] for name in _FORMULAIC})
    ctx.update(_MATH)
    ctx["np"] = SimpleNamespace(**{n: getattr(np, n) for n in NUMPY_NAMES + NUMPY_CONSTANTS})
    ctx["contr"] = SimpleNamespace(**{n: getattr(TRANSFORMS["contr"], n) for n in CONTRAST_NAMES})
    ctx.update(check_transforms(transforms))
    return ctx


class ContextSpec:
    """A formulaic ``ModelSpec`` that always evaluates in a given context (used by ``predict``).

    Attribute access is delegated to the wrapped spec; :meth:`get_model_matrix` adds
    ``context=``.
    """

    def __init__(self, spec, context: dict):
        self.spec, self.context = spec, context

    def get_model_matrix(self, data, **kwargs):
        kwargs.setdefault("context", self.context)
        return self.spec.get_model_matrix(data, **kwargs)

    def __getattr__(self, name):
        if name.startswith("_") or name in ("spec", "context"):
            raise AttributeError(name)
        return getattr(self.spec, name)

r"""Random effects with their conditional uncertainty, as tables and a caterpillar plot.

:class:`RanefMixin` gives :class:`~torchmix.results.MixedResults`

* ``ranef[level]``: a :class:`RanefTable` (a DataFrame of the predicted effects, rows = group ids,
  columns = effect names) whose ``std_error`` attribute is a DataFrame of the same shape with the
  conditional standard errors (posterior SD of each effect given the data at the estimates);
* ``ranef_se[level]`` (the same SEs), ``ranef_cov[level]`` (``(G, q, q)`` posterior covariances),
  ``ranef_mean[level]`` (posterior means; gaussian: equal to ``ranef``);
* :meth:`RanefMixin.ranef_frame`: the long, tidy form;
* :meth:`RanefMixin.plot_ranef`: sorted effects with :math:`\pm1.96\,\mathrm{SE}` intervals
  (matplotlib, an optional dependency: ``pip install torchmix[plot]``).

The math is in :mod:`torchmix.ranef_posterior` (gaussian closed form; quadrature otherwise).
"""

from __future__ import annotations

import importlib
from functools import cached_property
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .errors import DataError
from .ranef_posterior import Posterior, gaussian_posterior, lambdas_absolute, quadrature_posterior

__all__ = ["RanefMixin", "PooledRanefMixin", "RanefTable", "POSTERIOR_MIN_NODES", "import_pyplot", "ranef_tables"]

#: The posterior moments of a non-gaussian fit use at least this many nodes per effect when a group's
#: path holds at most two random effects (``MAX_RAISED_DIM``): the mean and SD of a skewed posterior
#: (e.g. a group whose responses are all 0) need more nodes than its normalising constant (21 nodes
#: reach 1e-7 where 13 leave 5e-5 on such groups). Larger models keep the fit's rule (cost M^q).
POSTERIOR_MIN_NODES = 21
MAX_RAISED_DIM = 2


class RanefTable(pd.DataFrame):
    """Predicted random effects of one level; ``.std_error`` holds their conditional SEs.

    Derived frames (arithmetic, copies, slices) are plain DataFrames without ``std_error``.
    """

    _metadata = ["std_error", "level"]

    @property
    def _constructor(self):
        return pd.DataFrame


def import_pyplot():
    """``matplotlib.pyplot``, or an ImportError that names the optional extra."""
    try:
        return importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        raise ImportError("plot_ranef needs matplotlib, an optional dependency of torchmix: "
                          "pip install torchmix[plot]  (or pip install matplotlib)") from exc


def ranef_tables(estimates: dict, std_errors: dict) -> dict:
    """Level name -> :class:`RanefTable` of ``estimates[name]`` with ``std_error = std_errors[name]``."""
    out = {}
    for name, frame in estimates.items():
        table = RanefTable(frame.to_numpy(), index=frame.index, columns=frame.columns)
        table.std_error = std_errors.get(name)
        table.level = name
        out[name] = table
    return out


class _RanefViews:
    """Tidy frame and caterpillar plot from ``ranef`` and ``ranef_se`` (single or pooled fits).

    Subclasses give ``_levels`` (the design's levels) and ``ranef_posterior()``; for pooled fits the
    posterior is Rubin's (see :class:`PooledRanefMixin`).
    """

    @cached_property
    def _posterior(self) -> Posterior:
        return self.ranef_posterior()

    def _level_frames(self, tensors) -> dict:
        return {info.name: pd.DataFrame(t.detach().cpu().numpy(), index=info.labels, columns=info.effect_names)
                for info, t in zip(self._levels, tensors)}

    @cached_property
    def ranef_se(self) -> dict:
        """Level name -> DataFrame of conditional standard errors (same shape as ``ranef``)."""
        return self._level_frames(self._posterior.sd)

    @cached_property
    def ranef_mean(self) -> dict:
        """Level name -> DataFrame of posterior means (gaussian: the predictions themselves)."""
        return self._level_frames(self._posterior.mean)

    @cached_property
    def ranef_cov(self) -> dict:
        """Level name -> ``(G, q, q)`` array of posterior covariances, rows in ``ranef`` order."""
        return {info.name: c.detach().cpu().numpy() for info, c in zip(self._levels, self._posterior.cov)}

    def ranef_frame(self) -> pd.DataFrame:
        """Random effects in long form: level, group, id, term, estimate, std_error.

        ``level`` is the model level (2 = lowest grouping level), ``group`` the grouping factor,
        ``id`` the group id, ``term`` the effect name; ``estimate`` is the prediction of ``ranef``
        and ``std_error`` its conditional standard error.
        """
        parts = []
        for lvl, (name, table) in enumerate(self.ranef.items(), start=2):
            est = pd.DataFrame(table).rename_axis("id").reset_index().melt(id_vars="id", var_name="term",
                                                                          value_name="estimate")
            se = self.ranef_se[name].rename_axis("id").reset_index().melt(id_vars="id", var_name="term",
                                                                          value_name="std_error")
            part = est.merge(se, on=["id", "term"], how="left", sort=False)
            part.insert(0, "group", name)
            part.insert(0, "level", lvl)
            parts.append(part)
        cols = ["level", "group", "id", "term", "estimate", "std_error"]
        if not parts:
            return pd.DataFrame(columns=cols)
        return pd.concat(parts, ignore_index=True)[cols]

    def plot_ranef(self, level: Optional[str] = None, term: Optional[str] = None, z: float = 1.96, ax=None):
        r"""Caterpillar plot: the random effects of one level sorted, with :math:`\pm z\,\mathrm{SE}` bars.

        Parameters
        ----------
        level : grouping factor name (default: the first, i.e. level 2).
        term : one effect name (default: one panel per effect).
        z : half-width of the intervals in standard errors (1.96: 95% normal intervals).
        ax : a matplotlib Axes (only with one effect) or None.

        Returns
        -------
        the matplotlib Figure.

        Raises
        ------
        ImportError naming ``pip install torchmix[plot]`` when matplotlib is missing;
        DataError for an unknown level or term.
        """
        plt = import_pyplot()
        names = list(self.ranef)
        level = names[0] if level is None else level
        if level not in self.ranef:
            raise DataError(f"plot_ranef: unknown level {level!r}; levels: {names}")
        table, se = self.ranef[level], self.ranef_se[level]
        terms = list(table.columns) if term is None else [term]
        unknown = [t for t in terms if t not in table.columns]
        if unknown:
            raise DataError(f"plot_ranef: unknown term(s) {unknown} at level {level!r}; terms: {list(table.columns)}")
        if ax is not None and len(terms) != 1:
            raise DataError("plot_ranef: pass ax only together with one term")
        if ax is None:
            fig, axes = plt.subplots(1, len(terms), figsize=(4.0 * len(terms), max(3.0, 0.18 * len(table) + 1.2)),
                                     squeeze=False)
            axes = list(axes[0])
        else:
            fig, axes = ax.figure, [ax]
        for a, t in zip(axes, terms):
            est, err = table[t].to_numpy(dtype=float), se[t].to_numpy(dtype=float)
            order = np.argsort(est)
            pos = np.arange(len(est))
            a.errorbar(est[order], pos, xerr=z * err[order], fmt="o", ms=3, color="tab:blue", ecolor="0.55",
                       elinewidth=1, capsize=0)
            a.axvline(0.0, color="0.3", lw=0.8, ls="--")
            a.set_title(f"{level}: {t}")
            a.set_xlabel(f"random effect (±{z:g} SE)")
            if len(est) <= 40:
                a.set_yticks(pos)
                a.set_yticklabels([str(v) for v in np.asarray(table.index)[order]], fontsize=7)
            else:
                a.set_yticks([])
                a.set_ylabel(f"{len(est)} groups, sorted")
        fig.tight_layout()
        return fig


class RanefMixin(_RanefViews):
    """Random-effect uncertainty for a single fit (needs ``_out``, ``design``, ``family``, ``options``)."""

    def ranef_posterior(self, n_quad: Optional[int] = None) -> Posterior:
        r"""Posterior means and covariances of the random effects at the estimates.

        Parameters
        ----------
        n_quad : nodes per effect for non-gaussian fits (default: the fit's ``n_quad``, raised to
            :data:`POSTERIOR_MIN_NODES` when the levels hold at most :data:`MAX_RAISED_DIM` effects
            together; a Laplace fit, ``n_quad=1``, gives the Laplace answer).
            Ignored for the gaussian family (closed form).
        """
        out, t = self._out, self.design.tensors
        if self.is_gaussian:
            return gaussian_posterior(t, out.theta, out.beta, out.sigma)
        if n_quad is None:
            fit_nodes = int(self.options.get("n_quad") or 1)
            dim = sum(lv.q for lv in t.levels)
            n_quad = fit_nodes if fit_nodes == 1 or dim > MAX_RAISED_DIM else max(fit_nodes, POSTERIOR_MIN_NODES)
        lams = lambdas_absolute(out.theta, [lv.term_sizes for lv in t.levels])
        return quadrature_posterior(t, self.family, out.beta, lams, int(n_quad), modes=out.u)

    @property
    def _levels(self) -> list:
        return self.design.levels

    def _ranef_tables(self) -> dict:
        se = self.ranef_se
        out = {}
        for info, b in zip(self.design.levels, self._out.b):
            table = RanefTable(b.detach().cpu().numpy(), index=info.labels, columns=info.effect_names)
            table.std_error = se[info.name]
            table.level = info.name
            out[info.name] = table
        return out


class PooledRanefMixin(_RanefViews):
    r"""Random-effect uncertainty pooled over plausible values (needs ``fits``).

    Rubin's rules per group: :math:`T = \bar W + (1 + K^{-1})B`, :math:`\bar W` the mean of the per-value
    posterior covariances and :math:`B` the between-value covariance of the predictions (:math:`B = 0`
    for K = 1); the pooled prediction is the mean of the per-value predictions (``ranef``).
    """

    def ranef_posterior(self, n_quad: Optional[int] = None) -> Posterior:
        """Pooled posterior: mean of the per-value posterior means, Rubin's total covariance."""
        posts = [f.ranef_posterior(n_quad) for f in self.fits]
        k = len(posts)
        means, covs = [], []
        for lvl in range(len(posts[0].mean)):
            means.append(sum(p.mean[lvl] for p in posts) / k)
            cov = sum(p.cov[lvl] for p in posts) / k
            if k > 1:
                est = torch.stack([f._out.b[lvl].to(cov) for f in self.fits])  # (K, G, q)
                d = est - est.mean(0)
                cov = cov + (1.0 + 1.0 / k) * torch.einsum("kgq,kgr->gqr", d, d) / (k - 1)
            covs.append(cov)
        return Posterior(mean=means, cov=covs)

    @property
    def _levels(self) -> list:
        return self.fits[0].design.levels

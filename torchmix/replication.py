r"""Apply a design-based variance estimator to finished fits (single or plausible values).

* Linearization: the fit already used the stratified meat (passed to the fitter in place of the
  small-sample rule); this module only records the method and its degrees of freedom.
* Replicates: every fit is refitted once per replicate (:mod:`torchmix.fit.replicates`), warm-started
  from its own full-sample solution, and its covariances of the fixed effects and of the variance
  components are replaced by the replicate covariance. With plausible values the sampling variance
  comes from every value (default) or from the first value only (``replicate_pv="first"``,
  EdSurvey's fast option); Rubin's rules then add :math:`(1+1/M)` times the between-value variance.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .errors import ConvergenceWarning
from .distributed.tasks import spread_replicates
from .fit.gaussian_replicates import GaussianReplicateFit
from .fit.glmm_replicates import GLMMReplicateFit
from .fit.replicates import estimate_vector, make_progress
from .warn import warn

__all__ = ["apply_design_variance"]


def _relabel(res, out):
    """A new single-fit result with the FitOutput ``out`` (same design, family, call and options)."""
    return type(res)(out, res.design, res.family, res.call, res.options)


def _with_variance(out, dv, cov=None, estimates=None):
    info = {"method": dv.kind, "description": dv.description, "df": dv.df}
    if estimates is not None:
        info["replicate_estimates"] = estimates
    extra = {**out.extra, "variance": info}
    if cov is None:
        return dataclasses.replace(out, extra=extra)
    p = out.beta.numel()
    return dataclasses.replace(out, cov_beta=cov[:p, :p].clone(), tau_cov=cov[p:, p:].clone(), extra=extra)


def _replicate_cov(res, dv, fit: Callable, bar):
    out = res._out
    full = estimate_vector(out)
    if out.sigma is not None:   # gaussian: estimates only, from the full-sample theta
        o = res.options
        fit = GaussianReplicateFit(max_iter=o["max_iter"], tol=o["tol"])   # all replicates at once (2 levels)
        start = torch.cat([t.reshape(-1) for t in out.theta])
    else:
        start = full
        # all replicates at once (batched Newton steps), separate refits where that does not settle
        fit = GLMMReplicateFit(fit, res.family, out, n_quad=res.options["n_quad"], tol=res.options["tol"])
    est, n_failed = spread_replicates(res.design.tensors, dv.scheme.factors, fit, start, progress=bar)
    if n_failed:
        warn(f"{n_failed} of {dv.scheme.n_replicates} replicate fits did not converge; their estimates "
                      "are used as they are", ConvergenceWarning)
    return dv.scheme.variance(est, full), est


def apply_design_variance(results, dv, fit: Callable, progress: bool = True):
    """Standard errors from ``dv`` for ``results`` (``MixedResults`` or ``PooledResults``).

    Parameters
    ----------
    results : the full-sample fit(s).
    dv : :class:`~torchmix.design_variance.DesignVariance`.
    fit : ``fit(tensors, start) -> FitOutput``, the same model refitted with other tensors.
    progress : one bar over replicates x plausible values.

    Returns
    -------
    A result of the same kind with the design-based covariances and ``variance`` information.
    """
    fits = getattr(results, "fits", None)
    single = fits is None
    fits = [results] if single else list(fits)
    if dv.kind == "linearization":
        new = [_relabel(f, _with_variance(f._out, dv)) for f in fits]
    else:
        n_rep = dv.scheme.n_replicates
        todo = 1 if dv.replicate_pv == "first" else len(fits)
        with make_progress(n_rep * todo, progress) as bar:
            done = [_replicate_cov(f, dv, fit, bar) for f in fits[:todo]]
        done += [(done[0][0], None)] * (len(fits) - todo)
        new = [_relabel(f, _with_variance(f._out, dv, c, e)) for f, (c, e) in zip(fits, done)]
    if single:
        return new[0]
    pooled = type(results)(new, results.pv_columns, response=results.response, call=results.call)
    pooled.df_complete = float(dv.df)
    return pooled

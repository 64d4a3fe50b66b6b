r"""Many responses of one GLMM at once (plausible values), batched over responses.

The design, weights and groups are shared; only the response differs. The K' = K - 1 values after
the first are laid side by side as one model with K' copies of the data (groups of copy k offset by
k times the number of groups), so one evaluation of the quadrature likelihood evaluates all of them:
its top-group contributions split by copy, and because copies share no parameter the gradient of
their sum with respect to the stacked parameters :math:`(\psi_1,\dots,\psi_{K'})` is the stack of
the K' gradients (the Hessian is block diagonal).

Each value starts from the first value's solution and modes (carried from the standardised columns
the single fit works on to the original ones) and takes quasi-Newton steps with a per-value
backtracking line search (:mod:`~torchmix.fit.quasi_newton`), evaluating the values still moving (while at
least a third of the stack moves, the whole stack with the others' results dropped: a stack over a new
subset costs about two evaluations per value to build); an evaluation after a long step starts from
modes brought close by a few Newton steps per group (:mod:`~torchmix.likelihood.warm_modes`):

1. quasi-Newton steps (symmetric rank-one updates, BFGS where these would lose positive definiteness)
   started from the first value's Hessian until the gradient is below the convergence tolerance (the
   test of :func:`~torchmix.fit.glmm.fit_glmm`);
2. the value's own Hessian there: in closed form where the model has one (two levels, one random effect,
   canonical link: :mod:`~torchmix.fit.glmm_hessian`, exact including the adaptation of the nodes, equal to
   the separate fit's central differences to their accuracy), otherwise by central differences of the
   exact gradient exactly as :func:`~torchmix.fit.glmm_se.fd_hessian` does it, the 2m difference
   evaluations batched over values (central differences with this step amplify rounding by only ~1e4, so
   the result does not depend on which values share a batch or on the number of threads);
3. per-top-group scores from the row-level derivatives kept from the value's last evaluation, and
   the sandwich per value (:func:`~torchmix.fit.glmm_se.assemble`).

The values are stacked in groups of at most ``CHUNK_ROWS`` rows (evenly split), each group fitted
through steps 1-3 in turn: larger stacks leave the processor cache and cost more per value. A trial
point where the curvature of some group is not positive definite is rejected like one that lowers
the log-likelihood. A value that does not converge this way, or whose variance is near the boundary,
is refitted on its own with :func:`~torchmix.fit.glmm.fit_glmm`, so the result always equals fitting
each value separately.
"""

from __future__ import annotations

import math

import torch

from ..covariance import lambda_from_theta, n_theta
from ..likelihood.agq import AGQLogLik
from ..likelihood.segments import Grouping
from ..likelihood.warm_modes import warm_modes
from ..tensors import FitOutput, LevelTensors, ModelTensors
from .glmm import BOUNDARY_TOL, fit_glmm
from .glmm_hessian import closed_form_hessians, hessian_builder
from .glmm_se import EPS_QUARTER, assemble, boundary_pattern
from .quasi_newton import quasi_newton as _newton  # also used by glmm_replicates
from .standardize import Standardizer

__all__ = ["fit_glmm_many", "stack_responses", "even_chunks"]

FIXED_STEPS = 30     # quasi-Newton steps started from the first value's Hessian
STOP = 1.0           # stop when max |gradient| < STOP * tol
CHUNK_ROWS = 100_000  # rows of one stacked evaluation (values x N); larger stacks leave the cache
WARM_SHIFT = 1e-2    # a warm start of the modes (few Newton steps) before evaluations this far from the last
SUBSET_SHARE = 3     # values still moving are evaluated alone when fewer than 1/SUBSET_SHARE of the stack


def stack_responses(tensors: ModelTensors, responses: torch.Tensor) -> ModelTensors:
    r"""K copies of the model side by side, copy k with response ``responses[:, k]``.

    Rows, groups of every level, parents and top-level ancestors of copy k are offset by k times
    their count, so the copies are independent groups of one model with :math:`KN` rows.
    """
    n, k_all = responses.shape
    dev = responses.device
    copy_rows = torch.arange(k_all, device=dev).repeat_interleave(n)
    levels, n_top = [], tensors.levels[-1].n_groups
    for i, lv in enumerate(tensors.levels):
        copy_groups = torch.arange(k_all, device=dev).repeat_interleave(lv.n_groups)
        parent = None
        if lv.parent is not None:
            parent = lv.parent.repeat(k_all) + copy_groups * tensors.levels[i + 1].n_groups
        levels.append(LevelTensors(Z=lv.Z.repeat(k_all, 1), term_sizes=lv.term_sizes,
                                   group=lv.group.repeat(k_all) + copy_rows * lv.n_groups, parent=parent,
                                   n_groups=k_all * lv.n_groups, w_cond=lv.w_cond.repeat(k_all),
                                   w_uncond=lv.w_uncond.repeat(k_all), top=lv.top.repeat(k_all) + copy_groups * n_top))
    offset = None if tensors.offset is None else tensors.offset.repeat(k_all)
    return ModelTensors(X=tensors.X.repeat(k_all, 1), y=responses.transpose(0, 1).reshape(-1),
                        w1_cond=tensors.w1_cond.repeat(k_all), w1_uncond=tensors.w1_uncond.repeat(k_all),
                        levels=tuple(levels), offset=offset)


def stacked_pieces(tensors: ModelTensors, psi: torch.Tensor, term_sizes) -> tuple:
    r"""Linear predictors of ``k`` stacked copies of the model, copy :math:`j` at ``psi[j]``.

    Returns :math:`\eta^0 = X\beta_j + \text{offset}` stacked ``(kN,)`` and, per level,
    :math:`Z\Lambda(\theta_j)` stacked ``(kN, q)``, for ``psi (k, m)`` = :math:`(\beta, \theta_2, ...)` per row.
    """
    p = tensors.n_fixed
    eta0 = tensors.X @ psi[:, :p].transpose(0, 1)             # (N, k)
    if tensors.offset is not None:
        eta0 = eta0 + tensors.offset[:, None]
    zls, pos = [], p
    for lv, ts in zip(tensors.levels, term_sizes):
        k = n_theta(ts)
        lams = lambda_from_theta(psi[:, pos:pos + k], ts)  # (k, q, q)
        zls.append(torch.einsum("nq,kqr->knr", lv.Z, lams).reshape(-1, lv.q))
        pos += k
    return eta0.transpose(0, 1).reshape(-1), zls


class _Stacked:
    """The K' values as stacked copies in one AGQ module; parameters are a ``(K', m)`` matrix.

    Evaluations take a subset of the values (``rows``): a module over those copies only is built
    when the subset changes, so values that have converged cost nothing. The modes of every value
    are kept here between evaluations (warm starts), and so are the row-level derivatives of the
    last accepted evaluation of each value, from which the per-top-group scores follow without
    another evaluation.
    """

    def __init__(self, tensors: ModelTensors, responses: torch.Tensor, family, n_quad: int, first: FitOutput):
        self.tensors, self.responses, self.family, self.n_quad = tensors, responses, family, n_quad
        self.k = responses.shape[1]
        self.p = tensors.n_fixed
        self.term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
        self.sizes = [n_theta(ts) for ts in self.term_sizes]
        self.n_top = tensors.levels[-1].n_groups
        self.w_total = float(tensors.levels[-1].w_cond.sum())
        self.u = [mode[None].repeat(self.k, 1, 1) for mode in first.u]  # per level (K', G_l, q_l)
        n = tensors.n_obs
        self.row_grads = [torch.zeros(self.k, n, dtype=responses.dtype, device=responses.device)]
        self.row_grads += [torch.zeros(self.k, n, lv.q, dtype=responses.dtype, device=responses.device)
                           for lv in tensors.levels]
        self.ell = torch.zeros(self.k, self.n_top, dtype=responses.dtype, device=responses.device)
        self._cache = (None, None)
        self.at = responses.new_full((self.k, self.p + sum(self.sizes)), math.inf)  # where the modes are
        self._all, self._full = tuple(range(self.k)), None
        self.n_evals = 0

    def _module(self, rows: tuple) -> AGQLogLik:
        """The module over the copies ``rows``; the one over every value is kept for the Hessian."""
        key, module = self._cache
        if key != rows:
            module = self._full if rows == self._all and self._full is not None else None
            if module is None:
                module = AGQLogLik(stack_responses(self.tensors, self.responses[:, list(rows)]), self.family,
                                   self.n_quad)
            if rows == self._all:
                self._full = module
            self._cache = (rows, module)
        return module

    def pieces(self, psi: torch.Tensor):
        """:func:`stacked_pieces` of this model."""
        return stacked_pieces(self.tensors, psi, self.term_sizes)

    def value_grad(self, psi: torch.Tensor, rows: torch.Tensor, keep_modes: bool = True, whole: bool = True):
        """Log-likelihoods ``(r,)`` and gradients of the normalised ones ``(r, m)`` of the values
        ``rows`` (bool ``(K',)``) at ``psi[rows]``; also returns the row-level derivatives.

        A module over a new subset costs about two evaluations per value to build, so unless the subset
        is small (or ``whole`` is False) every value is evaluated, the others at their rows of ``psi``,
        and their results are dropped; if that evaluation fails, the subset is evaluated alone."""
        idx = tuple(torch.nonzero(rows).flatten().tolist())
        sel = list(idx)
        ran = self._all if whole and SUBSET_SHARE * len(idx) >= self.k else idx
        module = self._module(ran)
        run = list(ran)
        module.set_modes([u[run].reshape(-1, u.shape[2]) for u in self.u])
        x = psi[run].detach().clone().requires_grad_(True)
        if keep_modes and float((x.detach() - self.at[run]).abs().max()) > WARM_SHIFT:
            self._warm(module, x.detach())
        self.n_evals += 1
        try:
            with torch.enable_grad():
                eta0, zls = self.pieces(x)
                ell = module(eta0, zls)
                grads = torch.autograd.grad(ell.sum(), [x, eta0] + zls)
        except torch.linalg.LinAlgError:  # a curvature not positive definite at some trial point: reject it
            if ran != idx:  # perhaps at a point of a value not asked for
                return self.value_grad(psi, rows, keep_modes, whole=False)
            return self._failed(len(sel))
        ell = ell.detach().reshape(len(run), self.n_top)
        g_psi, g_rows, modes = grads[0], list(grads[1:]), module.modes
        if ran != idx:  # keep the values asked for
            pick = rows.to(psi.device)
            n = self.tensors.n_obs
            ell, g_psi = ell[pick], g_psi[pick]
            g_rows = [g.reshape((len(run), n) + g.shape[1:])[pick].reshape((-1,) + g.shape[1:]) for g in g_rows]
            modes = [m.reshape((len(run), -1) + m.shape[1:])[pick].reshape((-1,) + m.shape[1:]) for m in modes]
        if keep_modes:
            for u, new in zip(self.u, modes):
                u[sel] = new.reshape(len(sel), -1, u.shape[2])
            self.at[sel] = psi[sel].detach()
        return ell.sum(1), g_psi / self.w_total, (ell, g_rows)

    def _warm(self, module: AGQLogLik, x: torch.Tensor) -> None:
        """Bring the modes set in ``module`` close to their own at ``x`` before an evaluation after a long
        step (:func:`~torchmix.likelihood.warm_modes.warm_modes`; the evaluation still searches them to its
        tolerance, so the result does not depend on this start beyond rounding)."""
        with torch.no_grad():
            eta0, zls = self.pieces(x)
        warm_modes(module, eta0, zls)

    def _failed(self, r: int):
        """What :meth:`value_grad` returns for ``r`` values it cannot evaluate: values -inf, NaN gradients."""
        nan = float("nan")
        like = dict(dtype=self.responses.dtype, device=self.responses.device)
        n = r * self.tensors.n_obs
        rows = [torch.full((n,), nan, **like)] + [torch.full((n, lv.q), nan, **like) for lv in self.tensors.levels]
        return (torch.full((r,), -math.inf, **like), torch.full((r, self.p + sum(self.sizes)), nan, **like),
                (torch.full((r, self.n_top), nan, **like), rows))

    def keep(self, rows: torch.Tensor, take: torch.Tensor, extra) -> None:
        """Record the contributions and row derivatives of the accepted values ``take`` (a mask over
        ``rows``) of an evaluation of ``rows``."""
        sel = torch.nonzero(rows).flatten()[take]
        ell, grads = extra
        self.ell[sel] = ell[take]
        n = self.tensors.n_obs
        for store, g in zip(self.row_grads, grads):
            store[sel] = g.reshape((int(rows.sum()), n) + tuple(store.shape[2:]))[take]

    def top_scores(self):
        r"""Per-value beta scores ``(K', G_L, p)`` and Lambda scores (per level ``(K', G_L, q, q)``)
        from the recorded row derivatives: :math:`s_k = \sum_{i\in k} x_i\,\partial\ell/\partial\eta^0_i`,
        :math:`S_k = \sum_{i\in k} z_i(\partial\ell/\partial\tilde z_i)^\top`."""
        top = Grouping(self.tensors.row_top, self.n_top)
        X, n = self.tensors.X, self.tensors.n_obs
        g0 = self.row_grads[0].transpose(0, 1)  # (N, K')
        s_beta = top.weighted(X[:, None, :] * g0[:, :, None], torch.ones_like(g0[:, 0]))
        s_beta = s_beta.reshape(self.n_top, self.k, self.p).transpose(0, 1)
        s_lam = []
        for lv, gz in zip(self.tensors.levels, self.row_grads[1:]):
            prod = lv.Z[:, None, :, None] * gz.transpose(0, 1)[:, :, None, :]  # (N, K', q, q)
            s = top.weighted(prod, torch.ones(n, dtype=X.dtype, device=X.device))
            s_lam.append(s.reshape(self.n_top, self.k, lv.q, lv.q).transpose(0, 1))
        return s_beta, s_lam

    def modes(self, j: int) -> list:
        """Spherical modes of value ``j`` per level."""
        return [u[j].clone() for u in self.u]


def _regular(psi_row: torch.Tensor, p: int, term_sizes) -> bool:
    """Whether no variance parameter is near the boundary and every diagonal of Lambda is positive."""
    fixed, _, singular = boundary_pattern(psi_row[p:], term_sizes, BOUNDARY_TOL)
    if bool(fixed.any()) or singular:
        return False
    pos = p
    for ts in term_sizes:
        k = n_theta(ts)
        if not bool((torch.diagonal(lambda_from_theta(psi_row[pos:pos + k], ts)) > 0).all()):
            return False
        pos += k
    return True


def _fd_hessians(prob: _Stacked, psi: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-value central-difference Hessians ``(K', m, m)`` (rows outside ``rows`` left 0), with the
    step and warm starts of :func:`~torchmix.fit.glmm_se.fd_hessian` (2m batched evaluations)."""
    hess = torch.zeros(prob.k, psi.shape[1], psi.shape[1], dtype=psi.dtype, device=psi.device)
    cols = []
    for r in range(psi.shape[1]):
        h = (psi[:, r].abs() + 1.0) * EPS_QUARTER
        e = torch.zeros_like(psi)
        e[:, r] = h
        g_plus = prob.value_grad(psi + e, rows, keep_modes=False)[1]
        g_minus = prob.value_grad(psi - e, rows, keep_modes=False)[1]
        cols.append((g_plus - g_minus) / (2.0 * h[rows, None]))
    sub = torch.stack(cols, dim=2)
    hess[rows] = 0.5 * (sub + sub.transpose(1, 2))
    return hess


def fit_glmm_many(tensors: ModelTensors, family, responses: torch.Tensor, *, n_quad: int = 13, max_iter: int = 100,
                  tol: float = 1e-8, small_sample: str = "G/(G-1)", progress: bool = True,
                  first: FitOutput | None = None) -> list:
    """Fit the same weighted GLMM to each column of ``responses``.

    Parameters
    ----------
    tensors : the model; its ``y`` is ignored.
    family : as in :func:`~torchmix.fit.glmm.fit_glmm`.
    responses : ``(N, K)`` one column per plausible value (validated by the family).
    n_quad, max_iter, tol, small_sample, progress : as in :func:`~torchmix.fit.glmm.fit_glmm`.
    first : the fit of the first column, when the caller has it already.

    Returns
    -------
    list of K :class:`~torchmix.tensors.FitOutput`, in column order; batched ones have
    ``extra["batched"] = True``.
    """
    k_all = responses.shape[1]

    def fit_alone(k, show_progress=False):
        return fit_glmm(tensors.with_response(responses[:, k]), family, n_quad=n_quad, max_iter=max_iter, tol=tol,
                        small_sample=small_sample, progress=show_progress)

    if first is None:
        first = fit_alone(0, progress)
    if k_all == 1:
        return [first]
    p = tensors.n_fixed
    term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
    psi0, hess0 = first.extra.get("psi"), first.extra.get("hessian")
    usable = (psi0 is not None and hess0 is not None and first.converged and not first.extra.get("boundary")
              and hess0.shape[0] == psi0.numel() and _regular(psi0, p, term_sizes))
    if not usable or int(torch.linalg.cholesky_ex(-hess0)[1]) != 0:  # a boundary or indefinite start: fit one by one
        return [first] + [fit_alone(k) for k in range(1, k_all)]

    # the first fit's psi and Hessian are on standardised columns; the values are fitted on the original ones
    scale = Standardizer.from_tensors(tensors)
    factor = torch.cat([scale.sx, scale.theta_factor()])
    psi0, hess0 = psi0 / factor, factor[:, None] * hess0 * factor[None, :]
    out, exact = [first], hessian_builder(tensors, family, n_quad)
    for cols in even_chunks(list(range(1, k_all)), CHUNK_ROWS // max(tensors.n_obs, 1)):
        done = _fit_values(tensors, family, responses[:, cols], n_quad, first, psi0, hess0, factor, tol,
                           small_sample, exact)
        out += [fit_alone(k) if fit is None else fit for k, fit in zip(cols, done)]
    return out


def even_chunks(items: list, most: int) -> list:
    """``items`` cut into the fewest contiguous chunks of at most ``most`` (at least 1), sizes differing by
    at most one."""
    n = max(1, -(-len(items) // max(most, 1)))
    return [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]


def _fit_values(tensors, family, responses, n_quad, first, psi0, hess0, factor, tol, small_sample,
                exact=None) -> list:
    """Steps 1-3 of the module notes for the values ``responses (N, k)`` stacked together; None for a
    value that must be refitted on its own."""
    p = tensors.n_fixed
    term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
    prob = _Stacked(tensors, responses, family, n_quad, first)
    everyone = torch.ones(prob.k, dtype=torch.bool)
    psi = psi0.expand(prob.k, -1).clone()
    val, g, extra = prob.value_grad(psi, everyone)
    prob.keep(everyone, everyone, extra)
    # 1. quasi-Newton from the first value's Hessian to the convergence tolerance
    psi, val, g, steps, _ = _newton(prob, psi, val, g, (-hess0).expand(prob.k, -1, -1), everyone, tol * STOP,
                                    FIXED_STEPS, update="sr1")
    grad_max = g.abs().amax(1)
    ok = (grad_max < tol) & torch.isfinite(val)
    ok &= torch.tensor([_regular(row, p, term_sizes) for row in psi], dtype=torch.bool)
    # 2. each value's own Hessian at its optimum (as the separate fit computes it)
    if bool(ok.any()):
        hess = closed_form_hessians(exact, prob, psi, ok)
        if hess is None:
            hess = _fd_hessians(prob, psi, ok)
        ok &= torch.linalg.cholesky_ex(-hess)[1] == 0
        s_beta, s_lam = prob.top_scores()
    out = []
    for j in range(prob.k):
        if not bool(ok[j]):
            out.append(None)
            continue
        fixed_theta, zero_tau, _ = boundary_pattern(psi[j, p:], term_sizes, BOUNDARY_TOL)
        free = torch.cat([torch.ones(p, dtype=torch.bool), ~fixed_theta]).to(psi.device)
        est = assemble(psi[j], hess[j], free, fixed_theta, zero_tau, prob.ell[j], s_beta[j], [s[j] for s in s_lam],
                       prob.modes(j), term_sizes, p, prob.w_total, small_sample)
        lnl = est.pop("lnl")
        tau_cov_model = est.pop("tau_cov_model")
        gm = float(grad_max[j])
        out.append(FitOutput(
            **est, sigma=None, lnl=lnl, converged=True, iterations=int(steps[j]),
            message=f"converged (max |gradient| {gm:.3g} < {tol:.3g})",
            extra={"n_quad": prob.n_quad, "grad_max": gm, "n_evals": prob.n_evals, "n_evals_laplace": 0,
                   "lnl_laplace": math.nan, "boundary": [], "adapt": "every_eval", "tau_cov_model": tau_cov_model,
                   "hessian": hess[j] / (factor[:, None] * factor[None, :]),  # on standardised columns,
                   "psi": psi[j] * factor, "batched": True}))                    # as a single fit reports them
    return out

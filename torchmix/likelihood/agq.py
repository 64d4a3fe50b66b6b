r"""Weighted adaptive Gauss-Hermite quadrature (AGQ) log-likelihood, 2 and 3 levels (MATH.md 5).

:class:`AGQLogLik` maps the row-level linear pieces to the per-top-group contributions
:math:`\ell_k = w^{(L)}_k\log\mathcal L^{(L)}_k` of the pseudo log-likelihood (2.1)/(2.2):

* :math:`\eta^0 = X\beta` (``(N,)``) and, per level, :math:`\tilde Z^{(l)} = Z^{(l)}\Lambda_l`
  (``(N, q_l)``; the parameters enter only through these, because the spherical prior
  :math:`-\tfrac12\|u\|^2` does not involve :math:`\Lambda`). Per-top-group scores therefore
  follow from one backward pass (:meth:`AGQLogLik.top_scores`).
* Two levels, (5.1): :math:`\log\mathcal L_j \approx -\log|R_j| + \mathrm{LSE}_{\mathbf m}
  [\log\omega_{\mathbf m}+\tfrac12\|z_{\mathbf m}\|^2+g_j(\hat u_j+R_j^{-1}z_{\mathbf m})]` with
  the product grid of :mod:`torchmix.quadrature` (:math:`M^{q}` nodes).
* Three levels, (5.2): joint mode of each top group, nested change of variables
  :math:`v=\hat v+Q_k^{-1}z'`, :math:`u_j=\hat u_j-C_j(v-\hat v)+R_j^{-1}z`.
* ``n_quad = 1`` is the (weighted) Laplace approximation through the same code.

Adaptation and gradients (MATH.md 5.6), strategy ``every_eval`` with exact gradients:
at each evaluation the modes are found without a graph by batched Newton iterations
(:mod:`torchmix.likelihood.modes`, warm-started from the previous evaluation), then one
differentiable Newton step :math:`\hat u^\ast=\hat u+H_{\rm obs}(\hat u)^{-1}\nabla g(\hat u)` is taken
inside the graph with the observed curvature :math:`H_{\rm obs}` held constant. Its value equals
:math:`\hat u` to rounding and its derivative equals the implicit derivative
:math:`d\hat u/d\psi` (the term from differentiating :math:`H_{\rm obs}` multiplies
:math:`\nabla g(\hat u)=0`). The quadrature scale :math:`R` (and :math:`Q`, :math:`C` for three levels)
is the Cholesky factor of the Fisher-weighted curvature at :math:`\hat u^\ast`, built inside the
graph, so autograd differentiates the evaluated objective exactly.

The two-level adaptation step and node pass have hand-written backward passes
(:mod:`torchmix.likelihood.adapt`, :mod:`torchmix.likelihood.nodepass`); the three-level path is
plain autograd.

Memory: the node pass needs :math:`N\times M^{q}` (three levels: :math:`N\times M^{q_3}\times M^{q_2}`)
values. Two levels: nodes are processed in cache-sized chunks and the per-element derivative is kept
for the backward pass only while :math:`N M^q \le` ``max_chunk_elems`` (recomputed otherwise); with a
canonical link the rows are processed in blocks of at most ``max_chunk_elems`` elements (on the CPU at
most ``FUSED_BLOCK_ELEMS``, cache-sized; a GPU takes large blocks, few kernel launches), value and
derivative together, and nothing of size :math:`N M^q` is kept. Three
levels: outer nodes are processed in chunks of at most ``max_chunk_elems`` elements, each recomputed
in the backward pass (``torch.utils.checkpoint``) when there is more than one. Memory stays bounded.

Multimodality: for links whose :math:`\log f` is not concave (e.g. cauchit) a group's :math:`g_j` can
have several maxima. Two levels: when a quadrature node has a higher :math:`g_j` than the mode found,
the mode search restarts from that node (at most ``MODE_RESTARTS`` times), so the value does not
depend on the warm start. The three-level path does not make this check.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..quadrature import check_n_quad, product_grid
from ..tensors import ModelTensors
from .adapt import adapt2
from .fused2 import FusedData, fused_forward2
from .kernels import canonical_kernel
from .rowlogf import row_logf_fn
from .modes import (arrow_blocks, arrow_factor, arrow_gradients, arrow_solve, linear_predictor, lower_solve,
                    newton_modes_2, newton_modes_3, solve_upper_t, warn_modes)
from .modes import chol as cholesky
from .nodepass import NodePassData, node_pass
from .segments import Grouping

__all__ = ["AGQLogLik", "DEFAULT_CHUNK_ELEMS"]

DEFAULT_CHUNK_ELEMS = 2 ** 24
CACHE_ELEMS = 2 ** 19  # column chunks of the fused two-level node pass (4 MiB of float64)
FUSED_BLOCK_ELEMS = 2 ** 18  # CPU row blocks of the canonical-link node pass (2 MiB of float64 per array: cache-sized)
MODE_RESTARTS = 3


def _upper_solve_nodes(chol: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    r""":math:`R^{-1}z_{\mathbf m}` with :math:`R = L^\top`: ``chol (G, q, q)``, ``nodes (M, q)`` -> ``(G, M, q)``."""
    rhs = nodes.transpose(0, 1).expand(chol.shape[0], -1, -1)
    return solve_upper_t(chol, rhs).transpose(-1, -2)


def _log_det_chol(chol: torch.Tensor) -> torch.Tensor:
    """``log|L|`` from a batched lower Cholesky factor, ``(G,)``."""
    return torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def _row_offsets(zl: torch.Tensor, offsets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r"""Per row :math:`\tilde z_i\cdot d_{g(i),\dots}`: ``zl (N, q)``, ``offsets (G, ..., q)`` -> ``(N, ...)``."""
    if zl.shape[1] == 1:
        gathered = offsets[..., 0].index_select(0, g)
        return zl[:, 0].reshape((-1,) + (1,) * (gathered.dim() - 1)) * gathered
    gathered = offsets.index_select(0, g)
    shape = (zl.shape[0],) + (1,) * (gathered.dim() - 2) + (zl.shape[1],)
    return (zl.reshape(shape) * gathered).sum(-1)


def _same(cached, inputs, kappa) -> bool:
    """Whether ``inputs`` (and a non-tensor ``kappa``) are exactly those of a cached evaluation."""
    tensors, other = cached
    if len(tensors) != len(inputs) or other != (kappa if not torch.is_tensor(kappa) else None):
        return False
    return all(a.shape == b.shape and torch.equal(a, b.detach()) for a, b in zip(tensors, inputs))


class AGQLogLik(nn.Module):
    r"""The AGQ pseudo log-likelihood of a 2- or 3-level GLMM as a module.

    Parameters
    ----------
    tensors : :class:`~torchmix.tensors.ModelTensors` (response already validated).
    family : a :class:`~torchmix.families.Family`.
    n_quad : Gauss-Hermite points per random effect (1 = Laplace).
    max_chunk_elems : bound on the elements of one node-pass chunk.
    mode_tol, mode_max_iter : stopping rule of the Newton iterations for the modes.
    fast : with a built-in family and its canonical link (Bernoulli-logit, Poisson-log), two levels go
        through the fused evaluation of :mod:`torchmix.likelihood.fused2` and three levels evaluate
        :math:`\log f` at the nodes through :mod:`torchmix.likelihood.rowlogf` (same value and gradient
        to rounding); False forces the generic path.

    Call ``module(eta0, zls, kappa=None)`` with ``eta0 (N,)`` and ``zls`` a list (level 2 first)
    of ``(N, q_l)`` tensors; it returns the ``(G_L,)`` vector of :math:`\ell_k`. ``kappa`` is the
    dispersion (gaussian :math:`\sigma^2`; ignored by the other families). The modes of the last
    call (``modes``) warm-start the next one.
    """

    def __init__(self, tensors: ModelTensors, family, n_quad: int = 13, *,
                 max_chunk_elems: int = DEFAULT_CHUNK_ELEMS, mode_tol: float = 1e-10, mode_max_iter: int = 100,
                 fast: bool = True):
        super().__init__()
        n_levels = tensors.n_levels
        if n_levels not in (2, 3):
            raise ConfigError(f"non-gaussian families support 2 or 3 levels; the model has {n_levels} levels")
        self.family = family
        self.n_quad = check_n_quad(n_quad)
        self.n_levels = n_levels
        self.max_chunk_elems = int(max_chunk_elems)
        self.mode_tol = float(mode_tol)
        self.mode_max_iter = int(mode_max_iter)
        self.mode_iterations = 0
        self._kernel = canonical_kernel(family) if fast and n_levels == 2 else None
        self._row_logf = row_logf_fn(family) if fast and n_levels == 3 else None
        dt, dev = tensors.X.dtype, tensors.X.device
        lv2 = tensors.levels[0]
        self.register_buffer("X", tensors.X, persistent=False)
        self.register_buffer("offset", tensors.offset, persistent=False)  # None or (N,)
        self.register_buffer("y", tensors.y, persistent=False)
        self.register_buffer("w1", tensors.w1_cond, persistent=False)
        self.register_buffer("g2", lv2.group, persistent=False)
        self.register_buffer("w2", lv2.w_cond, persistent=False)
        self.register_buffer("Z2", lv2.Z, persistent=False)
        self.n2, self.q2 = int(lv2.n_groups), lv2.q
        grid2 = product_grid(self.n_quad, self.q2, dtype=dt, device=dev)
        self.register_buffer("nodes2", grid2.nodes, persistent=False)
        self.register_buffer("lwn2", grid2.log_weights_plus_norm, persistent=False)
        self.register_buffer("u2", torch.zeros(self.n2, self.q2, dtype=dt, device=dev), persistent=False)
        if n_levels == 3:
            lv3 = tensors.levels[1]
            self.register_buffer("g3", lv3.group, persistent=False)
            self.register_buffer("parent", lv2.parent, persistent=False)
            self.register_buffer("w3", lv3.w_cond, persistent=False)
            self.register_buffer("Z3", lv3.Z, persistent=False)
            self.n3, self.q3 = int(lv3.n_groups), lv3.q
            grid3 = product_grid(self.n_quad, self.q3, dtype=dt, device=dev)
            self.register_buffer("nodes3", grid3.nodes, persistent=False)
            self.register_buffer("lwn3", grid3.log_weights_plus_norm, persistent=False)
            self.register_buffer("u3", torch.zeros(self.n3, self.q3, dtype=dt, device=dev), persistent=False)
            self.register_buffer("row_top", lv3.group, persistent=False)
        else:
            self.register_buffer("row_top", lv2.group, persistent=False)
            self._pass_data = None

    def _node_data(self) -> NodePassData:
        data = getattr(self, "_pass_data", None)
        if data is None or data.y is not self.y or data.sums.index is not self.g2:
            data = NodePassData(self.family, self.y, self.w1, self._grouping("g2"),
                                min(self.max_chunk_elems, CACHE_ELEMS), save_elems=self.max_chunk_elems)
            self._pass_data = data
        return data

    def _fused_data(self) -> FusedData:
        data = getattr(self, "_fused", None)
        if data is None or data.y is not self.y or data.g.index is not self.g2:
            data = FusedData(self._kernel, self.y, self.w1, self._grouping("g2"),
                             min(self.max_chunk_elems, FUSED_BLOCK_ELEMS if self.y.device.type == "cpu"
                                 else self.max_chunk_elems))
            self._fused = data
        return data

    def _grouping(self, name: str) -> Grouping:
        """Cached segment-sum helpers (rebuilt when the module moves to another device)."""
        index, n = {"g2": (self.g2, self.n2), "top": (self.row_top, self.n_top),
                    "g3": (getattr(self, "g3", None), getattr(self, "n3", 0)),
                    "parent": (getattr(self, "parent", None), getattr(self, "n3", 0))}[name]
        cache = self.__dict__.setdefault("_groupings", {})
        hit = cache.get(name)
        if hit is None or hit.index is not index:
            hit = cache[name] = Grouping(index, n)
        return hit

    # ------------------------------------------------------------------ state and conveniences
    @property
    def n_top(self) -> int:
        return self.n3 if self.n_levels == 3 else self.n2

    @property
    def modes(self) -> list:
        """Spherical modes per level (level 2 first) from the last evaluation, detached."""
        return [self.u2.clone()] + ([self.u3.clone()] if self.n_levels == 3 else [])

    def set_modes(self, modes: Sequence[torch.Tensor]) -> None:
        """Warm start for the next evaluation."""
        self.u2 = modes[0].detach().clone().to(self.u2)
        if self.n_levels == 3:
            self.u3 = modes[1].detach().clone().to(self.u3)

    def reset_modes(self) -> None:
        self.u2 = torch.zeros_like(self.u2)
        if self.n_levels == 3:
            self.u3 = torch.zeros_like(self.u3)

    def pieces(self, beta: torch.Tensor, lambdas: Sequence[torch.Tensor]):
        r""":math:`\eta^0 = X\beta` and :math:`\tilde Z^{(l)} = Z^{(l)}\Lambda_l` from parameters."""
        zs = [self.Z2] + ([self.Z3] if self.n_levels == 3 else [])
        eta0 = self.X @ beta if self.offset is None else self.X @ beta + self.offset
        return eta0, [z @ lam for z, lam in zip(zs, lambdas)]

    def loglik(self, beta: torch.Tensor, lambdas: Sequence[torch.Tensor], kappa=None) -> torch.Tensor:
        """``(G_L,)`` contributions at :math:`(\\beta, \\Lambda_2, [\\Lambda_3])` (absolute factors).

        A call without gradient at exactly the parameters of the previous call, with the modes that
        call left (no evaluation or :meth:`set_modes` since), returns that call's values again.
        """
        inputs = [beta, *lambdas] + ([kappa] if torch.is_tensor(kappa) else [])
        key = (self.u2, getattr(self, "u3", None))
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
            hit = self.__dict__.get("_value_cache")
            if hit is not None and hit[0][0] is key[0] and hit[0][1] is key[1] and _same(hit[1], inputs, kappa):
                return hit[2].clone()
        eta0, zls = self.pieces(beta, lambdas)
        ell = self(eta0, zls, kappa)
        self.__dict__["_value_cache"] = ((self.u2, getattr(self, "u3", None)),
                                         ([t.detach().clone() for t in inputs], kappa if not torch.is_tensor(kappa)
                                          else None), ell.detach())
        return ell

    def top_scores(self, beta: torch.Tensor, lambdas: Sequence[torch.Tensor], kappa=None):
        r"""Per-top-group contributions and scores from one backward pass.

        Returns
        -------
        ell : ``(G_L,)`` detached :math:`\ell_k`.
        s_beta : ``(G_L, p)`` :math:`\partial\ell_k/\partial\beta`.
        s_lambda : list per level of ``(G_L, q_l, q_l)`` :math:`\partial\ell_k/\partial\Lambda_l`
            (all entries; pick the free ones).
        """
        with torch.no_grad():
            eta0, zls = self.pieces(beta.detach(), [lam.detach() for lam in lambdas])
        eta0 = eta0.requires_grad_(True)
        zls = [z.requires_grad_(True) for z in zls]
        with torch.enable_grad():
            ell = self(eta0, zls, kappa)
            grads = torch.autograd.grad(ell.sum(), [eta0] + zls)
        top = self._grouping("top")
        s_beta = top.sum(self.X * grads[0][:, None])
        zs = [self.Z2] + ([self.Z3] if self.n_levels == 3 else [])
        s_lam = [top.sum(z[:, :, None] * gz[:, None, :]) for z, gz in zip(zs, grads[1:])]
        return ell.detach(), s_beta, s_lam

    # ------------------------------------------------------------------ forward
    def forward(self, eta0: torch.Tensor, zls: Sequence[torch.Tensor], kappa=None) -> torch.Tensor:
        if len(zls) != self.n_levels - 1:
            raise ConfigError(f"expected {self.n_levels - 1} random-effect blocks, got {len(zls)}")
        if self.n_levels == 2:
            return self._forward2(eta0, zls[0], kappa)
        return self._forward3(eta0, zls[0], zls[1], kappa)

    def _n_chunk(self, per_node: int, n_nodes: int) -> int:
        return max(1, min(n_nodes, self.max_chunk_elems // max(per_node, 1)))

    # ---- two levels
    def _forward2(self, eta0, zl, kappa, restarts: int = MODE_RESTARTS):
        if self._kernel is not None and zl.shape[1] > 0:  # log-concave: no restarts needed
            return fused_forward2(self, eta0, zl)
        fam, y, w1, n = self.family, self.y, self.w1, self.n2
        g = self._grouping("g2")
        u_hat, it, ok, at_mode = newton_modes_2(fam, y, w1, g, eta0, zl, self.u2, kappa, self.mode_tol,
                                                self.mode_max_iter)
        self.mode_iterations = it
        warn_modes(ok, it)
        # one differentiable Newton step with the observed curvature held fixed (implicit derivative)
        u_star, eta_star, hess = adapt2(fam, y, w1, g, eta0, zl, u_hat, kappa, at_mode=at_mode)
        chol = cholesky(hess)
        self.u2 = u_star.detach()
        offsets = _upper_solve_nodes(chol, self.nodes2)  # (G, M, q)
        prior = -0.5 * ((u_star[:, None, :] + offsets) ** 2).sum(-1)  # (G, M)
        if torch.is_tensor(kappa) and kappa.requires_grad:  # gradient in the dispersion: plain autograd
            n_nodes = offsets.shape[1]
            step = self._n_chunk(y.shape[0] * max(self.q2, 1), n_nodes)
            sums = []
            for m0 in range(0, n_nodes, step):
                args = (eta_star, zl, offsets[:, m0:m0 + step], kappa)
                if step < n_nodes and torch.is_grad_enabled():
                    sums.append(checkpoint(self._node_sums2, *args, use_reentrant=False))
                else:
                    sums.append(self._node_sums2(*args))
            node_sums = torch.cat(sums, dim=1)
        else:
            lower_inv_zl = lower_solve(chol.index_select(0, g.index), zl[:, :, None])[:, :, 0]  # R^{-T} zl
            node_sums = node_pass(eta_star, lower_inv_zl, self.nodes2, self._node_data(), kappa)
        g_nodes = prior + node_sums  # g_j at every node
        if restarts > 0 and g_nodes.shape[1] > 1:
            better = self._better_nodes(g_nodes.detach(), eta_star.detach(), u_star.detach(), kappa)
            if better is not None:  # a node beats the mode: the mode was local; restart from that node
                best = g_nodes.detach().argmax(1)
                nodes = (u_star[:, None, :] + offsets).detach()[torch.arange(n, device=best.device), best]
                self.u2 = torch.where(better[:, None], nodes, u_star.detach())
                return self._forward2(eta0, zl, kappa, restarts - 1)
        total = self.lwn2 + g_nodes
        log_l = torch.logsumexp(total, dim=1) - _log_det_chol(chol)
        return self.w2 * log_l

    def _better_nodes(self, g_nodes, eta_star, u_star, kappa):
        r"""Groups where some quadrature node has a higher :math:`g_j` than the mode found (only possible
        when :math:`g_j` is multimodal, i.e. for links that are not log-concave); None if there is none."""
        with torch.no_grad():
            if self.n_quad % 2 == 1:  # the centre node z = 0 sits at the mode
                g_hat = g_nodes[:, (g_nodes.shape[1] - 1) // 2]
            else:
                g_hat = (self._grouping("g2").sum(self.w1 * self.family.logf(self.y, eta_star, kappa))
                         - 0.5 * (u_star * u_star).sum(-1))
            better = g_nodes.max(1).values > g_hat + 1e-9 * (1.0 + g_hat.abs())
        return better if bool(better.any()) else None

    def _node_sums2(self, eta_star, zl, offsets, kappa):
        eta = eta_star[:, None] + _row_offsets(zl, offsets, self.g2)  # (N, m)
        lf = self.w1[:, None] * self.family.logf(self.y[:, None], eta, kappa)
        return self._grouping("g2").sum(lf)

    # ---- three levels
    def _forward3(self, eta0, zl2, zl3, kappa):
        fam, y, w1 = self.family, self.y, self.w1
        g2, g3, parent, w2 = self._grouping("g2"), self._grouping("g3"), self._grouping("parent"), self.w2
        u_hat, v_hat, it, ok = newton_modes_3(fam, y, w1, g2, g3, parent, w2, eta0, zl2, zl3, self.u2, self.u3, kappa,
                                              self.mode_tol, self.mode_max_iter)
        self.mode_iterations = it
        warn_modes(ok, it)
        eta_hat = linear_predictor(eta0, [(zl2, u_hat, g2), (zl3, v_hat, g3)])
        gamma_u, gamma_v = arrow_gradients(fam, y, w1, eta_hat, zl2, zl3, g2, parent, w2, u_hat, v_hat, kappa)
        with torch.no_grad():
            fac_obs, b_obs = self._observed_arrow(eta_hat.detach(), zl2.detach(), zl3.detach(), kappa)
        du, dv = arrow_solve(fac_obs, gamma_u, gamma_v, b_obs, w2, parent)
        u_star, v_star = u_hat + du, v_hat + dv
        eta_star = linear_predictor(eta0, [(zl2, u_star, g2), (zl3, v_star, g3)])
        a, b, d = arrow_blocks(w1, fam.fisher_w(eta_star, kappa), zl2, zl3, g2)
        fac = arrow_factor(a, b, d, w2, parent)
        self.u2, self.u3 = u_star.detach(), v_star.detach()

        outer = _upper_solve_nodes(fac.chol_s, self.nodes3)  # (G3, M3, q3)
        inner = _upper_solve_nodes(fac.chol_a, self.nodes2)  # (G2, M2, q2)
        outer_prior = -0.5 * ((v_star[:, None, :] + outer) ** 2).sum(-1)  # (G3, M3)
        n_outer, n_inner = outer.shape[1], inner.shape[1]
        step = self._n_chunk(y.shape[0] * n_inner * max(self.q2, 1), n_outer)
        parts = []
        for m0 in range(0, n_outer, step):
            args = (eta_star, zl2, zl3, u_star, fac.a_inv_b, inner, outer[:, m0:m0 + step], kappa)
            if step < n_outer and torch.is_grad_enabled():
                parts.append(checkpoint(self._inner3, *args, use_reentrant=False))
            else:
                parts.append(self._inner3(*args))
        inner_log = torch.cat(parts, dim=1)  # (G2, M3)
        total = self.lwn3 + outer_prior + parent.sum(w2[:, None] * inner_log)
        log_l = (torch.logsumexp(total, dim=1) - _log_det_chol(fac.chol_s)
                 - parent.sum(w2 * _log_det_chol(fac.chol_a)))
        return self.w3 * log_l

    def _observed_arrow(self, eta, zl2, zl3, kappa):
        fam, w1 = self.family, self.w1
        curv = fam.derivs(self.y, eta, kappa)[2]
        g2, args = self._grouping("g2"), (self.w2, self._grouping("parent"))
        try:
            a, b, d = arrow_blocks(w1, curv, zl2, zl3, g2)
            return arrow_factor(a, b, d, *args), b
        except torch.linalg.LinAlgError:
            a, b, d = arrow_blocks(w1, curv.clamp_min(0.0), zl2, zl3, g2)
            return arrow_factor(a, b, d, *args), b

    def _inner3(self, eta_star, zl2, zl3, u_star, a_inv_b, inner, outer_c, kappa):
        r"""Inner log-integrals :math:`I_{j\mathbf m}` for a chunk of outer nodes, ``(G2, mc)``."""
        parent, g2, g3 = self.parent, self.g2, self.g3
        shift = -(a_inv_b[:, None, :, :] @ outer_c.index_select(0, parent)[:, :, :, None])[..., 0]  # (G2, mc, q2)
        d = shift[:, :, None, :] + inner[:, None, :, :]  # (G2, mc, M2, q2)
        prior = -0.5 * ((u_star[:, None, None, :] + d) ** 2).sum(-1)  # (G2, mc, M2)
        eta = (eta_star[:, None, None] + _row_offsets(zl3, outer_c, g3)[:, :, None]
               + _row_offsets(zl2, d, g2))  # (N, mc, M2)
        if self._row_logf is not None:  # canonical link: value and kept derivative in one pass
            lf = self._row_logf(eta, self.y, self.w1)
        else:
            lf = self.w1[:, None, None] * self.family.logf(self.y[:, None, None], eta, kappa)
        vals = self.lwn2 + prior + self._grouping("g2").sum(lf)
        return torch.logsumexp(vals, dim=-1)

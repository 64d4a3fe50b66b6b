r"""Closed-form weighted log-likelihood of the gaussian (identity-link) mixed model.

MATH.md section 4. Per level-2 group :math:`j` the raw weighted crossproduct of
:math:`M_j = [Z^{(2)}_j | \dots | Z^{(L)}_j | X_j | y_j]` is computed once,

.. math:: CP_j = M_j^\top W^c_j M_j,\qquad W^c_j = \operatorname{diag}(w_{i\mid j}),

so one evaluation for a new :math:`\theta` costs :math:`O(G_2 d^3)` whatever the number of rows.
Levels are integrated out bottom-up by batched Cholesky factors and Schur complements; children
enter their parent scaled by their conditional weight and log-determinants accumulate with
unconditional weights. The top-level pieces give

.. math::
    \hat\beta = K_{\beta\beta}^{-1}k_{\beta y},\quad r^2 = k_{yy} - k_{\beta y}^\top\hat\beta,\quad
    \hat\sigma^2 = r^2/N_w,\quad
    \ell_p(\theta) = -\text{logdet}(\theta) - \tfrac{N_w}{2}\big(1 + \log(2\pi\hat\sigma^2)\big).

Pure tensor math: no pandas, no files.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..covariance import lambda_from_theta
from ..tensors import ModelTensors
from .crossproducts import _crossproducts_and_counts, weighted_crossproducts
from .smallmat import cholesky_lower, solve_lower

__all__ = ["GaussianLikelihood", "gaussian_loglik_by_group", "weighted_crossproducts"]


@dataclass
class _Pass:
    """Intermediate results of one bottom-up pass (kept for the modes)."""

    chol: list        # per level: (G_l, q_l, q_l) lower Cholesky factors of A
    v: list           # per level: (G_l, q_l, r_l) = L^{-1} Lambda^T C_or (rest unscaled)
    rr_top: torch.Tensor     # (G_L, p+1, p+1) top groups' C_rr (their S_k = C_rr - V^T V)
    logdet_top: torch.Tensor  # (G_L,) weighted log-determinants summed into top groups
    lams: list        # per level: (q_l, q_l) Lambda_l


class GaussianLikelihood(nn.Module):
    r"""Weighted marginal log-likelihood of a gaussian mixed model with any number of levels.

    Parameters
    ----------
    tensors : :class:`~torchmix.tensors.ModelTensors`
        The model; its crossproducts are computed once here.

    Notes
    -----
    ``thetas`` arguments are lists with one ``(n_theta_l,)`` tensor per level holding the
    *relative* Cholesky entries: :math:`\Sigma_l = \sigma^2\Lambda_l\Lambda_l^\top`.
    """

    def __init__(self, tensors: ModelTensors, responses: torch.Tensor | None = None):
        super().__init__()
        self.tensors = tensors
        self.term_sizes = [tuple(lv.term_sizes) for lv in tensors.levels]
        self.q = [lv.q for lv in tensors.levels]
        self.p = tensors.n_fixed
        lv2 = tensors.levels[0]
        ys = tensors.y[:, None] if responses is None else responses
        if tensors.offset is not None:  # identity link: fit y - offset
            ys = ys - tensors.offset[:, None]
        self.n_responses = int(ys.shape[1])
        m = [lv.Z for lv in tensors.levels] + [tensors.X, ys]
        cp, self.counts2 = _crossproducts_and_counts(m, tensors.w1_cond, lv2.group, lv2.n_groups)
        top = tensors.levels[-1]
        # total weight of each top group, through the level-2 groups (no gather over the rows)
        n_w2 = torch.zeros(lv2.n_groups, dtype=cp.dtype, device=cp.device).index_add(0, lv2.group, tensors.w1_uncond)
        self.n_w_top = torch.zeros(top.n_groups, dtype=cp.dtype, device=cp.device).index_add(0, lv2.top, n_w2)
        self.n_w2 = n_w2
        self.n_w = float(tensors.w1_uncond.sum())
        # level-2 blocks (own effects o, rest r) for every response, and the part of the next
        # level's matrix that does not depend on theta: sum over children of w_{g|h} CP_rr
        q = lv2.q
        self.c_oo = cp[:, :q, :q].contiguous()
        c_or, c_rr = cp[:, :q, q:], cp[:, q:, q:]
        if lv2.parent is None:
            const = (lv2.w_uncond @ c_rr.reshape(c_rr.shape[0], -1)).reshape(c_rr.shape[1:])
        else:
            const = torch.zeros(tensors.levels[1].n_groups, *c_rr.shape[1:], dtype=cp.dtype, device=cp.device)
            const = const.index_add(0, lv2.parent, lv2.w_cond[:, None, None] * c_rr)
        self._all = (c_or, c_rr, const)
        if self.n_responses == 1:  # the blocks of response 0 are the blocks themselves
            self.c_or, self.c_rr, self.rr_const = c_or.contiguous(), c_rr.contiguous(), const
        else:
            self.c_or, self.c_rr, self.rr_const = (t[0] for t in self.response_blocks([0]))

    def rescaled(self, tensors: ModelTensors, scale: torch.Tensor) -> "GaussianLikelihood":
        r"""The likelihood of ``tensors``, a model equal to this one but with the columns of
        :math:`[Z^{(2)} | \dots | Z^{(L)} | X]` divided by ``scale``, from this one's crossproducts.

        Every crossproduct entry of columns :math:`a, b` is divided by :math:`s_as_b` (responses keep
        scale 1): no pass over the rows. ``tensors`` must hold those divided columns and the same
        groups and weights (it is the model the new likelihood reports).
        """
        new = GaussianLikelihood.__new__(GaussianLikelihood)
        nn.Module.__init__(new)
        new.tensors, new.term_sizes, new.q, new.p = tensors, self.term_sizes, self.q, self.p
        new.n_responses, new.n_w_top, new.n_w, new.n_w2 = self.n_responses, self.n_w_top, self.n_w, self.n_w2
        new.counts2 = self.counts2
        s = torch.cat([scale.to(self.c_oo), torch.ones(self.n_responses, dtype=self.c_oo.dtype,
                                                        device=self.c_oo.device)])
        q = self.c_oo.shape[-1]
        so, sr = s[:q], s[q:]
        c_or, c_rr, const = self._all
        new.c_oo = self.c_oo / (so[:, None] * so[None, :])
        new._all = (c_or / (so[:, None] * sr[None, :]), c_rr / (sr[:, None] * sr[None, :]),
                    const / (sr[:, None] * sr[None, :]))
        if new.n_responses == 1:
            new.c_or, new.c_rr, new.rr_const = new._all
        else:
            new.c_or, new.c_rr, new.rr_const = (t[0] for t in new.response_blocks([0]))
        return new

    def response_blocks(self, ks: Sequence[int]) -> tuple:
        """The response-dependent blocks ``(c_or, c_rr, rr_const)`` for responses ``ks``, stacked.

        Rest variables of response ``k`` are the shared ones followed by its own ``y`` column.
        Shapes ``(len(ks), G_2, q, r)``, ``(len(ks), G_2, r, r)`` and ``(len(ks), ...)``.
        """
        c_or, c_rr, const = self._all
        r0 = c_or.shape[-1] - self.n_responses
        idx = torch.stack([torch.cat([torch.arange(r0), torch.tensor([r0 + k])]) for k in ks]).to(c_or.device)
        pick_or = c_or[:, :, idx].permute(2, 0, 1, 3)                     # (K, G, q, r)
        pick_rr = c_rr[:, idx[:, :, None], idx[:, None, :]].permute(1, 0, 2, 3)
        if const.dim() == 2:
            pick_const = const[idx[:, :, None], idx[:, None, :]]
        else:
            pick_const = const[:, idx[:, :, None], idx[:, None, :]].permute(1, 0, 2, 3)
        return pick_or.contiguous(), pick_rr.contiguous(), pick_const.contiguous()

    @contextmanager
    def using(self, c_or: torch.Tensor, c_rr: torch.Tensor, rr_const: torch.Tensor):
        """Temporarily evaluate with another response's blocks (see :meth:`response_blocks`);
        the blocks may be batched tensors inside ``torch.func.vmap``."""
        saved = (self.c_or, self.c_rr, self.rr_const)
        self.c_or, self.c_rr, self.rr_const = c_or, c_rr, rr_const
        try:
            yield self
        finally:
            self.c_or, self.c_rr, self.rr_const = saved

    def integrate(self, thetas: Sequence[torch.Tensor]) -> _Pass:
        r"""Integrate all random effects out, bottom-up (MATH.md 4.2).

        Works in unscaled coordinates for the rest variables: with :math:`C` a group's
        crossproduct over (own effects o, rest r) and :math:`S_r` the rest's scaling,
        :math:`A = \Lambda^\top C_{oo}\Lambda + I = LL^\top`, :math:`V = L^{-1}\Lambda^\top C_{or}` and
        the Schur complement is :math:`S_r^\top(C_{rr} - V^\top V)S_r`; the rest scaling is applied
        where the next level uses it, so each level touches only :math:`q\times q` and
        :math:`q\times r` blocks per group.

        The top level's complements :math:`S_k = C_{rr,k} - V_k^\top V_k` are not formed: the
        pass keeps :math:`C_{rr}` and :math:`V` of the top groups, from which :meth:`k_top` and
        :meth:`loglik_by_group` take what they need.
        """
        levels = self.tensors.levels
        c_oo, c_or, c_rr = self.c_oo, self.c_or, self.c_rr
        dtype, device = c_oo.dtype, c_oo.device
        logdet_top = torch.zeros(levels[-1].n_groups, dtype=dtype, device=device)
        chols, vs, lams = [], [], []
        for idx, (lv, theta, ts) in enumerate(zip(levels, thetas, self.term_sizes)):
            q = lv.q
            lam = lambda_from_theta(theta, ts)
            a = torch.einsum("ja,gjk,kb->gab", lam, c_oo, lam) + torch.eye(q, dtype=dtype, device=device)
            b = torch.einsum("ja,gjk->gak", lam, c_or)
            chol = cholesky_lower(a)
            ld = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            logdet_top = logdet_top.index_add(0, lv.top, lv.w_uncond * ld)
            v = solve_lower(chol, b)
            chols.append(chol)
            vs.append(v)
            lams.append(lam)
            if idx + 1 < len(levels):
                nxt = levels[idx + 1]
                vtv = torch.einsum("g,gqa,gqb->gab", lv.w_cond, v, v)
                agg = torch.zeros(nxt.n_groups, *vtv.shape[1:], dtype=dtype, device=device)
                if idx == 0:
                    c = self.rr_const - agg.index_add(0, lv.parent, vtv)
                else:
                    c = agg.index_add(0, lv.parent, lv.w_cond[:, None, None] * c_rr - vtv)
                qn = nxt.q
                c_oo, c_or, c_rr = c[:, :qn, :qn], c[:, :qn, qn:], c[:, qn:, qn:]
        return _Pass(chol=chols, v=vs, rr_top=c_rr, logdet_top=logdet_top, lams=lams)

    def k_top(self, ps: _Pass) -> torch.Tensor:
        r""":math:`K_{top} = \sum_k w^{(L)}_k (C_{rr,k} - V_k^\top V_k)`, shape ``(p+1, p+1)``."""
        w = self.tensors.levels[-1].w_uncond
        rr = self.rr_const if len(self.tensors.levels) == 1 else torch.einsum("g,gab->ab", w, ps.rr_top)
        v = ps.v[-1]
        return rr - torch.einsum("gqa,gqb->ab", v * w[:, None, None], v)

    # ------------------------------------------------------------------ profiled
    def profile(self, thetas: Sequence[torch.Tensor]):
        r"""Profiled quantities at ``thetas``: :math:`(\ell_p, \hat\beta, \hat\sigma^2, K_{top})`."""
        ps = self.integrate(thetas)
        kt = self.k_top(ps)
        p = self.p
        kbb, kby, kyy = kt[:p, :p], kt[:p, p], kt[p, p]
        beta = torch.linalg.solve(kbb, kby)
        r2 = kyy - kby @ beta
        sigma2 = r2 / self.n_w
        ell = -ps.logdet_top.sum() - 0.5 * self.n_w * (1.0 + torch.log(2 * math.pi * sigma2))
        return ell, beta, sigma2, kt, ps

    def forward(self, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
        r"""Profiled log-likelihood :math:`\ell_p(\theta)` (4.2), a 0-d tensor."""
        return self.profile(thetas)[0]

    # ------------------------------------------------------------------ unprofiled
    def loglik_by_group(self, beta: torch.Tensor, thetas: Sequence[torch.Tensor], sigma: torch.Tensor) -> torch.Tensor:
        r"""Top-group contributions :math:`\ell_k(\beta,\theta,\sigma)` of (4.3), shape ``(G_L,)``.

        .. math:: \ell_k = -\text{logdet}_k - \tfrac{N_{w,k}}{2}\log(2\pi\sigma^2)
                  - \tfrac{w^{(L)}_k}{2\sigma^2}[\beta;-1]^\top S_k[\beta;-1]
        """
        ps = self.integrate(thetas)
        xi = torch.cat([beta, -torch.ones(1, dtype=beta.dtype, device=beta.device)])
        vxi = ps.v[-1] @ xi
        quad = torch.einsum("i,kij,j->k", xi, ps.rr_top, xi) - (vxi * vxi).sum(-1)
        w_top = self.tensors.levels[-1].w_uncond
        sigma2 = sigma * sigma
        return -ps.logdet_top - 0.5 * self.n_w_top * torch.log(2 * math.pi * sigma2) - 0.5 * w_top * quad / sigma2

    def loglik(self, beta: torch.Tensor, thetas: Sequence[torch.Tensor], sigma: torch.Tensor) -> torch.Tensor:
        r"""Total :math:`\ell(\beta,\theta,\sigma) = \sum_k \ell_k` of (4.3) from the aggregated
        :math:`K_{top}` (cheaper than summing :meth:`loglik_by_group`), a 0-d tensor.
        """
        ps = self.integrate(thetas)
        xi = torch.cat([beta, -torch.ones(1, dtype=beta.dtype, device=beta.device)])
        sigma2 = sigma * sigma
        return (-ps.logdet_top.sum() - 0.5 * self.n_w * torch.log(2 * math.pi * sigma2)
                - 0.5 * (xi @ self.k_top(ps) @ xi) / sigma2)

    # ------------------------------------------------------------------ modes
    def modes(self, thetas: Sequence[torch.Tensor], beta: torch.Tensor, ps: _Pass | None = None) -> list:
        r"""Conditional modes :math:`\hat u_g = -A_g^{-1}B_g\xi_r` per level, top-down (4.3).

        With the rest unscaled, :math:`B_g\xi_r = L_g V_g \rho_g` where :math:`\rho_g` stacks the
        ancestors' :math:`\hat b = \Lambda\hat u` and :math:`(\hat\beta, -1)`, so
        :math:`\hat u_g = -L_g^{-\top}V_g\rho_g`.

        Returns a list (level 2 first) of ``(G_l, q_l)`` spherical modes (relative scale);
        :math:`\hat b_g = \Lambda_l\hat u_g`.
        """
        if ps is None:
            ps = self.integrate(thetas)
        levels = self.tensors.levels
        xi = torch.cat([beta, -torch.ones(1, dtype=beta.dtype, device=beta.device)])
        rest = xi.expand(levels[-1].n_groups, -1)
        us = [None] * len(levels)
        for idx in range(len(levels) - 1, -1, -1):
            chol, v = ps.chol[idx], ps.v[idx]
            rhs = v @ rest.unsqueeze(-1)
            u = -torch.linalg.solve_triangular(chol.transpose(1, 2), rhs, upper=True).squeeze(-1)
            us[idx] = u
            if idx > 0:
                parent = levels[idx - 1].parent
                b = u @ ps.lams[idx].transpose(0, 1)
                rest = torch.cat([b[parent], rest[parent]], dim=1)
        return us


def gaussian_loglik_by_group(tensors: ModelTensors, beta: torch.Tensor, thetas: Sequence[torch.Tensor],
                             sigma) -> torch.Tensor:
    r"""Convenience wrapper: :math:`\ell_k(\beta,\theta,\sigma)` of (4.3), shape ``(G_L,)``.

    ``thetas`` are relative Cholesky entries (:math:`\Sigma_l=\sigma^2\Lambda_l\Lambda_l^\top`).
    """
    sigma = torch.as_tensor(sigma, dtype=tensors.X.dtype, device=tensors.X.device)
    return GaussianLikelihood(tensors).loglik_by_group(beta, thetas, sigma)

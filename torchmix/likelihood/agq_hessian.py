r"""Exact Hessian of the two-level AGQ log-likelihood, one random effect, canonical link.

Two levels, one random effect per group (column :math:`\zeta_i` of :math:`Z`, :math:`\Lambda=\theta`,
:math:`\tilde z_i=\zeta_i\theta`), Bernoulli-logit or Poisson-log (:math:`\partial_\eta\log f=y-\mu`,
:math:`-\partial^2_\eta\log f=\mu'`). With :math:`\psi=(\beta,\theta)` (``m = p + 1``), per group :math:`j`
(index dropped) the quadrature of :class:`~torchmix.likelihood.agq.AGQLogLik` is

.. math::
    \log\mathcal L = -\log L + \log\sum_k e^{T_k},\quad
    T_k = \lambda_k - \tfrac12 c_k^2 + \sum_i w_i\log f(y_i\mid\eta_{ik}),\quad
    \eta_{ik} = x_i^\top\beta + \zeta_i\theta c_k,\quad c_k = \hat u + z_k/L,

with :math:`\lambda_k=\log\omega_k+\frac12z_k^2`, the mode :math:`\hat u(\psi)` of
:math:`\sum_iw_i\log f(y_i\mid x_i^\top\beta+\tilde z_i u)-u^2/2` and :math:`L(\psi)^2 = 1+\theta^2S`,
:math:`S=\sum_iw_i\zeta_i^2\mu'(\hat\eta_i)` (the adaptation). Write :math:`v_{ik}=(x_i,\zeta_ic_k)`,
:math:`r_{ik}=y_i-\mu_{ik}` and the partial derivatives of :math:`T_k` at fixed :math:`c_k`:

.. math::
    g_k=\textstyle\sum_iw_ir_{ik}v_{ik},\quad H_k=-\sum_iw_i\mu'_{ik}v_{ik}v_{ik}^\top,\quad
    t_k=\partial_cT_k=-c_k+\theta\sum_iw_ir_{ik}\zeta_i,

    s_k=\partial^2_cT_k=-1-\theta^2\textstyle\sum_iw_i\mu'_{ik}\zeta_i^2,\quad
    q_k=\partial_\psi\partial_cT_k=-\theta\sum_iw_i\mu'_{ik}\zeta_iv_{ik}+e_\theta\sum_iw_ir_{ik}\zeta_i.

With :math:`\gamma_k=dc_k/d\psi=\hat u_\psi-z_kL_\psi/L^2` and
:math:`\Gamma_k=d^2c_k/d\psi^2=\hat u_{\psi\psi}-z_k(L_{\psi\psi}/L^2-2L_\psi L_\psi^\top/L^3)`, the total
derivatives of :math:`T_k` are :math:`\tau_k=g_k+t_k\gamma_k` and
:math:`\tau'_k=H_k+q_k\gamma_k^\top+\gamma_kq_k^\top+s_k\gamma_k\gamma_k^\top+t_k\Gamma_k`, and with
:math:`P_k=\operatorname{softmax}_kT_k`, :math:`\bar\tau=\sum_kP_k\tau_k`,

.. math::
    \nabla^2\log\mathcal L = -\frac{L_{\psi\psi}}{L}+\frac{L_\psi L_\psi^\top}{L^2}
    +\sum_kP_k\tau'_k+\sum_kP_k\tau_k\tau_k^\top-\bar\tau\bar\tau^\top .

The adaptation's derivatives follow from the mode equation :math:`\theta\sum_iw_i\zeta_ir_i(\hat\eta_i)=\hat u`
(:math:`\hat\eta_i=x_i^\top\beta+\zeta_i\theta\hat u`, :math:`\omega_i=d\hat\eta_i/d\psi=(x_i,\zeta_i\hat u)+\zeta_i\theta\hat u_\psi`):

.. math::
    L^2\hat u_\psi = e_\theta\textstyle\sum_iw_i\zeta_ir_i-\theta\sum_iw_i\zeta_i\mu'_i(x_i,\zeta_i\hat u),

    L^2\hat u_{\psi\psi} = e_\theta b^\top+be_\theta^\top-\theta\textstyle\sum_iw_i\zeta_i\mu''_i\omega_i\omega_i^\top
    -\theta S(e_\theta\hat u_\psi^\top+\hat u_\psi e_\theta^\top),\quad b=-\sum_iw_i\zeta_i\mu'_i\omega_i,

    (L^2)_\psi = 2\theta Se_\theta+\theta^2S_\psi,\quad
    (L^2)_{\psi\psi} = 2Se_\theta e_\theta^\top+2\theta(e_\theta S_\psi^\top+S_\psi e_\theta^\top)+\theta^2S_{\psi\psi},

    S_\psi=\textstyle\sum_iw_i\zeta_i^2\mu''_i\omega_i,\quad
    S_{\psi\psi}=\sum_iw_i\zeta_i^2\mu'''_i\omega_i\omega_i^\top
    +\sum_iw_i\zeta_i^3\mu''_i\,(e_\theta\hat u_\psi^\top+\hat u_\psi e_\theta^\top+\theta\hat u_{\psi\psi}).

(for a canonical link the Fisher weight that scales the nodes equals :math:`\mu'`, and :math:`\hat u` is
the adapted mode the evaluation left). The Hessian of :math:`\ell=\sum_jw^{(2)}_j\log\mathcal L_j` is the
:math:`w^{(2)}`-weighted sum. Everything is batched over ``K`` parameter vectors (responses) sharing the
design. The row sums over a group (:math:`\sum_i c_iv_i`, :math:`\sum_i c_iv_iv_i^\top`) are sparse products
with matrices built once; the :math:`N\times M` node pass (one ``sigmoid``/``exp`` and one ``log``) runs
one value at a time so that it stays in the processor cache; the rest is ``(m, m, G, K)`` arithmetic.
This is the Hessian that central differences of the exact gradient approximate
(:func:`~torchmix.fit.glmm_se.fd_hessian`), without their :math:`2m` evaluations.
"""

from __future__ import annotations


import torch

from .kernels import exp_into, log_into
from .segments import Grouping

__all__ = ["AGQHessian", "supports"]

#: Elements of the node arrays of one row block on the CPU (2 MiB of float64 each: cache-sized); other devices
#: take blocks of ``DEVICE_BLOCK_ELEMS`` (few kernel launches).
BLOCK_ELEMS = 2 ** 18
DEVICE_BLOCK_ELEMS = 2 ** 24

_ETA_CLAMP = 700.0


def supports(family, n_levels: int, q: int):
    """``"logit"`` or ``"poisson"`` when :class:`AGQHessian` covers the model, else None."""
    from .kernels import LogitKernel, PoissonLogKernel, canonical_kernel

    if n_levels != 2 or q != 1:
        return None
    return {LogitKernel: "logit", PoissonLogKernel: "poisson"}.get(canonical_kernel(family))


def _mu_derivs(kind: str, eta: torch.Tensor):
    r""":math:`(\mu, \mu', \mu'', \mu''')` of the inverse canonical link at ``eta``."""
    if kind == "logit":
        mu = torch.sigmoid(eta)
        d1 = mu - mu * mu
        return mu, d1, d1 * (1.0 - 2.0 * mu), d1 * (1.0 - 6.0 * d1)
    mu = torch.exp(eta.clamp(-_ETA_CLAMP, _ETA_CLAMP))
    return mu, mu, mu, mu


def _node_pass(kind: str, y: torch.Tensor, base: torch.Tensor, a_row: torch.Tensor, nodes: torch.Tensor, buf):
    r"""One value's node pass, :math:`\eta_{ik}=b_i+a_iz_k` (``base``, ``a_row`` ``(N,)``, ``y (N,)``): returns
    :math:`\log f` (up to a term constant in :math:`\eta`), :math:`r=y-\mu` and :math:`\mu'`, ``(N, M)`` each,
    written into the three ``(N, M)`` buffers ``buf``."""
    t, resid, curv = buf
    if kind == "logit":  # t = s eta with s = 2y - 1; p = sigmoid(t) the probability of the observed response
        sign = 2.0 * y - 1.0
        torch.addmm((sign * base)[:, None], (sign * a_row)[:, None], nodes[None, :], out=t)
        prob = torch.sigmoid(t, out=curv)
        torch.addcmul(sign[:, None], sign[:, None], prob, value=-1.0, out=resid)  # s (1 - p)
        log_into(prob, t)
        curv.addcmul_(prob, prob, value=-1.0)  # p (1 - p)
        return t, resid, curv
    torch.addmm(base[:, None], a_row[:, None], nodes[None, :], out=t)
    t.clamp_(-_ETA_CLAMP, _ETA_CLAMP)
    mu = exp_into(t, curv)
    torch.sub(y[:, None], mu, out=resid)
    return t.mul_(y[:, None]).sub_(mu), resid, mu


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(m, m, ...)`` outer products of component-major ``(m, ...)`` vectors."""
    return a[:, None] * b[None, :]


def _sym2(a: torch.Tensor) -> torch.Tensor:
    return a + a.transpose(0, 1)


class AGQHessian:
    r"""Exact Hessians of :math:`\ell(\psi_k)=\sum_jw^{(2)}_j\log\mathcal L_j`, including the adaptation
    (module notes), for responses sharing one design.

    Parameters
    ----------
    kind : ``"logit"`` or ``"poisson"`` (:func:`supports`).
    X : ``(N, p)`` fixed-effect design; offset : ``(N,)`` or None; zeta : ``(N,)`` the random-effect column.
    w1 : ``(N,)`` conditional row weights; w2 : ``(G,)`` group weights; groups : rows to the ``G`` groups.
    nodes : ``(M,)`` Gauss-Hermite nodes; log_weights_plus_norm : ``(M,)`` :math:`\log\omega_k+\tfrac12z_k^2`.

    Call with ``y (N, K)`` responses, ``psi (K, m)`` parameters :math:`(\beta,\theta)` and ``u_hat (K, G)``
    the modes at ``psi`` (as the evaluation at ``psi`` left them); returns ``(K, m, m)``. The node pass
    runs one value at a time, so that it stays in the processor cache.
    """

    def __init__(self, kind: str, X, offset, zeta, w1, w2, groups: Grouping, nodes, log_weights_plus_norm):
        self.kind, self.X, self.offset, self.zeta, self.w1, self.w2, self.groups = kind, X, offset, zeta, w1, w2, groups
        self.nodes, self.lwn = nodes, log_weights_plus_norm
        p = X.shape[1]
        m = p + 1
        v_cols = torch.cat([X, zeta[:, None]], dim=1)  # v_i = (x_i, zeta_i), (N, m)
        # pairs (a <= b): those of x first, then (a, zeta) for a = 0..p, so that the pairs with e zeta factors
        # are contiguous: e = 0 in [:n0], e = 1 in [n0:n0 + p], e = 2 last; the zeta column is [n0:]
        x_pairs = torch.triu_indices(p, p, device=X.device)
        last = torch.arange(m, device=X.device)
        self.pairs = pairs = torch.cat([x_pairs, torch.stack([last, torch.full_like(last, p)])], dim=1)
        self.n0 = x_pairs.shape[1]
        pair_cols = v_cols[:, pairs[0]] * v_cols[:, pairs[1]]
        self.moment_pairs = groups.stacked(pair_cols)
        self.moment_v = groups.stacked(v_cols)
        self.moment_one = groups.ones(X.dtype)
        # the node pass runs over cache-sized row blocks of whole groups, each with its weighted sums
        wv, wp = w1[:, None] * v_cols, w1[:, None] * pair_cols
        elems = BLOCK_ELEMS if X.device.type == "cpu" else DEVICE_BLOCK_ELEMS
        self.blocks = [(b, b.groups.matrix(b.take(w1)), b.groups.stacked(b.take(wv)), b.groups.stacked(b.take(wp)))
                       for b in groups.blocks(elems // max(int(nodes.shape[0]), 1))]

    def _node_sums(self, y, eta_hat, a_row):
        r"""Over the nodes :math:`\eta_{ik}=\hat\eta_i+a_iz_k`: :math:`T` sums ``(G, K, M)``,
        :math:`\sum_iw_ir_{ik}v_i` ``(m, G, K, M)`` and :math:`\sum_iw_i\mu'_{ik}v_{ia}v_{ib}` ``(pairs, G, K, M)``;
        one value and one row block (:meth:`~torchmix.likelihood.segments.Grouping.blocks`) at a time, so that
        the node arrays stay in the processor cache."""
        k_all = eta_hat.shape[1]
        n_nodes = self.nodes.shape[0]
        m, n_pairs, g = self.X.shape[1] + 1, self.pairs.shape[1], self.groups.n
        like = dict(dtype=eta_hat.dtype, device=eta_hat.device)
        longest = max((b.n_rows for b, *_ in self.blocks), default=0)
        buf = [torch.empty(longest, n_nodes, **like) for _ in range(3)]
        out_t = torch.empty(g, k_all, n_nodes, **like)
        out_r = torch.empty(m, g, k_all, n_nodes, **like)
        out_c = torch.empty(n_pairs, g, k_all, n_nodes, **like)
        for k in range(k_all):
            for blk, w_rows, v_rows, pair_rows in self.blocks:
                nb, g0, g1 = blk.n_rows, blk.g0, blk.g1
                logf, resid, curv = _node_pass(self.kind, blk.take(y[:, k]), blk.take(eta_hat[:, k]),
                                               blk.take(a_row[:, k]), self.nodes, [b[:nb] for b in buf])
                out_t[g0:g1, k] = w_rows @ logf
                out_r[:, g0:g1, k] = (v_rows @ resid).reshape(m, g1 - g0, n_nodes)
                out_c[:, g0:g1, k] = (pair_rows @ curv).reshape(n_pairs, g1 - g0, n_nodes)
        return out_t, out_r, out_c

    def _square(self, pair_values: torch.Tensor) -> torch.Tensor:
        """The symmetric ``(m, m, ...)`` from its values at :attr:`pairs` ``(pairs, ...)``."""
        m = self.X.shape[1] + 1
        out = pair_values.new_empty((m, m) + pair_values.shape[1:])
        out[self.pairs[0], self.pairs[1]] = pair_values
        out[self.pairs[1], self.pairs[0]] = pair_values
        return out

    def __call__(self, y: torch.Tensor, psi: torch.Tensor, u_hat: torch.Tensor) -> torch.Tensor:
        # group-level arrays are component-major: vectors (m, G, K), matrices (m, m, G, K)
        X, zeta, w1, groups, nodes = self.X, self.zeta, self.w1, self.groups, self.nodes
        n, p = X.shape
        m, k_all, n_groups, n0 = p + 1, psi.shape[0], groups.n, self.n0
        gidx = groups.index
        beta, theta = psi[:, :p], psi[:, p]
        e_t = torch.zeros(m, 1, 1, dtype=psi.dtype, device=psi.device)
        e_t[p] = 1.0
        # ---- the mode and its derivatives
        eta0 = X @ beta.transpose(0, 1)
        if self.offset is not None:
            eta0 = eta0 + self.offset[:, None]
        zl = zeta[:, None] * theta[None, :]  # (N, K)
        u = u_hat.transpose(0, 1)  # (G, K)
        eta_hat = eta0 + zl * u.index_select(0, gidx)
        mu, d1, d2, d3 = _mu_derivs(self.kind, eta_hat)
        wd2, z1 = w1[:, None] * d2, zeta[:, None]
        z_sq = z1 * z1
        two = (n, 2 * k_all)
        mp = (self.moment_pairs @ torch.stack([wd2 * z1, w1[:, None] * d3 * z_sq], dim=2).reshape(two))
        mp = mp.reshape(-1, n_groups, k_all, 2)  # sum c v_a v_b for c = w mu2 zeta, w mu3 zeta^2
        mv = (self.moment_v @ torch.stack([w1[:, None] * d1 * z1, wd2 * z_sq], dim=2).reshape(two))
        mv = mv.reshape(m, n_groups, k_all, 2)  # sum c v for c = w mu1 zeta, w mu2 zeta^2
        mo = (self.moment_one @ torch.stack([w1[:, None] * (y - mu) * z1, wd2 * z_sq * z1], dim=2).reshape(two))
        mo = mo.reshape(n_groups, k_all, 2)  # sum w zeta r, sum w mu2 zeta^3
        m1z = mv[..., 0]  # sum w mu1 v zeta
        s_mu, r_sum = m1z[p], mo[..., 0]  # S = sum w mu1 zeta^2, sum w zeta r
        l_sq = 1.0 + theta * theta * s_mu  # L^2, (G, K)
        diag = torch.ones(m, n_groups, k_all, dtype=psi.dtype, device=psi.device)
        diag[p] = u  # w_i = D v_i with D = diag(1, .., 1, u); omega_i = A v_i = D v_i + theta u_psi zeta_i
        u_psi = (e_t * r_sum - theta * diag * m1z) / l_sq

        def sandwich(mat):  # A M A^T for a symmetric (m, m, G, K) M
            dm = diag[:, None] * mat * diag[None, :]
            side = _outer(diag * mat[:, p], u_psi)
            return dm + theta * (side + side.transpose(0, 1)) + theta * theta * mat[p, p] * _outer(u_psi, u_psi)

        b_vec = -(diag * m1z + theta * u_psi * m1z[p])
        sym_u = _sym2(_outer(e_t.expand_as(u_psi), u_psi))
        u_pp = (_sym2(_outer(e_t.expand_as(b_vec), b_vec)) - theta * sandwich(self._square(mp[..., 0]))
                - theta * s_mu * sym_u) / l_sq
        s_psi = diag * mv[..., 1] + theta * u_psi * mv[p, ..., 1]
        s_pp = sandwich(self._square(mp[..., 1])) + mo[..., 1] * (sym_u + theta * u_pp)
        q_psi = 2.0 * theta * s_mu * e_t + theta * theta * s_psi  # (L^2)_psi
        q_pp = (2.0 * s_mu * _outer(e_t, e_t) + 2.0 * theta * _sym2(_outer(e_t.expand_as(s_psi), s_psi))
                + theta * theta * s_pp)
        l_fac = l_sq.sqrt()
        l_psi = q_psi / (2.0 * l_fac)
        l_pp = q_pp / (2.0 * l_fac) - _outer(q_psi, q_psi) / (4.0 * l_fac * l_sq)
        # ---- node pass: eta_ik = eta_hat_i + (zl_i / L_j) z_k; node arrays (., G, K, M)
        c = u[:, :, None] + nodes / l_fac[:, :, None]
        a_row = zl / l_fac.index_select(0, gidx)
        t_nodes, sum_r, sum_c = self._node_sums(y, eta_hat, a_row)
        prob = torch.softmax(t_nodes + self.lwn - 0.5 * c * c, dim=2)  # (G, K, M)
        th = theta[None, :, None]
        r_z = sum_r[p]
        t_k = th * r_z - c
        col_z = sum_c[n0:]  # sum w mu' v zeta
        s_k = -1.0 - th * th * col_z[p]
        q_k = col_z * (-th)
        q_k[p].mul_(c).add_(r_z)
        # tau_k = g_k + t_k gamma_k = E phi_k, phi_k = (g_k, t_k, t_k z_k), E = [I, u_psi, -ell], ell = L_psi / L^2
        phi = torch.empty((m + 2,) + c.shape, dtype=psi.dtype, device=psi.device)
        phi[:p] = sum_r[:p]
        torch.mul(c, r_z, out=phi[p])
        phi[p + 1] = t_k
        torch.mul(t_k, nodes, out=phi[p + 2])
        p_phi = prob * phi
        mom = torch.einsum("agkm,bgkm->gkab", p_phi, phi).permute(2, 3, 0, 1)  # sum_k P phi phi^T
        bar = p_phi.sum(-1)
        ell = l_psi / l_sq
        tau_bar = bar[:m] + bar[m] * u_psi - bar[m + 1] * ell
        side = _outer(mom[:m, m], u_psi) - _outer(mom[:m, m + 1], ell)
        tau_tau = (mom[:m, :m] + side + side.transpose(0, 1) + mom[m, m] * _outer(u_psi, u_psi)
                   - mom[m, m + 1] * _sym2(_outer(u_psi, ell)) + mom[m + 1, m + 1] * _outer(ell, ell))
        # sum_k P_k H_k from the P c^e weighted pair sums, e = number of zeta factors in the pair
        p_z, p_c = prob * nodes, prob * c
        h_bar = self._square(torch.cat([(sum_c[:n0] * prob).sum(-1), (sum_c[n0:n0 + p] * p_c).sum(-1),
                                        (sum_c[n0 + p] * p_c * c).sum(-1)[None]]))
        # gamma_k = u_psi - z_k ell, Gamma_k = u_pp - z_k B
        b_mat = l_pp / l_sq - 2.0 * _outer(l_psi, l_psi) / (l_sq * l_fac)
        q_0, q_1 = (prob * q_k).sum(-1), (p_z * q_k).sum(-1)
        side = _outer(q_0, u_psi) - _outer(q_1, ell)
        per_group = (-l_pp / l_fac + _outer(l_psi, l_psi) / l_sq - h_bar + side + side.transpose(0, 1)
                     + (prob * s_k).sum(-1) * _outer(u_psi, u_psi) - (p_z * s_k).sum(-1) * _sym2(_outer(u_psi, ell))
                     + (p_z * nodes * s_k).sum(-1) * _outer(ell, ell)
                     + (prob * t_k).sum(-1) * u_pp - (p_z * t_k).sum(-1) * b_mat + tau_tau - _outer(tau_bar, tau_bar))
        return torch.einsum("g,abgk->kab", self.w2, per_group)

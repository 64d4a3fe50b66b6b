r"""Starting values for GLMM fits (MATH.md 6.2).

* :func:`weighted_glm`: fixed effects of the weighted GLM without random effects, by Fisher
  scoring on :math:`\sum_i w^{(1)}_i\log f(y_i\mid x_i^\top\beta)` with step halving.
* :func:`parse_start`: a user vector :math:`(\beta,\tau)` in reporting order, length-checked, turned
  into :math:`(\beta,\theta)` with :math:`\theta` the absolute Cholesky entries per level.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..covariance import n_theta, theta_from_tau
from ..errors import DataError

__all__ = ["weighted_glm", "parse_start"]


def weighted_glm(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, family, max_iter: int = 50,
                 tol: float = 1e-10, offset=None) -> torch.Tensor:
    r"""Weighted GLM estimate of :math:`\beta` (no random effects).

    Starts from the least-squares fit of :math:`h^{-1}(\mu_0)` on :math:`X` (``family.starting_mu``)
    when the link implements ``link(mu)``, else from :math:`\beta=0`; then Fisher scoring
    :math:`\beta\leftarrow\beta+(X^\top WX)^{-1}X^\top(w\,\partial_\eta\log f)` with halving until the
    weighted log-likelihood increases. Separated data stop at the iteration cap (the random-effects
    fit then takes over). ``offset`` (``(N,)`` or None) is added to :math:`X\beta`.

    Returns
    -------
    tensor ``(p,)``
    """
    p = X.shape[1]
    off = 0.0 if offset is None else offset
    eye = torch.eye(p, dtype=X.dtype, device=X.device)
    sw = w.sqrt()
    beta = torch.zeros(p, dtype=X.dtype, device=X.device)
    if family.link.has_link:
        with torch.no_grad():
            eta0 = family.link.link(family.starting_mu(y))
        if bool(torch.isfinite(eta0).all()):
            # driver gelsd (SVD): the default gelsy gives results that vary in the last bits when
            # fits run concurrently in threads
            driver = "gelsd" if X.device.type == "cpu" else None  # CUDA has "gels" only
            beta = torch.linalg.lstsq(sw[:, None] * X, sw * (eta0 - off), driver=driver).solution

    def loglik(b):
        return float((w * family.logf(y, X @ b + off)).sum())

    val = loglik(beta)
    if val != val:  # NaN start: fall back to zero
        beta = torch.zeros_like(beta)
        val = loglik(beta)
    for _ in range(max_iter):
        eta = X @ beta + off
        grad = X.transpose(0, 1) @ (w * family.d1(y, eta))
        info = X.transpose(0, 1) @ ((w * family.fisher_w(eta))[:, None] * X)
        scale = float(info.diagonal().abs().max()) if p else 1.0
        step = torch.linalg.solve(info + 1e-10 * max(scale, 1.0) * eye, grad)
        alpha, improved = 1.0, False
        for _ in range(30):
            cand = beta + alpha * step
            cval = loglik(cand)
            if cval == cval and cval >= val - 1e-12 * abs(val):
                improved = True
                break
            alpha *= 0.5
        if not improved:
            break
        change = float((cand - beta).abs().max())
        beta, val = cand, cval
        if change < tol * (1.0 + float(beta.abs().max())):
            break
    return beta


def parse_start(start, p: int, term_sizes: Sequence[Sequence[int]], dtype=torch.float64, device=None):
    r"""Split a start vector :math:`(\beta,\tau)` and convert :math:`\tau` to absolute :math:`\theta`.

    Raises
    ------
    DataError
        If the length is not :math:`p+n_\tau` (the message gives the expected length), or a value
        is not finite.
    """
    n_tau = sum(n_theta(ts) for ts in term_sizes)
    vec = torch.as_tensor(start, dtype=dtype, device=device).reshape(-1)
    if vec.numel() != p + n_tau:
        raise DataError(f"start has length {vec.numel()}, expecting {p + n_tau} ({p} fixed effects, then "
                        f"{n_tau} variance components in reporting order)")
    if not bool(torch.isfinite(vec).all()):
        raise DataError("start has non-finite values")
    beta = vec[:p].clone()
    thetas, pos = [], p
    for ts in term_sizes:
        k = n_theta(ts)
        thetas.append(theta_from_tau(vec[pos:pos + k], ts, scale=1.0))
        pos += k
    return beta, thetas

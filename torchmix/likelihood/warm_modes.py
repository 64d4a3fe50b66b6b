r"""A rough warm start of the two-level modes for a canonical link, one random effect per group.

When the response changes (another plausible value on the same design) the modes of the previous
response are far from the new ones, and the mode search of the module falls back to steps with a
check of the objective. Before such an evaluation a few plain Newton steps per group bring the modes
close: for Bernoulli-logit and Poisson-log the mode of group :math:`j` maximises the strictly concave

.. math::
    g_j(u) = \sum_{i\in j} w_i\log f(y_i\mid\eta^0_i+\tilde z_i u) - \tfrac12 u^2,

with gradient :math:`\sum_i w_i\tilde z_i(y_i-\mu_i) - u` and curvature
:math:`-(\sum_i w_i\tilde z_i^2 c_i + 1)` (:math:`c = \mu-\mu^2` or :math:`\mu`). Each step is clipped to
``max_step`` in absolute value. The result is only a starting point: the module's own search still
runs to its tolerance from there, so the modes it returns do not depend on this start beyond rounding.
"""

from __future__ import annotations

import torch

from .modes import TRUST_STEP

__all__ = ["warm_modes"]


def warm_modes(module, eta0: torch.Tensor, zls, max_iter: int = 10, max_step: float = 1.0) -> bool:
    """Replace the modes of ``module`` (an :class:`~torchmix.likelihood.agq.AGQLogLik`) by a few clipped
    Newton steps from them, at ``eta0 (N,)`` and ``zls`` (one ``(N, 1)`` block).

    Steps stop when every group's step is below a tenth of the module's trust step. Returns whether the
    warm start applied (two levels, a canonical link, one random effect, finite steps); otherwise the
    modes are left as they were.
    """
    if module.n_levels != 2 or module._kernel is None or len(zls) != 1 or zls[0].shape[1] != 1:
        return False
    with torch.no_grad():
        data = module._fused_data()
        g, ker = data.g, data.kernel
        z = zls[0][:, 0].detach()
        eta0 = eta0.detach()
        wz = data.w1 * z
        m_wz, m_wzz = g.matrix(wz), g.matrix(wz * z)
        fixed = m_wz @ data.y
        u = module.u2[:, 0].clone()
        for _ in range(max_iter):
            eta = torch.addcmul(eta0, z, u.index_select(0, g.index))
            mu, curv = ker.mean_curv(eta)
            step = ((fixed - m_wz @ mu - u) / (m_wzz @ curv + 1.0)).clamp_(-max_step, max_step)
            if not bool(torch.isfinite(step).all()):
                return False
            u = u + step
            if float(step.abs().max()) <= 0.1 * TRUST_STEP:
                break
        module.set_modes([u[:, None]])
    return True

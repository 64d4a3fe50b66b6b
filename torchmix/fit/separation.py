r"""Detect (quasi-)complete separation in a fitted binomial model.

When some rows' responses are perfectly predicted, the likelihood keeps increasing as coefficients
grow without bound: there is no finite maximum, and the optimiser stops wherever the gradient has
become smaller than its tolerance (e.g. a slope of 5714). At such a point the fitted conditional
probabilities

.. math::
    \mu_i = h^{-1}\bigl(x_i^\top\beta + \textstyle\sum_l z^{(l)\top}_i b^{(l)}_{g_l(i)}\bigr)

of those rows equal their 0/1 responses to within :data:`SEPARATION_TOL`. A legitimate optimum
practically never puts a fitted probability within :math:`10^{-12}` of 0 or 1 (it needs
:math:`|\eta|>27.6` on the logit scale), so such rows are reported as separated. Pure tensor math.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..tensors import ModelTensors

__all__ = ["separated_rows", "SEPARATION_TOL"]

SEPARATION_TOL = 1e-12


def separated_rows(family, tensors: ModelTensors, beta: torch.Tensor, b: Sequence[torch.Tensor]) -> int:
    """Number of rows whose 0/1 response is fitted to within :data:`SEPARATION_TOL` (0 unless binomial).

    Parameters
    ----------
    tensors : the model the fit was made on; beta ``(p,)``; b : per level ``(G_l, q_l)`` predictions.
    """
    if getattr(family, "name", "") != "binomial":
        return 0
    with torch.no_grad():
        eta = tensors.X @ beta
        for lv, bl in zip(tensors.levels, b):
            if lv.Z.shape[1]:
                eta = eta + (lv.Z * bl.index_select(0, lv.group)).sum(1)
        mu = family.linkinv(eta)
        y = tensors.y
        sep = ((y == 0) & (mu < SEPARATION_TOL)) | ((y == 1) & (mu > 1 - SEPARATION_TOL))
        return int(sep.sum())

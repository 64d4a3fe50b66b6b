"""CUDA: the same fit on the GPU equals the CPU fit (skipped on machines without CUDA)."""

from __future__ import annotations

import numpy as np

import torchmix as tm
from conftest import cuda


@cuda
def test_linear_fit_on_cuda_equals_cpu(sleep_w):
    kw = dict(weights=["w1", "w2"], progress=False)
    cpu = tm.mix("Reaction ~ Days + (1 + Days|Subject)", sleep_w, **kw)
    gpu = tm.mix("Reaction ~ Days + (1 + Days|Subject)", sleep_w, device="cuda", deterministic=True, **kw)
    np.testing.assert_allclose(gpu.lnl, cpu.lnl, rtol=1e-10)
    np.testing.assert_allclose(gpu.coef, cpu.coef, rtol=1e-8)
    np.testing.assert_allclose(gpu.se, cpu.se, rtol=1e-6)
    np.testing.assert_allclose(gpu.varcomp, cpu.varcomp, rtol=1e-6)


@cuda
def test_three_level_fit_on_cuda_equals_cpu(sleep3):
    kw = dict(weights=["c1", "c2", "c3"], cweights=True, progress=False)
    cpu = tm.mix("Reaction ~ Days + (1|Subject) + (1|Group)", sleep3, **kw)
    gpu = tm.mix("Reaction ~ Days + (1|Subject) + (1|Group)", sleep3, device="cuda", **kw)
    np.testing.assert_allclose(gpu.lnl, cpu.lnl, rtol=1e-10)
    np.testing.assert_allclose(gpu.se, cpu.se, rtol=1e-6)

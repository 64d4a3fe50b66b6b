"""Pieces of data-parallel fits that need no processes: shards of whole top-level groups (the
assignment, the renumbering, per-group likelihood contributions equal to those of the full model)
and the collective timeout."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchmix as tm
from torchmix.distributed.shard import assign_top_groups, shard_tensors, top_ranges
from torchmix.errors import DistributedError, TorchmixError
from torchmix.likelihood.agq import AGQLogLik
from torchmix.likelihood.gaussian import GaussianLikelihood


def test_assignment_is_contiguous_and_balanced_by_rows():
    counts = torch.tensor([5, 1, 1, 1, 10, 2, 2, 2, 6])
    owner = assign_top_groups(counts, 3)
    assert owner.tolist() == sorted(owner.tolist())
    loads = [int(counts[owner == r].sum()) for r in range(3)]
    # middle rows 2.5, 5.5, ..., 27 of 30: shares [0, 10), [10, 20), [20, 30)
    assert loads == [8, 12, 10]
    assert top_ranges(counts, 3) == [(0, 4), (4, 6), (6, 9)]


def test_more_processes_than_groups():
    assert top_ranges(torch.tensor([90, 90]), 3) == [(0, 1), (1, 1), (1, 2)]
    ranges = top_ranges(torch.tensor([7]), 4)
    assert sum(b - a for a, b in ranges) == 1 and all(a <= b for a, b in ranges)
    assert top_ranges(torch.tensor([3, 3, 3, 3]), 1) == [(0, 4)]


def _tensors(formula, df, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tm.mix(formula, df, progress=False, **kw)
    return res, res.design.tensors


@pytest.fixture(scope="module")
def three_level():
    from conftest import sleepstudy_three_level

    return _tensors("Reaction ~ Days + (1 | Subject) + (1 | Group)", sleepstudy_three_level(),
                    weights=["c1", "c2", "c3"], cweights=True)


@pytest.mark.parametrize("size", [2, 3, 5])
def test_gaussian_shards_add_up_to_the_model(three_level, size):
    res, t = three_level
    beta = torch.as_tensor(res.coef.to_numpy().copy())
    thetas = [th.clone() for th in res._out.theta]
    sigma = torch.tensor(res.sigma, dtype=torch.float64)
    full = GaussianLikelihood(t).loglik_by_group(beta, thetas, sigma)
    parts, rows = [], 0
    for rank in range(size):
        sh = shard_tensors(t, rank, size)
        rows += sh.tensors.n_obs
        for lv, full_lv, ids in zip(sh.tensors.levels, t.levels, sh.group_ids):
            assert lv.n_groups == ids.numel()
            assert torch.equal(lv.w_uncond, full_lv.w_uncond[ids])
        if not sh.empty:
            parts.append(GaussianLikelihood(sh.tensors).loglik_by_group(beta, thetas, sigma))
    assert rows == t.n_obs
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-13, atol=0)
    # every group of every level is held by exactly one process
    for l, lv in enumerate(t.levels):
        held = torch.cat([ids[l] for ids in shard_tensors(t, 0, size).all_group_ids])
        assert sorted(held.tolist()) == list(range(lv.n_groups))


def test_agq_shards_add_up_to_the_model():
    df = tm.load_dataset("contraception")
    res, t = _tensors("use ~ age + urban + (1 | district)", df, family="binomial", n_quad=5)
    beta = torch.as_tensor(res.coef.to_numpy().copy())
    lams = [torch.sqrt(torch.as_tensor(res.varcomp.to_numpy()[:1].copy())).reshape(1, 1)]
    fam = res.family
    full = AGQLogLik(t, fam, 5).loglik(beta, lams)
    parts = [AGQLogLik(shard_tensors(t, r, 3).tensors, fam, 5).loglik(beta, lams) for r in range(3)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-10, atol=1e-12)


def test_distributed_error_is_a_runtime_error():
    assert issubclass(DistributedError, RuntimeError) and issubclass(DistributedError, TorchmixError)


def test_single_process_fit_does_not_use_the_group(sleep_w):
    res, _ = _tensors("Reaction ~ Days + (1 + Days | Subject)", sleep_w, weights=["w1", "w2"])
    assert "world_size" not in res._out.extra


def test_collective_timeout_precedence(monkeypatch):
    from torchmix.distributed import collectives

    monkeypatch.delenv("TORCHMIX_COLLECTIVE_TIMEOUT", raising=False)
    monkeypatch.setattr(collectives, "_group_timeout", lambda: None)  # as without a process group
    assert collectives.collective_timeout() == collectives.DEFAULT_TIMEOUT
    monkeypatch.setattr(collectives, "_group_timeout", lambda: 123.0)
    assert collectives.collective_timeout() == 123.0
    monkeypatch.setenv("TORCHMIX_COLLECTIVE_TIMEOUT", "42")
    assert collectives.collective_timeout() == 42.0
    collectives.set_collective_timeout(7)
    try:
        assert collectives.collective_timeout() == 7.0
        with pytest.raises(ValueError):
            collectives.set_collective_timeout(0)
    finally:
        collectives.set_collective_timeout(None)
    assert collectives.collective_timeout() == 42.0

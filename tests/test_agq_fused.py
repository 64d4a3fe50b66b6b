"""The canonical-link fast path of the AGQ module equals the generic path (value and gradient)."""

import pytest
import torch

from glmm_support import frame_tensors, simulate
from torchmix.covariance import lambda_from_theta
from torchmix.families import Binomial, get_family
from torchmix.likelihood.agq import AGQLogLik
from torchmix.likelihood.kernels import canonical_kernel

F64 = torch.float64


def t(*v):
    return torch.tensor(v, dtype=F64)


def _case(fam_name, levels, slope, seed=21):
    df = simulate(fam_name, seed=seed, levels=levels, slope=slope, n_top=9)
    df["c1"] = df["c1"] * 0.73 + 0.1  # non-integer weights
    return frame_tensors(df, levels=levels, slope=slope)


def _lambdas(levels, slope):
    lam2 = lambda_from_theta(t(0.9, 0.3, 0.5), (2,)) if slope else t(1.2).reshape(1, 1)
    return [lam2] + ([t(0.7).reshape(1, 1)] if levels == 3 else [])


def _value_and_grad(tens, fam, n_quad, beta, lams, fast, **kw):
    mod = AGQLogLik(tens, fam, n_quad, fast=fast, **kw)
    b = beta.clone().requires_grad_(True)
    ls = [lam.clone().requires_grad_(True) for lam in lams]
    mod.loglik(b, ls)  # a first call moves the warm start, as inside a fit
    ell = mod.loglik(b, ls)
    upstream = torch.linspace(0.5, 1.5, ell.shape[0], dtype=F64)
    grads = torch.autograd.grad((ell * upstream).sum(), [b] + ls)
    return ell.detach(), grads, mod


def _assert_same(fast, slow, rtol=1e-12):
    (v1, g1, _), (v2, g2, _) = fast, slow
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=rtol * float(v2.abs().max()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@pytest.mark.parametrize("fam_name", ["binomial", "poisson"])
@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("slope", [False, True])
def test_fast_path_equals_generic(fam_name, levels, slope):
    tens = _case(fam_name, levels, slope)
    fam = get_family(fam_name)
    beta, lams = t(0.1, 0.4), _lambdas(levels, slope)
    for n_quad in ((1, 5) if levels == 2 else (1, 3)):
        fast = _value_and_grad(tens, fam, n_quad, beta, lams, True)
        slow = _value_and_grad(tens, fam, n_quad, beta, lams, False)
        assert (fast[2]._kernel is not None) == (levels == 2)
        assert (fast[2]._row_logf is not None) == (levels == 3)
        assert slow[2]._kernel is None and slow[2]._row_logf is None
        _assert_same(fast, slow)
        torch.testing.assert_close(fast[2].modes[0], slow[2].modes[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fam_name", ["binomial", "poisson"])
def test_fast_path_top_scores_equal_generic(fam_name):
    tens = _case(fam_name, 2, True, seed=4)
    fam = get_family(fam_name)
    beta, lams = t(-0.2, 0.5), _lambdas(2, True)
    out = [AGQLogLik(tens, fam, 5, fast=fast).top_scores(beta, lams) for fast in (True, False)]
    for a, b in zip(out[0][:2] + tuple(out[0][2]), out[1][:2] + tuple(out[1][2])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


@pytest.mark.parametrize("fam_name", ["binomial", "poisson"])
@pytest.mark.parametrize("slope", [False, True])
def test_fast_path_in_small_row_blocks_with_rows_out_of_group_order(fam_name, slope):
    """Rows shuffled (not stored group by group) and ``max_chunk_elems`` so small that the node pass runs
    in many row blocks (one group where a group alone is larger): values and gradients equal the generic
    path, and the modes those of the rows in group order."""
    df = simulate(fam_name, seed=8, levels=2, slope=slope, n_top=40)
    df["c1"] = df["c1"] * 0.73 + 0.1
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    fam = get_family(fam_name)
    beta, lams = t(0.3, -0.2), _lambdas(2, slope)
    tens = frame_tensors(shuffled, levels=2, slope=slope)
    assert not bool((tens.levels[0].group[1:] >= tens.levels[0].group[:-1]).all())
    small = _value_and_grad(tens, fam, 7, beta, lams, True, max_chunk_elems=64)
    assert len(small[2]._fused.blocks(7 ** (2 if slope else 1))) > 5
    _assert_same(small, _value_and_grad(tens, fam, 7, beta, lams, False))
    ordered = _value_and_grad(frame_tensors(df, levels=2, slope=slope), fam, 7, beta, lams, True)
    torch.testing.assert_close(small[0].sum(), ordered[0].sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("levels", [2, 3])
def test_fast_path_far_in_the_tails(levels):
    """Linear predictors beyond 700, where sigmoid underflows, go through softplus: still equal."""
    tens = _case("binomial", levels, False, seed=9)
    fam = get_family("binomial")
    beta, lams = t(2.0, 1000.0), _lambdas(levels, False)
    fast = _value_and_grad(tens, fam, 5, beta, lams, True)
    assert bool(torch.isfinite(fast[0]).all())
    if levels == 2:
        assert fast[2]._fused.kernel.tails_used  # sigma underflowed: the chunk went through softplus
    _assert_same(fast, _value_and_grad(tens, fam, 5, beta, lams, False), rtol=1e-10)


def test_only_builtin_canonical_families_take_the_fast_path():
    class MyBinomial(Binomial):  # a user subclass may redefine logf: generic path
        pass

    assert canonical_kernel(get_family("binomial")) is not None
    assert canonical_kernel(get_family("poisson")) is not None
    assert canonical_kernel(get_family("binomial", "probit")) is None
    assert canonical_kernel(get_family("poisson", "identity")) is None
    assert canonical_kernel(MyBinomial()) is None
    assert canonical_kernel(get_family("gaussian")) is None


def test_repeated_value_call_reuses_the_previous_evaluation():
    """A value call at exactly the previous parameters, with the modes it left, is not evaluated again;
    new modes (set_modes) or a gradient request evaluate."""
    tens = _case("binomial", 2, False, seed=3)
    mod = AGQLogLik(tens, get_family("binomial"), 5)
    beta, lams = t(0.2, 0.5), _lambdas(2, False)
    calls = []
    mod.register_forward_hook(lambda *args: calls.append(1))
    first = mod.loglik(beta, lams)
    with torch.no_grad():
        again = mod.loglik(beta.clone(), [lam.clone() for lam in lams])
    assert len(calls) == 1
    torch.testing.assert_close(again, first.detach(), rtol=0, atol=0)
    mod.loglik(beta, [lams[0] * 1.01])  # other parameters: evaluated
    mod.loglik(beta, lams)
    assert len(calls) == 3
    mod.set_modes(mod.modes)  # new warm start: evaluated
    mod.loglik(beta, lams)
    assert len(calls) == 4
    b = beta.clone().requires_grad_(True)  # a gradient needs the graph: evaluated
    mod.loglik(b, lams).sum().backward()
    assert len(calls) == 5 and b.grad is not None

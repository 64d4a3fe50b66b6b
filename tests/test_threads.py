"""Thread counts: fits are unchanged by the number of intra-op threads, the setting is restored
after a fit (also on error), and fits running concurrently in threads equal the sequential ones."""

import threading

import numpy as np
import pandas as pd
import pytest
import torch

import torchmix
from torchmix.errors import ConfigError, DataError
from torchmix.threads import check_num_threads, choose_threads, fit_threads


def _logit_data(seed=3, groups=40, size=8):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), size)
    x = rng.normal(size=groups * size)
    eta = -0.3 + 0.8 * x + rng.normal(scale=0.9, size=groups)[g]
    y = (rng.random(groups * size) < 1 / (1 + np.exp(-eta))).astype(int)
    return pd.DataFrame({"y": y, "x": x, "g": [f"s{k}" for k in g], "w": rng.uniform(0.5, 2.0, groups * size), "w2": 1.0})


SLEEP = torchmix.load_dataset("sleepstudy")
LOGIT = _logit_data()


def _gauss(**kw):
    return torchmix.mix("Reaction ~ Days + (1 + Days | Subject)", SLEEP, progress=False, **kw)


def _logit(**kw):
    return torchmix.mix("y ~ x + (1 | g)", LOGIT, weights=["w", "w2"], family="binomial", progress=False, **kw)


def _numbers(res):
    return np.concatenate([res.coef.to_numpy(), res.se.to_numpy(), res.varcomp.to_numpy(),
                           res.varcomp_se.to_numpy(), [res.lnl]])


@pytest.mark.parametrize("fit", [_gauss, _logit], ids=["gaussian", "logit"])
def test_one_and_two_threads_agree(fit):
    before = torch.get_num_threads()
    one, two = _numbers(fit(num_threads=1)), _numbers(fit(num_threads=2))
    np.testing.assert_allclose(one, two, rtol=1e-10, atol=1e-10)
    assert torch.get_num_threads() == before


def test_setting_restored_after_fit_and_error():
    before = torch.get_num_threads()
    seen = []

    with pytest.raises(RuntimeError):
        with fit_threads(1 if before != 1 else 2):
            seen.append(torch.get_num_threads())
            raise RuntimeError("boom")
    assert seen == [1 if before != 1 else 2]
    assert torch.get_num_threads() == before
    with pytest.raises(DataError):
        torchmix.mix("Reaction ~ Days + (1 | Subject)", SLEEP.assign(Reaction=np.nan), progress=False, num_threads=1)
    assert torch.get_num_threads() == before


def test_nested_blocks_keep_the_outer_setting():
    before = torch.get_num_threads()
    with fit_threads(1):
        with fit_threads(2):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True, [2]])
def test_num_threads_validated(bad):
    with pytest.raises(ConfigError, match="num_threads"):
        check_num_threads(bad)
    with pytest.raises(ConfigError, match="num_threads"):
        _gauss(num_threads=bad)


def test_choice_by_size():
    assert check_num_threads(None) is None and check_num_threads(np.int64(3)) == 3
    assert choose_threads(1e4) == 1
    assert choose_threads(1e12) is None
    assert choose_threads(1e12, requested=1) == 1


def _concurrent_rounds(rounds):
    """Four fits (two gaussian, two logit) at once in threads, ``rounds`` times."""
    before = torch.get_num_threads()
    ref = {"g": _numbers(_gauss()), "l": _numbers(_logit())}
    failures, mismatches = [], []
    for _ in range(rounds):
        out = [None] * 4
        kinds = ["g", "l", "g", "l"]

        def work(i, kind):
            try:
                out[i] = _numbers(_gauss() if kind == "g" else _logit())
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                out[i] = exc

        threads = [threading.Thread(target=work, args=(i, k)) for i, k in enumerate(kinds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for kind, o in zip(kinds, out):
            if isinstance(o, Exception):
                failures.append(repr(o))
            elif not np.array_equal(o, ref[kind]):
                mismatches.append((kind, float(np.max(np.abs(o - ref[kind])))))
    assert not failures, failures[:3]
    assert not mismatches, mismatches[:3]
    assert torch.get_num_threads() == before


def test_concurrent_fits_in_threads():
    _concurrent_rounds(3)


@pytest.mark.slow
def test_concurrent_fits_in_threads_many_rounds():
    _concurrent_rounds(20)

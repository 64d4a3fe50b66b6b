"""The design step of mix() runs on the threads chosen for the size of the problem, then restores them."""

import torch

import torchmix as tm
import torchmix.api as api


def test_design_step_runs_on_the_chosen_threads(monkeypatch):
    seen = []
    original = api._prepare

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "_prepare", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        df = tm.load_dataset("sleepstudy")
        tm.mix("Reaction ~ Days + (1 | Subject)", df, progress=False)
        assert seen == [1]  # a small problem: one thread
        tm.mix("Reaction ~ Days + (1 | Subject)", df, progress=False, num_threads=2)
        assert seen == [1, 2]  # the user's choice
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)

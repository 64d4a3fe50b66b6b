"""Progress bars that appear only for work that lasts.

Every bar torchmix shows goes through :func:`progress_bar`: a tqdm bar (stderr, or a notebook
widget) that stays hidden for its first :data:`DELAY_S` seconds and is removed when done, so
a fit that takes a moment prints nothing.
"""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["DELAY_S", "progress_bar"]

DELAY_S = 2.0


def progress_bar(iterable=None, **kwargs):
    """``tqdm(iterable, delay=DELAY_S, leave=False, **kwargs)``; ``total`` where it is known."""
    kwargs.setdefault("delay", DELAY_S)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)

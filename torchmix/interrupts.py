"""SIGINT and SIGTERM as one clean interrupt, for the command line.

While :class:`Interrupts` is active (a context manager, main thread only), both signals raise
:class:`Interrupted` (a :class:`KeyboardInterrupt`, so every ``finally`` and every cleanup for
``KeyboardInterrupt`` runs) at the next Python instruction; inside :meth:`Interrupts.held` they are
recorded and raised when the block ends, so a short critical step (renaming a results folder into
place) is never cut in half. Outside the main thread (where Python cannot install handlers) it does
nothing.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Optional

__all__ = ["Interrupted", "Interrupts"]

_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class Interrupted(KeyboardInterrupt):
    """Raised for SIGINT or SIGTERM; ``signum`` says which, ``exit_status`` is ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class Interrupts:
    """Install the handlers on entry, restore the previous ones on exit."""

    def __init__(self):
        self._previous: dict = {}
        self._holding = False
        self._pending: Optional[int] = None

    def _handle(self, signum, frame):
        if self._holding:
            self._pending = self._pending or signum
            return
        raise Interrupted(signum)

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @contextmanager
    def held(self):
        """Hold SIGINT and SIGTERM back during the block; one that came is raised at its end."""
        self._holding, self._pending = True, None
        try:
            yield
        finally:
            self._holding = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise Interrupted(signum)

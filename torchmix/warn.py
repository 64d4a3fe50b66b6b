"""Warnings that point at the caller's line.

:func:`warn` is ``warnings.warn`` with the ``stacklevel`` computed rather than counted: the
warning is attributed to the line of user code that called into torchmix (for example the
``tm.mix(...)`` line of a script or notebook cell), however deep inside the package it was
raised. A fixed ``stacklevel`` breaks whenever a call path gains or loses a frame.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _in_package(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR + os.sep)


def _stacklevel() -> int:
    """``stacklevel`` for the ``warnings.warn`` call inside :func:`warn` that names the caller of
    the *outermost* torchmix frame on the stack.

    Level 1 is :func:`warn` itself, level 2 its caller, and so on. Frames of other libraries
    between torchmix frames (``torch.func``, ``contextlib``) are passed over with the torchmix
    ones, so the warning lands in user code even when torchmix is re-entered through them.
    """
    frame = sys._getframe(1)  # warn() itself: level 1
    level, outermost = 1, 1
    while frame is not None:
        if _in_package(frame.f_code.co_filename):
            outermost = level
        frame = frame.f_back
        level += 1
    return outermost + 1


def warn(message: str, category: type = UserWarning) -> None:
    """Issue ``message`` as a ``category`` warning attributed to the caller of torchmix.

    Parameters
    ----------
    message : the warning text.
    category : a ``Warning`` subclass (torchmix's own in :mod:`torchmix.errors`, or
        ``FutureWarning`` / ``UserWarning``).
    """
    warnings.warn(message, category, stacklevel=_stacklevel())

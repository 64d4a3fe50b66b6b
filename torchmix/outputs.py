"""Writing a fit's results to a folder, all or nothing.

The files of one run (``summary.txt``, ``estimates.<fmt>``, ``random_effects.<fmt>``, ``run.json``)
are written into a new hidden folder beside the target (same parent, so moving it is a rename), with
``run.json`` last; only when every file is written does that folder replace the target: the old
folder is renamed away, the new one renamed in, the old one removed. An error or an interrupt at
any point leaves the previous results untouched and no temporary folder behind, so a results
folder never mixes files of two runs and its ``run.json`` always describes the files beside it.

Because the whole folder is replaced, a folder holding files torchmix did not write is refused
(:func:`check_output_folder`) before anything is fitted.

Levels are numbered as in :func:`torchmix.MixedResults.to_frame` and the summary (MATH.md
section 1): level 1 = observations, level 2 = the lowest grouping factor, and so on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, ContextManager, Optional

from .config import TABLE_FORMATS
from .errors import ConfigError

__all__ = ["OWN_FILES", "ranef_long", "random_effects_table", "write_outputs", "check_output_folder",
           "publish_folder"]

#: Every file name a results folder may hold; a folder with other files is never replaced.
OWN_FILES = frozenset({"summary.txt", "run.json"}
                      | {f"{stem}.{fmt}" for stem in ("estimates", "random_effects") for fmt in TABLE_FORMATS})
_RANEF_COLUMNS = ["level", "group", "id", "effect", "value"]


# ----------------------------------------------------------------------------- tables


def ranef_long(ranef):
    """Random effects as a long table with columns ``level, group, id, effect, value``.

    Parameters
    ----------
    ranef : dict
        Grouping-factor name -> DataFrame (rows: group ids, columns: effect names), in level order,
        lowest grouping first, as ``MixedResults.ranef``.

    Returns
    -------
    pandas.DataFrame
        ``level``: the level number (2 = the first entry of ``ranef``, the lowest grouping; the
        numbering of ``to_frame()`` and the summary); ``group``: the grouping factor's name (the
        ``group`` column of ``to_frame()``); ``id``: the group's label (nested labels joined by
        ``":"``); ``effect``; ``value``.
    """
    import pandas as pd

    frames = []
    for level, (name, table) in enumerate((ranef or {}).items(), start=2):
        table = pd.DataFrame(table)
        ids = table.index
        if isinstance(ids, pd.MultiIndex):
            ids = [":".join(map(str, g)) for g in ids]
        ids = pd.Index(ids).astype(str)
        for effect in table.columns:
            frames.append(pd.DataFrame({
                "level": level, "group": str(name), "id": ids, "effect": str(effect),
                "value": table[effect].to_numpy(dtype=float),
            }))
    if not frames:
        return pd.DataFrame({c: [] for c in _RANEF_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def random_effects_table(res):
    """Long random-effects table of a single fit, or of every fit of a pooled one (with a leading
    ``plausible_value`` column, 1-based)."""
    import pandas as pd

    ranef = getattr(res, "ranef", None)
    if ranef:
        return ranef_long(ranef)
    fits = getattr(res, "fits", None)
    if fits:
        parts = []
        for k, f in enumerate(fits, start=1):
            t = ranef_long(getattr(f, "ranef", None))
            t.insert(0, "plausible_value", k)
            parts.append(t)
        return pd.concat(parts, ignore_index=True)
    return ranef_long(None)


def _write_table(table, folder: Path, stem: str, formats) -> list:
    import pandas as pd

    written = []
    keep_index = not (table.index.name is None and table.index.equals(pd.RangeIndex(len(table))))
    for fmt in formats:
        path = folder / f"{stem}.{fmt}"
        if fmt == "csv":
            table.to_csv(path, index=keep_index)
        elif fmt == "json":
            (table.reset_index() if keep_index else table).to_json(path, orient="records", indent=1)
        elif fmt == "parquet":
            (table.reset_index() if keep_index else table).to_parquet(path, index=False)
        written.append(path.name)
    return written


def write_outputs(res, folder: Path, formats=("csv",)) -> list:
    """Write ``summary.txt``, ``estimates.<fmt>`` and ``random_effects.<fmt>`` for each table format,
    in place (see :func:`publish_folder` for writing them all or nothing).

    Parameters
    ----------
    res : MixedResults or PooledResults
    folder : Path
        Created if absent.
    formats : sequence of {"csv", "json", "parquet"}

    Returns
    -------
    list of str
        Names of the files written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.txt").write_text(str(res.summary()).rstrip("\n") + "\n", encoding="utf-8")
    written = ["summary.txt"]
    written += _write_table(res.to_frame(), folder, "estimates", formats)
    written += _write_table(random_effects_table(res), folder, "random_effects", formats)
    return written


# ----------------------------------------------------------------------------- the folder


def check_output_folder(folder: Path, where: str = "output folder") -> Path:
    """Check, before fitting, that results can be published at ``folder``.

    The folder must be absent, or a folder holding only files torchmix writes (:data:`OWN_FILES`:
    the results of an earlier run, which the new ones replace); its closest existing ancestor must
    be a folder this process can create folders in (checked by creating and removing one).

    Returns
    -------
    Path
        ``folder`` with symbolic links resolved (where the results will be published).

    Raises
    ------
    ConfigError
        Naming ``where`` (``"--out"`` or ``"[output] folder in FILE"``) and the reason.
    """
    folder = Path(folder).expanduser().resolve()
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"{where}: {folder} exists and is not a folder")
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in OWN_FILES)
        if foreign:
            shown = ", ".join(map(repr, foreign[:3])) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(f"{where}: {folder} holds files torchmix did not write ({shown}); the results "
                              "replace the whole folder, so name a new or empty folder, or an earlier "
                              "results folder")
    if folder.parent == folder:
        raise ConfigError(f"{where}: {folder} cannot be a results folder (it is a file-system root)")
    base = folder.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{where}: cannot create {folder}: {base} is not a folder")
    probe = base / f".{folder.name}.probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write results under {base}: {exc.strerror or exc}") from None
    return folder


def _new_sibling(target: Path, tag: str) -> Path:
    """A fresh, hidden path beside ``target`` (not created)."""
    while True:
        path = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        if not path.exists() and not path.is_symlink():
            return path


def _swap_in(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target`` (two renames when ``target`` exists; restored on failure)."""
    if not (target.exists() or target.is_symlink()):
        os.rename(new, target)
        return
    old = _new_sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish_folder(target: Path, fill: Callable[[Path], object],
                   guard: Optional[Callable[[], ContextManager]] = None):
    """Write a folder all or nothing: ``fill`` writes into a new folder beside ``target``, which then
    replaces ``target``.

    Parameters
    ----------
    target : Path
        The folder to (re)place; its parent is created if absent.
    fill : callable
        ``fill(tmp)`` writes every file into the empty folder ``tmp``; whatever it returns is
        returned. Write the file that vouches for the others (``run.json``) last.
    guard : callable, optional
        Returns a context manager held while the folders are swapped (the command uses it to hold
        back interrupts until the swap is complete).

    Raises
    ------
    Whatever ``fill`` or the file system raise (``KeyboardInterrupt`` included); the previous
    ``target`` is then intact and the temporary folder removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    guard = guard or contextlib.nullcontext
    tmp = _new_sibling(target, "partial")
    tmp.mkdir()
    try:
        result = fill(tmp)
        with guard():
            _swap_in(tmp, target)
    except BaseException:
        with guard():  # a second interrupt does not cut the clean-up short
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result

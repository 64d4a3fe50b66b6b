"""The ``torchmix`` command: fit a model described by a TOML config, without writing Python.

Subcommands
-----------
``torchmix fit CONFIG [--device DEV] [--out DIR] [--quiet]``
    Fit the model (one :func:`torchmix.mix` call), print its summary on stdout and write, in the
    output folder, ``summary.txt``, ``estimates.csv`` (``to_frame()``), ``random_effects.csv``
    (level, group, effect, value) and ``run.json`` (resolved config with defaults, package
    versions, device, timings, convergence status, warnings).
``torchmix validate CONFIG``
    Check the config, load the data and check the columns and weights it names, without fitting.
``torchmix datasets``
    List the datasets shipped with torchmix.

Exit status: 0 on success; 2 on bad input (a missing file, an invalid config, unusable data:
any :class:`~torchmix.errors.TorchmixError` except :class:`~torchmix.errors.NumericalError`), with
a one-line message on stderr and no traceback; 1 on a numerical failure. Progress bars and
warnings go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

from .errors import NumericalError, TorchmixError

__all__ = ["main", "build_parser", "write_outputs", "ranef_long"]

EXIT_OK, EXIT_NUMERICAL, EXIT_BAD_INPUT = 0, 1, 2
_PROG = "torchmix"
_VERSIONED = ("torchmix", "torch", "numpy", "pandas", "formulaic", "tqdm")


# ----------------------------------------------------------------------------- argument parsing


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchmix`` command."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Survey-weighted multilevel models in PyTorch: fit a model from a TOML config.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = sub.add_parser("fit", help="fit the model a config describes and write its results",
                         description="Fit the model a TOML config describes (one torchmix.mix call), "
                                     "print its summary and write summary.txt, estimates.csv, "
                                     "random_effects.csv and run.json.")
    fit.add_argument("config", metavar="CONFIG", help="TOML run configuration")
    fit.add_argument("--device", help="torch device to fit on, e.g. cuda (overrides [fit] device)")
    fit.add_argument("--out", metavar="DIR", help="output folder (overrides [output] folder)")
    fit.add_argument("--quiet", action="store_true",
                     help="print no summary and no progress bars (errors and warnings still go to stderr)")

    val = sub.add_parser("validate", help="check a config and its data without fitting",
                         description="Check a TOML config, load its data and check the columns and "
                                     "weights it names, without fitting.")
    val.add_argument("config", metavar="CONFIG", help="TOML run configuration")
    val.add_argument("--device", help="check this device instead of [fit] device")

    sub.add_parser("datasets", help="list the datasets shipped with torchmix",
                   description="List the datasets shipped with torchmix (usable as [data] dataset).")
    return parser


# ----------------------------------------------------------------------------- helpers


def _err(message: str) -> None:
    print(f"{_PROG}: error: {message}", file=sys.stderr)


@contextmanager
def _warnings_to_stderr(record: list):
    """Show warnings as one plain line each on stderr (no source line) and keep them in ``record``."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message}"
        record.append(text)
        print(f"{_PROG}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device_info(device: str) -> dict:
    import torch

    dev = torch.device(device)
    info = {"device": str(dev), "name": platform.processor() or platform.machine()}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def _jsonable(value):
    """Plain JSON values: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _converged(res) -> bool:
    conv = getattr(res, "converged", None)
    if conv is None:
        fits = getattr(res, "fits", None) or []
        return bool(fits) and all(_converged(f) for f in fits)
    if isinstance(conv, (bool, int)) or hasattr(conv, "item") and getattr(conv, "ndim", 1) == 0:
        return bool(conv)
    if hasattr(conv, "values") and not callable(conv.values):  # pandas
        conv = conv.values
    return all(bool(c) for c in conv)


def ranef_long(ranef):
    """Random effects as a long table with columns ``level, group, effect, value``.

    Parameters
    ----------
    ranef : dict
        Level name -> DataFrame (rows: group ids, columns: effect names), as ``MixedResults.ranef``.
    """
    import pandas as pd

    frames = []
    for level, table in (ranef or {}).items():
        table = pd.DataFrame(table)
        groups = table.index
        if isinstance(groups, pd.MultiIndex):
            groups = [":".join(map(str, g)) for g in groups]
        groups = pd.Index(groups).astype(str)
        for effect in table.columns:
            frames.append(pd.DataFrame({
                "level": str(level), "group": groups, "effect": str(effect),
                "value": table[effect].to_numpy(dtype=float),
            }))
    if not frames:
        return pd.DataFrame({"level": [], "group": [], "effect": [], "value": []})
    return pd.concat(frames, ignore_index=True)


def _random_effects_table(res):
    """Long random-effects table of a single fit, or of every fit of a pooled one."""
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
    """Write ``summary.txt``, ``estimates.<fmt>`` and ``random_effects.<fmt>`` for each table format.

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
    written += _write_table(_random_effects_table(res), folder, "random_effects", formats)
    return written


# ----------------------------------------------------------------------------- subcommands


def _cmd_datasets(args) -> int:
    from .data import list_datasets

    items = list_datasets()
    width = max(len(n) for n in items)
    for name, text in sorted(items.items()):
        print(f"{name:<{width}}  {text}")
    return EXIT_OK


def _cmd_validate(args) -> int:
    from .config import check_device, check_output, check_run, load_config, load_data

    cfg = load_config(args.config)
    if args.device is not None:
        cfg = cfg.with_overrides(device=args.device)
    check_device(cfg.fit.device)
    check_output(cfg)
    data = load_data(cfg)
    with _warnings_to_stderr([]):
        report = check_run(cfg, data)
    print(f"{args.config}: OK ({report})")
    return EXIT_OK


def _cmd_fit(args) -> int:
    from .config import check_device, check_output, load_config, load_data, run_config

    t0 = time.perf_counter()
    cfg = load_config(args.config)
    cfg = cfg.with_overrides(device=args.device, folder=args.out, progress=False if args.quiet else None)
    check_device(cfg.fit.device)
    check_output(cfg)
    folder = cfg.output_folder()
    t1 = time.perf_counter()
    data = load_data(cfg)
    t2 = time.perf_counter()
    caught: list = []
    with _warnings_to_stderr(caught):
        res = run_config(cfg, data)
    t3 = time.perf_counter()
    converged = _converged(res)
    lnl = getattr(res, "lnl", None)
    run_info = {
        "config": cfg.to_dict(),
        "converged": converged,
        "lnl": None if lnl is None else float(lnl),
        "n_rows_data": int(len(data)),
        "warnings": caught,
        "device": _device_info(cfg.fit.device),
        "versions": _versions(),
        "command": [_PROG, *args.argv],
        "timings_s": {"config": t1 - t0, "load_data": t2 - t1, "fit": t3 - t2},
    }
    written = write_outputs(res, folder, cfg.output.formats)
    t4 = time.perf_counter()
    run_info["timings_s"].update({"write": t4 - t3, "total": t4 - t0})
    run_info["files"] = written + ["run.json"]
    (folder / "run.json").write_text(json.dumps(_jsonable(run_info), indent=2) + "\n", encoding="utf-8")
    if not args.quiet:
        print(str(res.summary()).rstrip("\n"))
        print(f"{_PROG}: results written to {folder}", file=sys.stderr)
    return EXIT_OK


_COMMANDS = {"fit": _cmd_fit, "validate": _cmd_validate, "datasets": _cmd_datasets}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``torchmix`` command; returns the exit status.

    0: success; 2: bad input (message on stderr, no traceback); 1: numerical failure.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    args.argv = argv
    try:
        return _COMMANDS[args.command](args)
    except NumericalError as exc:
        _err(f"numerical failure: {exc}")
        return EXIT_NUMERICAL
    except TorchmixError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    except OSError as exc:  # a missing or unreadable config or data file, an unusable output folder
        _err(str(exc) if not getattr(exc, "filename", None) else f"{exc.strerror}: {exc.filename}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

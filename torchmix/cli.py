"""The ``torchmix`` command: fit a model described by a TOML config, without writing Python.

Subcommands
-----------
``torchmix fit CONFIG [--device DEV] [--out DIR] [--quiet]``
    Fit the model (one :func:`torchmix.mix` call), print its summary on stdout and write, in the
    output folder, ``summary.txt``, ``estimates.csv`` (``to_frame()``), ``random_effects.csv``
    (level, group, id, effect, value) and ``run.json`` (resolved config with defaults, package
    versions, device, timings, convergence status, warnings). The files are written all or
    nothing (:mod:`torchmix.outputs`): the folder is replaced only once every file is written, and
    an existing folder holding other files is refused before fitting.
``torchrun --nproc_per_node=P -m torchmix fit CONFIG [--timeout SECONDS]``
    The same fit over P processes (:mod:`torchmix.distributed`): the command joins the process
    group ``torchrun`` prepared (gloo on the CPU; NCCL with ``device = "cuda"``, each process on
    its GPU ``cuda:LOCAL_RANK``), every process reads the data and takes part in the fit, and
    process 0 alone prints and writes the output folder; ``run.json`` records ``world_size``.
    ``--timeout`` (or ``[distributed] timeout``) bounds how long a process waits for the others.
``torchmix validate CONFIG``
    Check the config, load the data and check the columns and weights it names, without fitting.
``torchmix datasets``
    List the datasets shipped with torchmix.
``torchmix --version``
    Print the package version.

Exit status: 0 on success, also when the optimiser did not converge (a warning says so and
``run.json`` records ``converged: false``); 2 on bad input (a missing file, an invalid config,
unusable data, an unusable output folder: any :class:`~torchmix.errors.TorchmixError` except
:class:`~torchmix.errors.NumericalError`); 1 on a numerical failure
(:class:`~torchmix.errors.NumericalError`) or an unexpected internal error; 130 on SIGINT (Ctrl-C)
and 143 on SIGTERM, which leave the output folder as it was. Errors are one line on stderr, without
a traceback unless ``--debug`` is given. Progress bars and warnings go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

from .errors import NumericalError, TorchmixError
from .interrupts import Interrupted, Interrupts
from .outputs import check_output_folder, publish_folder, ranef_long, write_outputs

__all__ = ["main", "build_parser", "write_outputs", "ranef_long"]

EXIT_OK, EXIT_NUMERICAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
_PROG = "torchmix"
_VERSIONED = ("torchmix", "torch", "numpy", "pandas", "formulaic", "tqdm")


# ----------------------------------------------------------------------------- argument parsing


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchmix`` command."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Survey-weighted multilevel models in PyTorch: fit a model from a TOML config.",
    )
    parser.add_argument("--version", action="version", version=f"{_PROG} {_package_version()}")
    debug_help = "on an error, print the full traceback as well as the message"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)  # --debug is also accepted after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = sub.add_parser("fit", parents=[common], help="fit the model a config describes and write its results",
                         description="Fit the model a TOML config describes (one torchmix.mix call), "
                                     "print its summary and write summary.txt, estimates.csv, "
                                     "random_effects.csv and run.json.")
    fit.add_argument("config", metavar="CONFIG", help="TOML run configuration")
    fit.add_argument("--device", help="torch device to fit on, e.g. cuda (overrides [fit] device)")
    fit.add_argument("--out", metavar="DIR", help="output folder (overrides [output] folder)")
    fit.add_argument("--quiet", action="store_true",
                     help="print no summary and no progress bars (errors and warnings still go to stderr)")
    fit.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="under torchrun: seconds a process waits for the others before it fails "
                          "(overrides [distributed] timeout)")

    val = sub.add_parser("validate", parents=[common], help="check a config and its data without fitting",
                         description="Check a TOML config, load its data and check the columns and "
                                     "weights it names, without fitting.")
    val.add_argument("config", metavar="CONFIG", help="TOML run configuration")
    val.add_argument("--device", help="check this device instead of [fit] device")

    sub.add_parser("datasets", parents=[common], help="list the datasets shipped with torchmix",
                   description="List the datasets shipped with torchmix (usable as [data] dataset).")
    return parser


# ----------------------------------------------------------------------------- helpers


def _package_version() -> str:
    from . import __version__

    return __version__


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
    check_output_folder(cfg.output_folder(), _folder_origin(cfg, None))
    data = load_data(cfg)
    with _warnings_to_stderr([]):
        report = check_run(cfg, data)
    print(f"{args.config}: OK ({report})")
    return EXIT_OK


def _folder_origin(cfg, out) -> str:
    """How the output folder was chosen, for error messages."""
    if out is not None:
        return "--out"
    if cfg.output.folder is not None:
        return "[output] folder" + (f" in {cfg.source}" if cfg.source is not None else "")
    return "output folder"


def _cmd_fit(args) -> int:
    from .config import load_config
    from .distributed import process_group

    t0 = time.perf_counter()
    cfg = load_config(args.config)
    cfg = cfg.with_overrides(device=args.device, folder=args.out, progress=False if args.quiet else None)
    timeout = cfg.distributed.timeout if args.timeout is None else args.timeout
    with process_group(cfg.fit.device, timeout) as device:  # under torchrun: one process of several
        if device != cfg.fit.device:
            cfg = cfg.with_overrides(device=device)
        return _fit_and_write(args, cfg, t0)


def _fit_and_write(args, cfg, t0: float) -> int:
    from .config import check_device, check_output, load_data, run_config
    from .distributed import is_main, launched
    from .distributed.collect import together

    main_process = is_main()

    def checks():
        check_device(cfg.fit.device)
        check_output(cfg)
        return check_output_folder(cfg.output_folder(), _folder_origin(cfg, args.out)) if main_process else None

    folder = together(checks, "the checks before fitting")[0]
    t1 = time.perf_counter()
    loaded: dict = {}
    together(lambda: loaded.update(data=load_data(cfg)), "reading the data")  # every process reads them
    data = loaded["data"]
    t2 = time.perf_counter()
    caught: list = []
    with _warnings_to_stderr(caught):
        if not main_process:  # process 0 reports the warnings
            warnings.simplefilter("ignore")
        res = run_config(cfg, data)
    t3 = time.perf_counter()
    group = launched()
    if not main_process:
        return EXIT_OK
    converged = _converged(res)
    lnl = getattr(res, "lnl", None)
    run_info = {
        "config": cfg.to_dict(),
        "converged": converged,
        "lnl": None if lnl is None else float(lnl),
        "n_rows_data": int(len(data)),
        "warnings": caught,
        "device": _device_info(cfg.fit.device),
        "world_size": 1 if group is None else group.size,
        "versions": _versions(),
        "command": [_PROG, *args.argv],
        "timings_s": {"config": t1 - t0, "load_data": t2 - t1, "fit": t3 - t2},
    }

    def fill(tmp: Path) -> None:  # run.json last: it vouches for the files beside it
        written = write_outputs(res, tmp, cfg.output.formats)
        t4 = time.perf_counter()
        run_info["timings_s"].update({"write": t4 - t3, "total": t4 - t0})
        run_info["files"] = written + ["run.json"]
        (tmp / "run.json").write_text(json.dumps(_jsonable(run_info), indent=2) + "\n", encoding="utf-8")

    publish_folder(folder, fill, guard=args.interrupts.held)
    if not args.quiet:
        print(str(res.summary()).rstrip("\n"))
        print(f"{_PROG}: results written to {folder}", file=sys.stderr)
    return EXIT_OK


_COMMANDS = {"fit": _cmd_fit, "validate": _cmd_validate, "datasets": _cmd_datasets}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``torchmix`` command; returns the exit status.

    0: success; 2: bad input; 1: numerical failure or unexpected error; 130 / 143: interrupted by
    SIGINT / SIGTERM. The message is one line on stderr; ``--debug`` adds the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help or --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_BAD_INPUT)
    args.argv = argv
    debug = bool(getattr(args, "debug", False))
    with Interrupts() as interrupts:
        args.interrupts = interrupts
        try:
            return _COMMANDS[args.command](args)
        except BaseException as exc:  # noqa: B036 - every way out gets a status and one line
            return _failure(exc, debug)


def _failure(exc: BaseException, debug: bool) -> int:
    """Report ``exc`` on stderr (with its traceback under ``--debug``) and return the exit status."""
    if isinstance(exc, (SystemExit, GeneratorExit)):
        raise exc
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, Interrupted):
        _err("terminated" if exc.exit_status != EXIT_INTERRUPTED else "interrupted")
        return exc.exit_status
    if isinstance(exc, KeyboardInterrupt):
        _err("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, NumericalError):
        _err(f"numerical failure: {exc}")
        return EXIT_NUMERICAL
    if isinstance(exc, TorchmixError):
        _err(str(exc))
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError):  # a missing or unreadable config or data file, an unusable output folder
        _err(str(exc) if not getattr(exc, "filename", None) else f"{exc.strerror}: {exc.filename}")
        return EXIT_BAD_INPUT
    _err(f"unexpected error ({type(exc).__name__}: {exc})"
         + ("" if debug else "; run again with --debug to see where it happened"))
    return EXIT_NUMERICAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Run configurations: one TOML file describes exactly one :func:`torchmix.mix` call.

Schema
------
Every key below is optional unless marked *required*; an absent key takes the default of
:func:`torchmix.mix` (TOML has no null: leave a key out to get ``None``). Keys under
``[model]``, ``[fit]`` and ``[variance]`` are spelled exactly like the keyword arguments of ``mix()``.
Relative paths written in the file are relative to the folder that holds the file.

.. code-block:: toml

    [data]                       # exactly one of `path` and `dataset`
    path    = "data/sim3.csv"    # CSV (.csv, .csv.gz, ...) or Parquet (.parquet, .pq; needs pyarrow)
    dataset = "sleepstudy"       # a dataset shipped with torchmix (`torchmix datasets` lists them)

    [model]
    formula          = "y ~ x + (1 + x | g)"   # required, lme4 syntax
    weights          = ["w1", "w2"]            # one column per level, level 1 first; a single
                                               #   string is one column; absent: unweighted
    cweights         = false                   # true: the weights are conditional
    family           = "gaussian"              # "binomial", "poisson", or any registered name
    link             = "logit"                 # absent: the family's default link
    n_quad           = 13                      # Gauss-Hermite points per random effect (>= 1)
    center_group     = { g = ["x"] }           # weighted group-mean centering per grouping factor
    center_grand     = ["x"]                   # weighted grand-mean centering
    scaling          = "A"                     # "A", "B" or "timss"; absent: no scaling
    survey           = "PISA"                  # survey preset (weight columns and scaling)
    edsurvey_compat  = false                   # reproduce EdSurvey's own behaviour
    plausible_values = { math = ["PV1MATH", "PV2MATH", "PV3MATH"] }
    offset           = "log_exposure"          # column added to the linear predictor (coefficient 1)

    [fit]
    max_iter     = 200
    tol          = 1e-8
    small_sample = "G/(G-1)"                   # or "none"
    device       = "cpu"                       # "cuda", "cuda:1", ...
    dtype        = "float64"                   # or "float32"
    progress     = true                        # progress bars on stderr
    deterministic = false                      # true: bitwise reproducible on CUDA (slower)
    start        = [250.0, 10.0, 600.0, 30.0]  # optional starting values (beta, then tau)
    num_threads  = 1                           # torch threads for the fit; absent: chosen by size

    [variance]                                 # design-based standard errors (default: sandwich)
    se_type           = "linearization"        # "sandwich", "model", "linearization", "replicate"
    df                = "cluster"              # t df: clusters - 1 (or the design's), "normal", a number
    strata            = "STRATUM"              # linearization: strata, PSUs, FPC, lonely-PSU rule
    psu               = "PSU"
    fpc               = 0.05                   # a column, a number, or { stratum = value, ... }
    lonely_psu        = "error"                # "remove", "certainty", "adjust", "average"
    replicate_weights = "W_FSTR\\d+"           # replicates: a pattern, an array, or a table
    replicate_method  = "Fay"                  # "JK1", "JK2", "BRR", "Fay", "bootstrap"
    fay_rho           = 0.5
    mse               = true                   # deviations from the full-sample estimate
    jk_zone           = "JKZONE"               # or jackknife zones and replicate indicators
    jk_rep            = "JKREP"
    replicate_pv      = "all"                  # or "first": replicate variance of the first value

    [output]
    folder  = "results/sleepstudy"             # absent: results/<config name> in the working folder
    formats = ["csv"]                          # table formats: "csv", "json", "parquet" (pyarrow)

    [distributed]                              # runs launched by torchrun (several processes)
    timeout = 1800                             # seconds a process waits for the others, then fails

An unknown section or key, a value of the wrong type or a missing required key raises a
:class:`~torchmix.errors.ConfigError` that names the file, the section and the key, and suggests
the closest valid key. :func:`load_config` parses a file into frozen dataclasses;
:func:`run_config` makes the single ``torchmix.mix`` call.

Modules: :mod:`.schema` (the dataclasses and :data:`SCHEMA`), :mod:`.checks` (the value checkers),
:mod:`.validate` (reading TOML, parsing and the error messages), :mod:`.run` (data, device and
output checks and the ``mix()`` call).
"""

from .run import check_device, check_output, check_run, load_data, run_config
from .schema import (SCHEMA, TABLE_FORMATS, DataConfig, FitConfig, ModelConfig, OutputConfig, RunConfig,
                     VarianceConfig)
from .validate import load_config, parse_config

__all__ = [
    "DataConfig",
    "ModelConfig",
    "FitConfig",
    "VarianceConfig",
    "OutputConfig",
    "RunConfig",
    "SCHEMA",
    "TABLE_FORMATS",
    "load_config",
    "parse_config",
    "load_data",
    "check_device",
    "check_run",
    "check_output",
    "run_config",
]

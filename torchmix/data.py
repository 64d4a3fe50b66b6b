"""Datasets that ship with torchmix (sources in ``torchmix/datasets/SOURCES.md``)."""

from __future__ import annotations

from importlib import resources

import pandas as pd

from .errors import DataError

__all__ = ["list_datasets", "load_dataset"]

_DESCRIPTIONS = {
    "sleepstudy": "reaction times of 18 subjects over 10 days (lme4)",
    "hsb82": "High School and Beyond: maths achievement, 7,185 students in 160 schools",
    "contraception": "contraceptive use of 1,934 women in 60 districts of Bangladesh (1988)",
    "pisa2012_nz": "PISA 2012 New Zealand: 4,291 students, 177 schools, five maths plausible values",
    "pisa2000_us": "PISA 2000 United States: 2,069 students in 148 schools, reading pass/fail",
}

# Columns holding identifiers: read as strings so that ids are labels, never quantities.
_ID_COLUMNS = {
    "sleepstudy": ["Subject"],
    "hsb82": ["school"],
    "contraception": ["woman", "district"],
    "pisa2012_nz": ["SCHOOLID", "STIDSTD", "STRATUM"],
    "pisa2000_us": ["id_school"],
}


def list_datasets() -> dict[str, str]:
    """Names of the shipped datasets with a one-line description each."""
    return dict(_DESCRIPTIONS)


def load_dataset(name: str) -> pd.DataFrame:
    """Load a shipped dataset as a DataFrame (identifier columns as strings).

    Raises
    ------
    DataError
        If ``name`` is not a shipped dataset (the message lists the valid names).
    """
    if name not in _DESCRIPTIONS:
        raise DataError(f"unknown dataset {name!r}; shipped datasets: {', '.join(sorted(_DESCRIPTIONS))}")
    path = resources.files("torchmix").joinpath("datasets", f"{name}.csv")
    dtypes = {c: str for c in _ID_COLUMNS.get(name, [])}
    with resources.as_file(path) as p:
        return pd.read_csv(p, dtype=dtypes)

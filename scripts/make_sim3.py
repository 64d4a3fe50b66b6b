#!/usr/bin/env python3
"""Write ``configs/data/sim3.csv``: a small simulated 3-level data set with survey weights.

Students (15 per class) in classes (4 per school) in 40 schools, 2,400 rows. Class numbers
restart in every school (1-4), so the formula must say ``(1 | school/class)``.

Model: ``y = 10 + 2 x + 1.5 z + a_school + b_class + e`` with ``a ~ N(0, 2^2)``,
``b ~ N(0, 1)``, ``e ~ N(0, 3^2)``; ``x`` varies by student, ``z`` by school.
Weights are unconditional (inverse overall inclusion probabilities): school weight
``w_school = 1 + 2 U``, class ``w_class = w_school (1 + U)``, student
``w_student = w_class (1 + U)``, with independent uniforms ``U``.

Run ``python scripts/make_sim3.py``; the fixed seed makes the file reproducible.
"""

from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20240607
N_SCHOOLS, N_CLASSES, N_STUDENTS = 40, 4, 15
OUT = Path(__file__).resolve().parent.parent / "configs" / "data" / "sim3.csv"


def simulate(seed: int = SEED) -> pd.DataFrame:
    """The simulated data set, one row per student."""
    rng = np.random.default_rng(seed)
    n_cls = N_SCHOOLS * N_CLASSES
    n = n_cls * N_STUDENTS
    school_of_class = np.repeat(np.arange(N_SCHOOLS), N_CLASSES)
    class_of_row = np.repeat(np.arange(n_cls), N_STUDENTS)
    school_of_row = school_of_class[class_of_row]

    w_school = 1.0 + 2.0 * rng.uniform(size=N_SCHOOLS)
    w_class = w_school[school_of_class] * (1.0 + rng.uniform(size=n_cls))
    w_student = w_class[class_of_row] * (1.0 + rng.uniform(size=n))

    z = rng.normal(size=N_SCHOOLS)
    a = rng.normal(scale=2.0, size=N_SCHOOLS)
    b = rng.normal(scale=1.0, size=n_cls)
    x = rng.normal(size=n)
    e = rng.normal(scale=3.0, size=n)
    y = 10.0 + 2.0 * x + 1.5 * z[school_of_row] + a[school_of_row] + b[class_of_row] + e

    return pd.DataFrame({
        "school": [f"S{s + 1:02d}" for s in school_of_row],
        "class": class_of_row % N_CLASSES + 1,
        "y": np.round(y, 4),
        "x": np.round(x, 4),
        "z": np.round(z[school_of_row], 4),
        "w_student": np.round(w_student, 4),
        "w_class": np.round(w_class[class_of_row], 4),
        "w_school": np.round(w_school[school_of_row], 4),
    })


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    frame = simulate()
    frame.to_csv(OUT, index=False)
    print(f"wrote configs/data/{OUT.name}: {len(frame)} rows")

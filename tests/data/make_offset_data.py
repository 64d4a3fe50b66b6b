"""Simulate the poisson rate data used by test_offsets.py (counts with exposure n in 30 groups).

Run from this folder: ``python3 make_offset_data.py`` writes ``poisson_offset.csv``.
"""
import numpy as np
import pandas as pd

rng = np.random.default_rng(20261130)
rows = []
for g in range(30):
    b = rng.normal(0.0, 0.6)
    for i in range(int(rng.integers(4, 12))):
        x = rng.normal()
        n = int(rng.integers(1, 50))
        y = rng.poisson(n * np.exp(-2.0 + 0.4 * x + b))
        rows.append(dict(g=f"g{g:02d}", x=round(float(x), 6), n=n, y=int(y)))
pd.DataFrame(rows).to_csv("poisson_offset.csv", index=False)

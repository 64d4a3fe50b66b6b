"""Per-group crossproducts computed in chunks of whole groups equal plain sums, whatever the layout."""

from __future__ import annotations

import pytest
import torch

from torchmix.likelihood.gaussian import weighted_crossproducts


@pytest.mark.parametrize("layout", ["sorted-equal", "sorted-unequal", "shuffled-unequal"])
@pytest.mark.parametrize("chunk_rows", [7, 16, 1 << 17])
def test_chunked_crossproducts_equal_plain_sums(layout, chunk_rows):
    gen = torch.Generator().manual_seed(11)
    n_groups = 23
    sizes = torch.full((n_groups,), 5) if layout == "sorted-equal" else torch.randint(2, 8, (n_groups,), generator=gen)
    group = torch.repeat_interleave(torch.arange(n_groups), sizes)
    if layout.startswith("shuffled"):
        group = group[torch.randperm(group.numel(), generator=gen)]
    n = group.numel()
    z = torch.randn(2, n, generator=gen, dtype=torch.float64).T          # column-major, like the design
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)            # row-major
    y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    cp = weighted_crossproducts([z, x, y], w, group, n_groups, chunk_rows=chunk_rows)
    m = torch.cat([z, x, y], dim=1)
    for g in range(n_groups):
        rows = group == g
        expected = (m[rows] * w[rows, None]).T @ m[rows]
        torch.testing.assert_close(cp[g], expected, rtol=1e-12, atol=1e-12)

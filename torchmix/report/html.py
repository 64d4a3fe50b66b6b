"""HTML rendering of results for notebooks (``_repr_html_``).

Real ``<table>`` elements, every text escaped (``html.escape``), so that a call such as
``mix(..., data = <DataFrame 180 x 3>)`` shows literally instead of being read as a tag. The
content follows the printed summary (MATH.md section 10): call, notes, variance terms,
correlations, groups, fixed effects, log-likelihood and ICC; a pooled fit adds its plausible
values.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["results_html", "table_html", "format_cell"]

_STYLE = ("<style>.torchmix-results table{border-collapse:collapse;margin:0.3em 0 0.8em 0}"
          ".torchmix-results th,.torchmix-results td{padding:0.15em 0.6em;text-align:right}"
          ".torchmix-results thead th{border-bottom:1px solid #888}.torchmix-results tbody th{font-weight:normal}"
          ".torchmix-results td.label,.torchmix-results th.label{text-align:left}"
          ".torchmix-results caption{text-align:left;font-weight:bold}</style>")


def format_cell(value, digits: int = 6) -> str:
    """Text of one table cell: numbers with ``digits`` significant digits, NaN as ``NA``."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "NA" if not math.isfinite(float(value)) else f"{float(value):.{digits}g}"
    return str(value)


def table_html(frame: pd.DataFrame, caption: str, index: bool = True, label_columns: Sequence[str] = ()) -> str:
    """One escaped ``<table>`` with a caption, a header row and one row per row of ``frame``."""
    esc = html.escape
    head = (["<th class='label'></th>"] if index else []) + [
        f"<th class='{'label' if c in label_columns else 'num'}'>{esc(str(c))}</th>" for c in frame.columns]
    rows = []
    for key, row in frame.iterrows():
        cells = [f"<th class='label'>{esc(str(key))}</th>"] if index else []
        for c in frame.columns:
            cls = "label" if c in label_columns else "num"
            cells.append(f"<td class='{cls}'>{esc(format_cell(row[c]))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table><caption>{esc(caption)}</caption><thead><tr>{''.join(head)}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _variance_frame(res) -> pd.DataFrame:
    vd = res.var_df
    var_rows = vd[vd["var2"] == ""].sort_values("level", ascending=False, kind="stable")
    est = var_rows["estimate"].to_numpy(dtype=float)
    return pd.DataFrame({"Level": var_rows["level"].astype(int).to_numpy(), "Group": var_rows["group"].to_numpy(),
                         "Name": var_rows["var1"].to_numpy(), "Variance": est,
                         "Std. Error": var_rows["se"].to_numpy(dtype=float),
                         "Std.Dev.": np.sqrt(np.clip(est, 0.0, None))})


def _groups_frame(res) -> pd.DataFrame:
    ws = getattr(res, "wgt_stats", None)
    if ws is not None:
        return pd.DataFrame({"Level": list(range(len(ws), 0, -1)), "Group": list(ws.index[::-1]),
                             "n size": [int(n) for n in ws["n"][::-1]], "mean wgt": list(ws["mean"][::-1]),
                             "sum wgt": list(ws["sum"][::-1])})
    names = list(res.ngroups)[::-1] + ["Obs"]
    counts = list(res.ngroups.values())[::-1] + [res.nobs]
    return pd.DataFrame({"Level": list(range(len(names), 0, -1)), "Group": names, "n size": counts})


def results_html(res) -> str:
    """The HTML view of a :class:`~torchmix.results.MixedResults` or ``PooledResults``."""
    esc = html.escape
    parts = [_STYLE, "<div class='torchmix-results'>",
             f"<p><strong>Call:</strong> <code>{esc(str(res.call))}</code></p>"]
    n_pv = getattr(res, "n_pv", None)
    if n_pv is not None:
        cols = ", ".join(map(str, getattr(res, "pv_columns", [])))
        parts.append(f"<p><strong>Plausible values:</strong> {n_pv} ({esc(cols)})</p>")
    if not res.converged:
        parts.append(f"<p><strong>WARNING:</strong> the optimiser did not converge ({esc(str(res.message))})</p>")
    for note in getattr(res, "notes", []):
        parts.append(f"<p>Weights: {esc(str(note))}</p>")
    parts.append(table_html(_variance_frame(res), "Variance terms", index=False, label_columns=("Group", "Name")))
    corr = res.correlations
    if len(corr):
        parts.append(table_html(corr.to_frame("Correlation"), "Correlations of random effects"))
    parts.append(table_html(_groups_frame(res), "Groups", index=False, label_columns=("Group",)))
    fe = pd.DataFrame({"Estimate": res.coef, "Std. Error": res.se, "t value": res.coef / res.se})
    parts.append(table_html(fe, "Fixed effects"))
    foot = []
    if res.lnl is not None:
        foot.append(f"lnl = {esc(format_cell(res.lnl, 10))}")
    if res.icc is not None:
        foot.append(f"Intraclass correlation = {esc(format_cell(res.icc, 4))}")
    if foot:
        parts.append("<p>" + "; ".join(foot) + "</p>")
    parts.append("</div>")
    return "".join(parts)

"""Replicate-variance schemes that surveys' technical documentation prescribes.

Used by ``mix(..., se_type="replicate", survey=NAME)`` when no replicate columns are given.

* **PISA** (2000-2022): 80 student final replicate weights ``W_FSTR1``..``W_FSTR80``, balanced
  repeated replication with Fay's modification, :math:`\\rho = 0.5`, so the variance is
  :math:`\\frac{1}{80(1-0.5)^2}\\sum_r(\\hat\\gamma_r-\\hat\\gamma)^2 = 0.05\\sum_r(\\cdot)^2`
  (OECD, *PISA Data Analysis Manual*, 2nd ed., 2009, ch. 4; *PISA 2018 Technical Report*, ch. 8).
* **TIMSS** (2015 onwards) and **PIRLS** (2016 onwards): jackknife repeated replication over
  sampling zones ``JKZONE`` with replicate indicator ``JKREP``; in each zone one school is
  doubled and its partner dropped, and the complementary replicate is formed too, so each
  zone gives two replicates and the variance is :math:`\\frac12\\sum_r(\\hat\\gamma_r-\\hat\\gamma)^2`
  (*Methods and Procedures: TIMSS 2019 Technical Report*, ch. 14; *PIRLS 2016 Methods and
  Procedures*, ch. 12). Cycles up to TIMSS 2011 / PIRLS 2011 used one replicate per zone with
  factor 1: give ``jk_zone``, ``jk_rep`` and ``jk_both_halves=False`` yourself for those.
* **NAEP**: 62 student replicate weights ``SRWT01``..``SRWT62``, paired jackknife (JK2),
  :math:`\\sum_r(\\hat\\gamma_r-\\hat\\gamma)^2` (NAEP Technical Documentation, "Computation of
  Standard Errors Using Jackknife Replication").
* **TALIS** (2013 onwards): 100 teacher replicate weights ``TRWGT1``..``TRWGT100``, BRR with
  Fay's :math:`\\rho = 0.5` (*TALIS 2018 Technical Report*, ch. 9).

Other surveys have no preset: pass ``replicate_weights`` (or ``jk_zone``/``jk_rep``) and
``replicate_method``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["ReplicatePreset", "REPLICATE_PRESETS", "replicate_preset"]


@dataclass(frozen=True)
class ReplicatePreset:
    """A survey's replicate scheme: level-1 replicate columns (a regular expression) or zones."""

    name: str
    method: str
    pattern: Optional[str] = None        # level-1 replicate weight columns (case-insensitive)
    jk_zone: Optional[str] = None
    jk_rep: Optional[str] = None
    jk_both_halves: bool = False
    fay_rho: Optional[float] = None
    scale: Optional[float] = None


REPLICATE_PRESETS = {
    "PISA": ReplicatePreset("PISA", "Fay", pattern=r"w_fstr\d+", fay_rho=0.5),
    "TIMSS": ReplicatePreset("TIMSS", "JK2", jk_zone="jkzone", jk_rep="jkrep", jk_both_halves=True, scale=0.5),
    "PIRLS": ReplicatePreset("PIRLS", "JK2", jk_zone="jkzone", jk_rep="jkrep", jk_both_halves=True, scale=0.5),
    "NAEP": ReplicatePreset("NAEP", "JK2", pattern=r"srwt\d+"),
    "TALIS": ReplicatePreset("TALIS", "Fay", pattern=r"trwgt\d+", fay_rho=0.5),
}


def replicate_preset(survey: Optional[str]) -> Optional[ReplicatePreset]:
    """The preset of ``survey`` (case-, space-, '-' and '_'-insensitive), or None."""
    if survey is None:
        return None
    key = "".join(ch for ch in str(survey).upper() if ch.isalnum())
    return REPLICATE_PRESETS.get(key)

"""How the uncertainty of a fit is estimated from its per-top-level-group scores.

* :mod:`~torchmix.variance.linearization`: Taylor-series (Binder 1983) variance with strata,
  primary sampling units (PSUs) and finite-population corrections, the lonely-PSU rules of the
  R ``survey`` package, and the design degrees of freedom.
* :mod:`~torchmix.variance.replicates`: replicate-weight variance (JK1, JK2, BRR, Fay,
  bootstrap) from replicate estimates, and replicate factors from jackknife zones.

Both are pure tensor/array math: no pandas, no files.
"""

from .linearization import LONELY_PSU_RULES, StratifiedMeat
from .replicates import REPLICATE_METHODS, ReplicateScheme, replicate_variance, zone_factors

__all__ = ["LONELY_PSU_RULES", "StratifiedMeat", "REPLICATE_METHODS", "ReplicateScheme", "replicate_variance",
           "zone_factors"]

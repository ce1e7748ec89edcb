"""Statistics, cohort analysis, reproducibility and QC reports (seed 000 section 2.3).

* :mod:`.metrics` - Pearson r, Lin's CCC, CV, inter-group CV, relative difference.
* :mod:`.tissue` - per-session tissue statistics (BIDS-derivatives TSV).
* :mod:`.cohort` - cohort table, population summary, Ward protocol clusters, inter-group CV.
* :mod:`.repro` - within-subject reproducibility after rigid registration.
* :mod:`.cse` - a session's fat/water results and their PDFF/R2* summary.
* :mod:`.figures`, :mod:`.report` - matplotlib figures and self-contained HTML pages.
* :mod:`.pipeline` - the steps behind ``qmriflow stats | cohort | repro``.
"""

from __future__ import annotations

from .metrics import (
    bland_altman,
    coefficient_of_variation,
    intergroup_cv,
    lin_ccc,
    pearson_r,
    relative_difference,
)

__all__ = [
    "bland_altman",
    "coefficient_of_variation",
    "intergroup_cv",
    "lin_ccc",
    "pearson_r",
    "relative_difference",
]

"""One compact table per yardstick report: what a cohort study needs from each method.

    python bench/yardstick_summary.py WORK/yardstick.json [...]

Per method (and the ``prior`` / ``constant`` baselines): the between-subject slope (r) of the
estimated on the true session means of WM/GM T1, T2 and PD — within protocol clusters where
the report has more than one — the RMS error of those means, and the recovered fraction of the
brain-wide T1/T2 shift. Computed by bench_yardstick's own functions from the JSON it wrote.
When the report has both, a second table compares the fast path with the default: per WM/GM
T1, T2 and PD, the median and largest |network-only / calibrated − 1| of the session means and
the share of sessions within 5 % (issue 22: "the fast path is calibrated").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_yardstick import (
    PARAMS,
    TISSUES,
    between_slope,
    error_summary,
    method_order,
    recovered_shift,
    title_suffix,
    within_cluster_slope,
)


def _f(v: float, fmt: str = ".2f") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, fmt)


def summary(report: dict[str, Any]) -> str:
    s = report["settings"]
    clusters = int(s.get("clusters", 1))
    slope = within_cluster_slope if clusters > 1 else between_slope
    kind = "within-cluster slope (r)" if clusters > 1 else "slope (r)"
    cols = [f"{t} {p}" for p in PARAMS for t in TISSUES]
    lines = [f"**{title_suffix(s)}**, {s.get('sessions_used', '?')} sessions, seeds "
             f"{s.get('seeds')}, {s.get('epochs', '?')} training epochs"
             + (f", distillation {s['distill']:g}" if s.get("distill") else ""), "",
             f"| method | {' | '.join(f'{c} {kind}' for c in cols)} | "
             f"{' | '.join(f'{c} RMS %' for c in cols)} | shift T1 | shift T2 |",
             "|" + "---|" * (2 * len(cols) + 3)]
    for m in method_order(report):
        rows = report["methods"][m]["sessions"]
        sl, rms = [], []
        for p in PARAMS:
            for t in TISSUES:
                b, r = slope(rows, t, p)
                sl.append(f"{_f(b)} ({_f(r)})")
                rms.append(_f(error_summary(rows, t, p)["rms"], ".1f"))
        sh = [recovered_shift(rows, p) for p in ("T1", "T2")]
        name = f"{m} (default)" if m == s.get("default_method") else m
        lines.append(f"| {name} | {' | '.join(sl)} | {' | '.join(rms)} | "
                     f"{_f(sh[0]['slope'])} | {_f(sh[1]['slope'])} |")
    return "\n".join(lines) + "\n"


def fast_path_agreement(report: dict[str, Any], fast: str = "network-only",
                        ref: str = "calibrated", within: float = 5.0) -> str:
    """The fast path's session means against the default's (see the module docstring); empty
    when the report lacks either method."""
    methods = report["methods"]
    if fast not in methods or ref not in methods:
        return ""
    key = lambda r: (r["label"], r.get("seed"))  # noqa: E731
    refs = {key(r): r for r in methods[ref]["sessions"]}
    cols, cells = [], []
    for p in PARAMS:
        for t in TISSUES:
            d = [100.0 * abs(r["estimated"][t][p] / refs[key(r)]["estimated"][t][p] - 1.0)
                 for r in methods[fast]["sessions"] if key(r) in refs]
            d.sort()
            cols.append(f"{t} {p}")
            if not d:
                cells.append("—")
                continue
            med = d[len(d) // 2] if len(d) % 2 else 0.5 * (d[len(d) // 2 - 1] + d[len(d) // 2])
            share = 100.0 * sum(x <= within for x in d) / len(d)
            cells.append(f"{med:.1f} / {d[-1]:.1f} / {share:.0f} %")
    return "\n".join([
        f"{fast} vs {ref} (the default): median / largest |{fast} / {ref} − 1| % of the "
        f"session means / sessions within {within:g} %", "",
        f"| {' | '.join(cols)} |", "|" + "---|" * len(cols), f"| {' | '.join(cells)} |"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="yardstick_summary", description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="yardstick.json files")
    a = ap.parse_args(argv)
    for p in a.reports:
        try:
            report = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            print(f"yardstick_summary: {p}: {exc}", file=sys.stderr)
            return 2
        print(summary(report))
        agreement = fast_path_agreement(report)
        if agreement:
            print(agreement)
    return 0


if __name__ == "__main__":
    sys.exit(main())

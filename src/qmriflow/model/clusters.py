"""Scanner-protocol clusters of an archive and their fitted gain ratios (``clusters.json``).

The statistics of :mod:`qmriflow.model.cluster_scales` applied to preprocessed sessions:

* :func:`protocol_signature` / :func:`group_sessions`: sessions belong to one cluster when they
  come from the same manufacturer, model and field strength with the same sequence families
  and 2D/3D per contrast, and TR, TE, TI and flip angle agree within a relative ``tolerance``
  (single linkage: a chain of close protocols is one cluster);
* :func:`observe` reads a session's tissue medians, normalising modes and intensity scaling;
* :func:`fit_clusters` (``qmriflow cluster-fit``) fits every cluster with at least
  ``min_sessions`` sessions whose gains are comparable between series, and writes
  ``clusters.json``; a calibration session's reference values (``calibration``) set its
  cluster's level. Run again on an existing file it keeps the fitted clusters and records the
  new sessions for :func:`session_calibration` to join; ``refit=True`` refits and records what
  changed;
* :func:`session_calibration`: the scales a session's maps are made with — its cluster's fit,
  joining a fitted cluster without refitting it, or the per-session calibration (with the
  reason) — used by ``pack`` and ``infer``.

Long because clustering sessions by protocol and reading/writing the clusters' fitted gains go
together (one file format).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .calibration import (
    Calibration,
    calibrate_scales,
    tissue_medians,
)
from .cluster_scales import (
    ClusterFit,
    ClusterPriors,
    SessionObservation,
    fit_cluster,
    gains_consistent,
    join_cluster,
)
from .normalise import CONTRASTS

__all__ = [
    "CLUSTER_VERSION",
    "DEFAULT_MIN_SESSIONS",
    "DEFAULT_TOLERANCE",
    "TISSUE_SD_MAX",
    "ObservedSession",
    "fit_clusters",
    "group_sessions",
    "load_clusters",
    "observe",
    "protocol_signature",
    "same_protocol",
    "session_calibration",
]

CLUSTER_VERSION = 1
DEFAULT_MIN_SESSIONS = 3
"""Fewer sessions than this: the cluster's sessions keep the per-session calibration."""
DEFAULT_TOLERANCE = 0.05
"""Relative difference of TR/TE/TI/FA up to which two protocols are the same protocol."""
RATIO_SD_EXPECTED = 0.25
"""Expected scatter (log-SD) of per-session T1w/T2w gain-ratio estimates when the gains *are*
comparable: the per-session calibration's own uncertainty of the T1w scale (CSF partial volume,
tissue priors). :func:`fit_clusters` refuses the cluster model above twice this."""
TISSUE_SD_MAX = 0.25
"""Largest robust log-SD across a cluster's sessions of a fitted WM or GM T1 or T2 that the
cluster model may produce. Between adult subjects these values differ by some ten percent
(ageing, MS, dementia shift WM T1 by 5-15 %); the yardstick phantom's ±20 % per tissue and
±10 % brain-wide give log-SD ≈ 0.13. A fit that spreads them much further (0.25 ≈ ±28 % at one
SD) is explaining gains that differ between sessions — the FLAIR's, which no session
anchors on its own — as tissue differences: :func:`fit_clusters` then keeps the per-session
calibration. A physiological bound, not tuned on the phantom."""
ROLE = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair"}
_NUMERIC = ("tr_ms", "te_ms", "ti_ms", "fa_deg")


# ---------------------------------------------------------------------------------------------
# protocols
# ---------------------------------------------------------------------------------------------


def protocol_signature(params: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a session's scanner protocol, from its protocol-parameters JSON."""
    first = next((params[r] for r in ("t2w", "t1w", "flair") if params.get(r)), {})
    field = first.get("field_strength_t")
    sig: dict[str, Any] = {
        "manufacturer": str(first.get("manufacturer") or "").strip().lower(),
        "model": str(first.get("manufacturer_model") or "").strip().lower(),
        "field_t": None if field is None else round(float(field), 1),
    }
    for c, role in ROLE.items():
        e = params.get(role)
        if not e:
            sig[c] = None
            continue
        sig[c] = {"sequence": e.get("sequence"), "acquisition": e.get("acquisition"),
                  **{k: e.get(k) for k in _NUMERIC}}
    return sig


def same_protocol(a: Mapping[str, Any], b: Mapping[str, Any], tolerance: float) -> bool:
    """Whether two signatures are one protocol (module docstring)."""
    if any(a.get(k) != b.get(k) for k in ("manufacturer", "model", "field_t")):
        return False
    for c in CONTRASTS:
        x, y = a.get(c), b.get(c)
        if (x is None) != (y is None):
            return False
        if x is None:
            continue
        if x["sequence"] != y["sequence"] or x["acquisition"] != y["acquisition"]:
            return False
        for k in _NUMERIC:
            u, v = x.get(k), y.get(k)
            if (u is None) != (v is None):
                return False
            if u is not None and abs(float(u) - float(v)) > tolerance * max(abs(u), abs(v)):
                return False
    return True


def _cluster_id(signature: Mapping[str, Any]) -> str:
    """A stable name: a hash of the founding session's rounded signature."""
    text = json.dumps(signature, sort_keys=True, default=str)
    return "protocol-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def group_sessions(signatures: Mapping[str, Mapping[str, Any]],
                   tolerance: float = DEFAULT_TOLERANCE) -> dict[str, list[str]]:
    """Single-linkage groups of sessions (label → signature) with :func:`same_protocol`;
    returns cluster name → sorted labels (named after the first label's signature)."""
    labels = sorted(signatures)
    parent = {lab: lab for lab in labels}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if same_protocol(signatures[a], signatures[b], tolerance):
                ra, rb = root(a), root(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for lab in labels:
        groups.setdefault(root(lab), []).append(lab)
    return {_cluster_id(signatures[first]): members for first, members in groups.items()}


# ---------------------------------------------------------------------------------------------
# sessions
# ---------------------------------------------------------------------------------------------


@dataclass
class ObservedSession:
    """One session as the cluster fit sees it."""

    label: str
    subject: str
    observation: SessionObservation
    signature: dict[str, Any]
    comparable: bool
    """Whether the vendor made the series' intensities comparable (Philips FP)."""
    own: Calibration
    """The per-session calibration (the fallback, and the gain-consistency test)."""


def observe(session_dir: str | Path, *, reference: Mapping[str, Any] | None = None
            ) -> ObservedSession:
    """Read one preprocessed session for the cluster fit (raises :class:`InputError`)."""
    from .data import load_session, session_seg

    sd = load_session(session_dir)
    seg = session_seg(sd)
    medians, counts = tissue_medians(sd.images, seg, sd.brain, sd.contrasts)
    if "CSF" not in medians:
        raise InputError(f"too few CSF voxels ({counts.get('CSF', 0)}) in the segmentation to "
                         "calibrate the scales", session=sd.label, path=sd.files.dseg)
    params = json.loads(Path(sd.files.params).read_text())
    own = calibrate_scales(dict(sd.protocols), medians)
    own.n_voxels = counts
    ref = _reference_values(sd, seg, reference) if reference else None
    obs = SessionObservation(sd.label, dict(sd.protocols), medians,
                             {c: math.log(sd.modes[c]) for c in sd.contrasts}, ref)
    comparable = all((params.get(ROLE[c]) or {}).get("intensity_scaling", {})
                     .get("comparable_between_series", False) for c in sd.contrasts)
    return ObservedSession(sd.label, sd.files.subject, obs, protocol_signature(params),
                           comparable, own)


def _reference_values(sd: Any, seg: np.ndarray, reference: Mapping[str, Any]
                      ) -> dict[str, dict[str, float]]:
    """A calibration session's reference tissue values: given directly (``{"values": {"WM":
    {"T1": s, "T2": s, "PD": x}, ...}}``) or as reference maps of the same subject on the
    session's grid (``{"maps": {"T1map": path, "T2map": path, "PDmap": path}}``), averaged over
    the session's eroded WM and GM masks."""
    import nibabel as nib

    key = {"T1": "t1_s", "T2": "t2_s", "PD": "pd"}
    if "values" in reference:
        vals = reference["values"]
        return {t: {key[p]: float(v) for p, v in vals[t].items() if p in key}
                for t in ("WM", "GM") if t in vals}
    maps = reference.get("maps") or {}
    out: dict[str, dict[str, float]] = {}
    masks = {}
    for t, path in (("WM", sd.files.wm_eroded), ("GM", sd.files.gm_eroded)):
        if not Path(path).is_file():
            raise InputError(f"calibration session: eroded {t} mask is missing", session=sd.label,
                             path=path)
        masks[t] = np.moveaxis(np.asarray(nib.load(path).dataobj) > 0, 2, 0)
    for p, name in (("T1", "T1map"), ("T2", "T2map"), ("PD", "PDmap")):
        path = maps.get(name)
        if not path:
            continue
        path = Path(path)
        if not path.is_file():
            raise InputError(f"calibration session: reference {name} is missing",
                             session=sd.label, path=path)
        sub = next((part for part in path.name.split("_") if part.startswith("sub-")), None)
        if sub is not None and sub != f"sub-{sd.files.subject}":
            raise InputError(f"calibration session: reference {name} belongs to {sub}, not to "
                             f"sub-{sd.files.subject}", session=sd.label, path=path)
        data = np.moveaxis(np.asarray(nib.load(path).dataobj, np.float64), 2, 0)
        if data.shape != masks["WM"].shape:
            raise InputError(f"calibration session: reference {name} shape "
                             f"{np.moveaxis(data, 0, 2).shape} differs from the session's "
                             f"{sd.shape}", session=sd.label, path=path)
        for t, m in masks.items():
            v = data[m & np.isfinite(data) & (data > 0)]
            if v.size:
                out.setdefault(t, {})[key[p]] = float(np.mean(v))
    if not out:
        raise InputError("calibration session: no reference values (give 'values' or 'maps')",
                         session=sd.label)
    return out


# ---------------------------------------------------------------------------------------------
# the archive
# ---------------------------------------------------------------------------------------------


def _log_gain_ratio(o: ObservedSession, c: str) -> float:
    """The session's own estimate of log(gain_c / gain_T2w) (scales × normalising modes)."""
    lm = o.observation.log_modes
    return (math.log(o.own.scales[c]) + lm[c]) - (math.log(o.own.scales["T2w"]) + lm["T2w"])


def fit_clusters(session_dirs: Sequence[str | Path], out_json: str | Path, *,
                 calibration: Mapping[str, Mapping[str, Any]] | None = None,
                 min_sessions: int = DEFAULT_MIN_SESSIONS,
                 tolerance: float = DEFAULT_TOLERANCE, refit: bool = False,
                 priors: ClusterPriors | None = None, state: str | Path | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Group the sessions into protocol clusters, fit each (module docstring) and write
    ``out_json``. A session that cannot be read is left out with its one-line reason. With an
    existing ``out_json`` and ``refit=False`` the fitted clusters are kept as they are and new
    sessions are only listed (they join at inference), while a cluster not fitted before (too
    few sessions then) is fitted once it can be; ``refit=True`` refits and records the
    change of every cluster's ratios and level in ``history``. ``state``: where the fitted
    clusters persist between runs (default ``out_json``; a workflow whose tool deletes the
    output before rerunning keeps them in a separate file); it is written too."""
    if min_sessions < 2:
        raise InputError(f"min_sessions must be >= 2, got {min_sessions}")
    if not 0 < tolerance < 1:
        raise InputError(f"tolerance must be in (0, 1), got {tolerance}")
    out_json = Path(out_json)
    state_path = Path(state) if state is not None else out_json
    old = load_clusters(state_path) if state_path.is_file() else None
    calibration = dict(calibration or {})
    observed: dict[str, ObservedSession] = {}
    skipped: dict[str, str] = {}
    for d in session_dirs:
        from .data import session_files

        label = session_files(d).label
        ref = calibration.get(label)
        try:
            observed[label] = observe(d, reference=ref)
        except (InputError, ValueError, OSError) as exc:
            if ref is not None and "calibration session" in str(exc):
                # the reference is unusable: the session still counts, without it
                log(f"qmriflow cluster-fit: {exc}; the session joins its cluster without "
                    "reference values")
                try:
                    observed[label] = observe(d)
                    continue
                except (InputError, ValueError, OSError) as exc2:
                    exc = exc2
            skipped[label] = " ".join(str(exc).split())
            log(f"qmriflow cluster-fit: session {label} left out: {skipped[label]}")
    unknown = sorted(set(calibration) - set(observed) - set(skipped))
    for label in unknown:
        log(f"qmriflow cluster-fit: calibration session {label} is not among the sessions")
    groups = group_sessions({k: v.signature for k, v in observed.items()}, tolerance)
    doc: dict[str, Any] = {
        "version": CLUSTER_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": {"min_sessions": min_sessions, "tolerance": tolerance,
                     "ratio_sd_expected": RATIO_SD_EXPECTED},
        "clusters": {}, "sessions": {},
        "skipped": skipped, "history": list((old or {}).get("history", [])),
    }
    for name, labels in sorted(groups.items()):
        kept = (old or {}).get("clusters", {}).get(name)
        if kept is not None and kept.get("fit") and not refit:
            new = [lab for lab in labels if lab not in kept["sessions"]]
            doc["clusters"][name] = {**kept, "pending": sorted(set(kept.get("pending", []))
                                                               | set(new))}
            if new:
                log(f"qmriflow cluster-fit: {name}: {len(new)} new session(s) will join the "
                    "fitted cluster at inference (not refitted; use --refit)")
            refs = sorted(lab for lab in labels if lab in calibration)
            had = sorted((kept.get("fit") or {}).get("reference_sessions", []))
            if kept.get("fit") and refs != had:
                log(f"qmriflow cluster-fit: {name}: calibration sessions {refs or 'none'} "
                    f"differ from the fit's {had or 'none'}; the fit is kept (use --refit)")
            continue
        doc["clusters"][name] = _fit_one(name, [observed[lab] for lab in labels], min_sessions,
                                         priors, log)
        if kept is not None and refit:
            doc["history"].append(_change(name, kept, doc["clusters"][name]))
    for name, c in doc["clusters"].items():
        for lab in c["sessions"] + c.get("pending", []):
            fit = c.get("fit")
            method = ("cluster" if fit and lab in fit["sessions"] else
                      "cluster (joins at inference)" if fit else "per-session")
            doc["sessions"][lab] = {"cluster": name, "method": method,
                                    "reason": c["status"] if not fit else None}
    from ..io import write_json

    write_json(out_json, doc)
    if state_path != out_json:
        write_json(state_path, doc)
    return doc


def _tissue_scatter(fit: Any) -> dict[str, float]:
    """Robust log-SD (1.4826 × MAD) across the fit's sessions of each WM/GM T1 and T2."""
    out = {}
    for t in ("WM", "GM"):
        for p, name in (("t1_s", "T1"), ("t2_s", "T2")):
            v = np.log([s.tissues[t][p] for s in fit.sessions.values()])
            out[f"{t} {name}"] = float(1.4826 * np.median(np.abs(v - np.median(v))))
    return out


def _fit_one(name: str, members: Sequence[ObservedSession], min_sessions: int,
             priors: ClusterPriors | None, log: Callable[[str], None]) -> dict[str, Any]:
    labels = [m.label for m in members]
    entry: dict[str, Any] = {"signature": members[0].signature, "sessions": labels,
                             "vendor_comparable": all(m.comparable for m in members),
                             "fit": None}
    contrasts = {m.observation.contrasts for m in members}
    if len(members) < min_sessions:
        entry["status"] = (f"per-session calibration: {len(members)} session(s), fewer than "
                           f"min_sessions {min_sessions}")
    elif len(contrasts) > 1 or "T2w" not in next(iter(contrasts)):
        entry["status"] = "per-session calibration: the sessions differ in their contrasts"
    else:
        checks = {c: gains_consistent([_log_gain_ratio(m, c) for m in members],
                                      expected_sd=RATIO_SD_EXPECTED)
                  for c in members[0].observation.contrasts if c == "T1w"}
        entry["gain_ratio_scatter"] = {c: v[1] for c, v in checks.items()}
        bad = [c for c, (ok, _) in checks.items() if not ok]
        if bad:
            entry["status"] = (f"per-session calibration: the {bad[0]}/T2w gain ratio scatters "
                               f"by {checks[bad[0]][1]:.2f} (robust log-SD) between sessions, "
                               f"more than {2 * RATIO_SD_EXPECTED:.2f}: the series' gains are "
                               "not comparable between sessions")
        else:
            try:
                fit = fit_cluster([m.observation for m in members], priors)
            except (ValueError, np.linalg.LinAlgError) as exc:
                entry["status"] = f"per-session calibration: cluster fit failed ({exc})"
            else:
                spread = _tissue_scatter(fit)
                entry["tissue_scatter"] = spread
                worst = max(spread, key=lambda k: spread[k])
                if spread[worst] > TISSUE_SD_MAX:
                    entry["status"] = (
                        f"per-session calibration: the cluster fit spreads the sessions' "
                        f"{worst} by {spread[worst]:.2f} (robust log-SD), more than between-"
                        f"subject differences allow ({TISSUE_SD_MAX:.2f}): the series' gains "
                        "are not comparable between sessions")
                else:
                    entry["fit"] = fit.as_dict()
                    entry["status"] = (f"fitted: {len(members)} sessions, level from "
                                       f"{fit.level}")
    log(f"qmriflow cluster-fit: {name}: {entry['status']}")
    return entry


def _change(name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What a refit changed (recorded in ``history``)."""
    def ratios(c: Mapping[str, Any]) -> dict[str, float] | None:
        return None if not c.get("fit") else c["fit"]["log_ratios"]

    return {"refit": time.strftime("%Y-%m-%dT%H:%M:%S"), "cluster": name,
            "sessions_before": len(old.get("sessions", [])),
            "sessions_after": len(new.get("sessions", [])),
            "log_ratios_before": ratios(old), "log_ratios_after": ratios(new),
            "level_before": (old.get("fit") or {}).get("level"),
            "level_after": (new.get("fit") or {}).get("level")}


def load_clusters(path: str | Path) -> dict[str, Any]:
    """Read a ``clusters.json`` (raises :class:`InputError` with one line)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("clusters file is missing", path=path) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable clusters file ({exc})", path=path) from None
    if not isinstance(doc, dict) or doc.get("version") != CLUSTER_VERSION:
        raise InputError(f"not a qmriflow clusters file of version {CLUSTER_VERSION}", path=path)
    return doc


def _fit_from_dict(d: Mapping[str, Any]) -> ClusterFit:
    pri = d.get("priors", {})
    priors = ClusterPriors(between_subject_sd=pri.get("between_subject_sd", 0.3),
                           ratio_jitter_sd=pri.get("ratio_jitter_sd", 0.05),
                           reference_sd=pri.get("reference_sd", 0.03))
    return ClusterFit(contrasts=tuple(d["contrasts"]), log_ratios=dict(d["log_ratios"]),
                      log_ratio_sd=dict(d["log_ratio_sd"]), mu=dict(d["mu"]),
                      mu_log_sd=dict(d["mu_log_sd"]), sessions={}, level=d["level"],
                      reference_sessions=list(d["reference_sessions"]), jitter={},
                      priors=priors)


def _calibration_from_dict(d: Mapping[str, Any], contrasts: Sequence[str]) -> Calibration:
    """A stored session calibration restricted to ``contrasts``."""
    allc = list(d["contrasts"])
    idx = [allc.index(c) for c in contrasts]
    cov = np.asarray(d["log_cov"], dtype=np.float64)[np.ix_(idx, idx)]
    return Calibration(contrasts=tuple(contrasts),
                       scales={c: float(d["scales"][c]) for c in contrasts},
                       log_sd={c: float(d["log_sd"][c]) for c in contrasts},
                       log_cov=cov.tolist(), tissues={t: dict(v) for t, v in d["tissues"].items()},
                       medians={t: dict(v) for t, v in d["medians"].items()},
                       n_voxels=dict(d.get("n_voxels") or {}), method=d.get("method", "cluster"))


def session_calibration(doc: Mapping[str, Any], sd: Any, contrasts: Sequence[str],
                        seg: np.ndarray, tolerance: float | None = None
                        ) -> tuple[Calibration | None, dict[str, Any]]:
    """The scales of a loaded session from a clusters file: ``(calibration, info)``;
    ``calibration`` is None when the session is to be calibrated on its own (``info`` says
    why). A session of a fitted cluster takes its fitted scales; a session the file does not
    know but whose protocol matches a fitted cluster joins it (ratios and cohort values fixed);
    any other session falls back."""
    contrasts = tuple(contrasts)
    label = sd.label
    tol = float(tolerance if tolerance is not None else doc["settings"]["tolerance"])
    params = json.loads(Path(sd.files.params).read_text())
    sig = protocol_signature(params)
    name = (doc.get("sessions", {}).get(label) or {}).get("cluster")
    if name is None:
        name = next((n for n, c in doc.get("clusters", {}).items()
                     if same_protocol(sig, c["signature"], tol)), None)
    cluster = doc.get("clusters", {}).get(name) if name else None
    if cluster is None:
        return None, {"scales_from": "per-session calibration",
                      "reason": "no protocol cluster of the clusters file matches the session"}
    fit = cluster.get("fit")
    info: dict[str, Any] = {"cluster": name, "cluster_status": cluster["status"]}
    if not fit:
        return None, {**info, "scales_from": "per-session calibration",
                      "reason": cluster["status"]}
    info["level"] = fit["level"]
    info["level_assumption"] = (
        "the cluster's median WM/GM values follow the literature prior (cohort prior): an "
        "assumption; differences between the cluster's sessions are measured, its absolute "
        "level is not" if fit["level"] == "cohort prior" else
        f"reference values of calibration session(s) {', '.join(fit['reference_sessions'])}")
    info["log_ratios"] = fit["log_ratios"]
    stored = fit["sessions"].get(label)
    if stored is not None and tuple(stored["contrasts"]) == contrasts:
        return _calibration_from_dict(stored, contrasts), {**info, "scales_from": "cluster fit"}
    # join: this session (or this subset of its contrasts: a contrast withheld from the maps is
    # withheld from their calibration too) with the cluster's ratios and cohort values fixed
    if not set(contrasts) <= set(fit["contrasts"]):
        return None, {**info, "scales_from": "per-session calibration",
                      "reason": "the session's contrasts are not its cluster's"}
    medians, counts = tissue_medians(sd.images[:, [sd.contrasts.index(c) for c in contrasts]],
                                     seg, sd.brain, contrasts)
    if "CSF" not in medians:
        return None, {**info, "scales_from": "per-session calibration",
                      "reason": "too few CSF voxels to join the cluster"}
    obs = SessionObservation(label, {c: sd.protocols[c] for c in contrasts}, medians,
                             {c: math.log(sd.modes[c]) for c in contrasts})
    cal = join_cluster(obs, _fit_from_dict(fit))
    cal.n_voxels = dict(counts)
    how = ("cluster (joined without refitting)" if stored is None else
           f"cluster ratios, from {'+'.join(contrasts)} only")
    return cal, {**info, "scales_from": how}

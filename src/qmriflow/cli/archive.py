"""``qmriflow discover | locate | convert | params``: from the archive to validated inputs.

Registered with ``@command``; imported lazily by :func:`qmriflow.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import (
    _provenance,
    _session_args,
    arguments,
    command,
)

# ---------------------------------------------------------------------------------------------
# discover / convert
# ---------------------------------------------------------------------------------------------


def _discover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input_dir", type=Path)
    p.add_argument("sessions_tsv", type=Path)
    p.add_argument("series_tsv", type=Path)
    p.add_argument("--salt", required=True, help="secret pseudonymisation salt")
    p.add_argument("--input-format", choices=["dicom", "bids"], default="dicom")
    p.add_argument("--quiet-period-min", type=float, default=0.0,
                   help="defer studies with a file written less than this many minutes ago "
                        "(DICOM; 0 = off)")


@command("discover", "find sessions and classify series in an archive (sessions/series TSV)")
@arguments(_discover_args)
def _discover(a: argparse.Namespace) -> int:
    from ..archive.discover import discover, is_deferred, write_tables

    sessions, series = discover(a.input_dir, a.salt, input_format=a.input_format,
                                quiet_period_s=60.0 * a.quiet_period_min)
    write_tables(sessions, series, a.sessions_tsv, a.series_tsv)
    ok = sum(1 for r in sessions if r.get("status") == "ok")
    deferred = sum(1 for r in sessions if is_deferred(r))
    print(f"{len(sessions)} session(s), {ok} complete, {deferred} deferred, "
          f"{len(series)} series in {a.input_dir}")
    return 0


def _locate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input_dir", type=Path, help="the archive folder given to discovery")
    p.add_argument("refs", nargs="+", metavar="REF",
                   help="a file reference (#<12 hex>) from a status or failure message, or a "
                        "folder reference (the 'folder' column of series.tsv)")
    p.add_argument("--salt", required=True, help="the discovery's pseudonym salt")


@command("locate", "print the archive path behind a file or folder reference of a message "
                   "(on this terminal only: the path may identify the patient)")
@arguments(_locate_args)
def _locate(a: argparse.Namespace) -> int:
    from ..archive.discover import locate

    missing = 0
    for ref in a.refs:
        found = locate(a.input_dir, ref, a.salt)
        missing += not found
        for p in found:
            print(f"{ref}\t{p}")
        if not found:
            print(f"{ref}\tnot found (another archive folder or salt?)", file=sys.stderr)
    return 1 if missing else 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sessions_tsv", type=Path)
    p.add_argument("series_tsv", type=Path)
    p.add_argument("input_dir", type=Path)
    p.add_argument("out_dir", type=Path, help="session folder to create")
    p.add_argument("--input-format", choices=["dicom", "bids"], default="dicom")
    p.add_argument("--no-anonymise", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--salt", help="the discovery's pseudonym salt (series folders are hashed "
                                  "with it in the series table)")
    _session_args(p)


@command("convert", "convert one session's selected series to role-named NIfTI (dcm2niix)")
@arguments(_convert_args)
def _convert(a: argparse.Namespace) -> int:
    from ..archive.discover import read_series_tsv, read_sessions_tsv
    from ..archive.ingest import ingest_session

    summary = ingest_session(
        a.subject, a.session, read_sessions_tsv(a.sessions_tsv), read_series_tsv(a.series_tsv),
        a.input_dir, a.out_dir, input_format=a.input_format, anonymise=not a.no_anonymise,
        timeout_s=a.timeout, salt=a.salt,
    )
    _provenance(a, "convert", {k: v for k, v in summary.items() if k != "session"})
    print(f"{summary['session']}: {len(summary['images'])} image(s)")
    return 0


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_dir", type=Path, help="converted session folder")
    p.add_argument("series_tsv", type=Path)
    p.add_argument("out_json", type=Path)
    p.add_argument("--allow-non-3t", action="store_true", help="do not require 3 T")
    p.add_argument("--te-correction", default="",
                   help="comma list, e.g. tse=0.9,flair=0.42,flair_short=0.89,"
                        "flair_short_te_ms=200")
    p.add_argument("--echo-train", default="",
                   help="comma list of physics.echo_train settings, e.g. model=auto,"
                        "t2w_refocusing_deg=150,flair_3d_schedule=assumed (model=off: the "
                        "seed's TE factors only)")
    _session_args(p)


def _echo_train_settings(text: str, label: str) -> Any:
    """``--echo-train`` -> :class:`~qmriflow.archive.params.EchoTrainSettings` (one-line error)."""
    from ..archive.params import EchoTrainSettings

    values: dict[str, Any] = {}
    try:
        for kv in (x for x in text.split(",") if x):
            k, v = kv.split("=")
            values[k] = (None if v in ("", "null", "None") else float(v)
                         if k.endswith(("_deg", "_ms")) else v)
        return EchoTrainSettings(**values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad --echo-train {text!r}: {exc}", session=label) from None


@command("params", "extract and validate one session's acquisition parameters (JSON)")
@arguments(_params_args)
def _params(a: argparse.Namespace) -> int:
    from ..archive.discover import read_series_tsv
    from ..archive.ingest import converted_sidecars, session_label
    from ..archive.params import extract_session_params
    from ..io import write_json
    from ..physics import TECorrection

    label = session_label(a.subject, a.session)
    try:
        tec = TECorrection(**{k: float(v) for k, v in
                              (kv.split("=") for kv in a.te_correction.split(",") if kv)})
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad --te-correction: {exc}", session=label) from None
    rows = [r for r in read_series_tsv(a.series_tsv)
            if r["subject"] == a.subject and r["session"] == a.session]
    trains = _echo_train_settings(a.echo_train, label)
    params = extract_session_params(converted_sidecars(a.session_dir), rows,
                                    require_3t=not a.allow_non_3t, te_correction=tec,
                                    session=label, echo_train=trains)
    write_json(a.out_json, params)
    _provenance(a, "params", {"require_3t": not a.allow_non_3t,
                              "te_correction": tec.__dict__,
                              "echo_train": dict(trains.__dict__)})
    print(f"{label}: parameters valid")
    return 0

"""Command-line interface: ``qmriflow <step> ...``.

Every Snakemake rule calls exactly one of these subcommands. Failures that the user can act on
end with a one-line message on stderr (``qmriflow <step>: error: session ...: file: reason``)
and exit status 1; nothing partial is left where a complete output is expected.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import InputError, QmriflowError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str):
    def deco(fn: Handler) -> Handler:
        _COMMANDS[name] = (help_text, getattr(fn, "_configure", lambda p: None), fn)
        return fn

    return deco


def arguments(configure: Callable[[argparse.ArgumentParser], None]):
    def deco(fn: Handler) -> Handler:
        fn._configure = configure  # type: ignore[attr-defined]
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# phantom
# ---------------------------------------------------------------------------------------------


def _phantom_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output folder (dicom/, truth/, manifest.json)")
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--sessions", type=int, default=2)
    p.add_argument("--size", choices=["small", "full"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cse", action="store_true", help="add a 6-echo GRE fat/water series")
    p.add_argument("--snr", type=float, default=40.0, help="brain-mean signal / noise sigma")
    p.add_argument("--workers", type=int, default=2, help="parallel subjects")


@command("phantom", "generate a digital brain phantom DICOM archive with ground truth")
@arguments(_phantom_args)
def _phantom(a: argparse.Namespace) -> int:
    from .phantom.generate import PhantomOptions, generate_archive

    m = generate_archive(a.out, PhantomOptions(
        subjects=a.subjects, sessions=a.sessions, size=a.size, seed=a.seed, cse=a.cse,
        snr=a.snr, workers=a.workers,
    ))
    print(f"wrote {len(m['series'])} series for {a.subjects} subject(s) x {a.sessions} "
          f"session(s) to {a.out} in {m['seconds']:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t1", type=Path, required=True, help="T1 map in seconds (BIDS T1map)")
    p.add_argument("--t2", type=Path, required=True, help="T2 map in seconds (BIDS T2map)")
    p.add_argument("--pd", type=Path, required=True, help="PD map (a.u.)")
    p.add_argument("--sequence", choices=["gre", "tse", "flair", "irgre", "se"], required=True)
    p.add_argument("--tr", type=float, required=True, metavar="MS")
    p.add_argument("--te", type=float, required=True, metavar="MS")
    p.add_argument("--ti", type=float, metavar="MS")
    p.add_argument("--fa", type=float, metavar="DEG")
    p.add_argument("--te-correction", type=float, metavar="F",
                   help="TE factor (default: 0.90 TSE, 0.42 FLAIR, 0.89 FLAIR TE<200 ms)")
    p.add_argument("--out", type=Path, required=True)


@command("synth", "re-synthesise a weighted image from T1/T2/PD maps (synthetic MRI)")
@arguments(_synth_args)
def _synth(a: argparse.Namespace) -> int:
    from .synth import synthesise_files

    synthesise_files(a.t1, a.t2, a.pd, sequence=a.sequence, tr_ms=a.tr, te_ms=a.te,
                     ti_ms=a.ti, fa_deg=a.fa, te_correction=a.te_correction, out=a.out)
    print(f"wrote {a.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# discover / convert
# ---------------------------------------------------------------------------------------------


def _discover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input_dir", type=Path)
    p.add_argument("out_tsv", type=Path)
    p.add_argument("--salt", required=True, help="secret pseudonymisation salt")


@command("discover", "group an archive's DICOM series into pseudonymous sessions (TSV)")
@arguments(_discover_args)
def _discover(a: argparse.Namespace) -> int:
    from .discover import discover_dicom, write_sessions_tsv

    rows = discover_dicom(a.input_dir, a.salt)
    write_sessions_tsv(rows, a.out_tsv)
    print(f"{len(rows)} session(s) in {a.input_dir}")
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sessions_tsv", type=Path)
    p.add_argument("input_dir", type=Path)
    p.add_argument("out_dir", type=Path, help="session folder to create")
    p.add_argument("--subject", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--no-anonymise", action="store_true")
    p.add_argument("--timeout", type=float, default=600)


@command("convert", "convert one session's DICOM series to NIfTI + sidecars (dcm2niix)")
@arguments(_convert_args)
def _convert(a: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from .convert import dcm2niix_version, run_dcm2niix
    from .discover import read_sessions_tsv
    from .io import write_json

    label = f"sub-{a.subject}_ses-{a.session}"
    rows = [r for r in read_sessions_tsv(a.sessions_tsv)
            if r["subject"] == a.subject and r["session"] == a.session]
    if not rows:
        raise InputError("session not in the sessions table", session=label,
                         path=a.sessions_tsv)
    a.out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{label}.", dir=a.out_dir.parent))
    try:
        images = []
        for rel in rows[0]["series_dirs"].split(";"):
            try:
                conv = run_dcm2niix(a.input_dir / rel, tmp, anonymise=not a.no_anonymise,
                                    timeout_s=a.timeout)
            except QmriflowError as exc:
                raise exc.with_context(session=label) from None
            images += [{"series_dir": rel, "nifti": c.nifti.name} for c in conv]
        write_json(tmp / "conversion.json", {
            "session": label, "tool": "dcm2niix", "version": dcm2niix_version(),
            "anonymised": not a.no_anonymise, "images": images,
        })
        if a.out_dir.exists():
            shutil.rmtree(a.out_dir)
        tmp.rename(a.out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{label}: {len(images)} image(s)")
    return 0


# ---------------------------------------------------------------------------------------------
# config / demo
# ---------------------------------------------------------------------------------------------


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, nargs="?", default=Path("workflow_config.yaml"))


@command("validate-config", "validate a workflow config file against the shipped schema")
@arguments(_validate_args)
def _validate(a: argparse.Namespace) -> int:
    from .config import load_config

    load_config(a.config)
    print(f"{a.config}: valid")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo"), help="demo folder")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--sessions", type=int, default=2)


@command("demo", "generate a small phantom archive and run the workflow on it")
@arguments(_demo_args)
def _demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(a.out, cores=a.cores, subjects=a.subjects, sessions=a.sessions)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmriflow",
        description="Quantitative T1/T2/PD and fat/water maps from routine clinical MRI.",
    )
    parser.add_argument("--version", action="version", version=f"qmriflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<step>", title="steps")
    for name, (help_text, configure, _fn) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        configure(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _help, _conf, fn = _COMMANDS[args.command]
    try:
        return fn(args)
    except QmriflowError as exc:
        print(f"qmriflow {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

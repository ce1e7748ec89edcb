"""``qmriflow provenance | session-done | nightly | run | dataset-description | failures |
validate-config | demo``: running the workflow and its records.

Registered with ``@command``; imported lazily by :func:`qmriflow.cli.build_parser`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from . import (
    arguments,
    command,
    positive_int,
)


def _provmerge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_json", type=Path)
    p.add_argument("steps", type=Path, nargs="+", help="per-step provenance JSON files")
    p.add_argument("--label", required=True, help="sub-X_ses-Y")


@command("provenance", "merge a session's per-step provenance into one JSON")
@arguments(_provmerge_args)
def _provmerge(a: argparse.Namespace) -> int:
    from ..io import dataset_root_of, portable_paths, write_json
    from ..workflow.provenance import merge_steps

    # the session's provenance sits in the derivatives (shared): file references relative to
    # the dataset, as in the sidecars; the per-step files in the work folder keep them as given
    merged = merge_steps(a.steps, a.label)
    write_json(a.out_json, portable_paths(merged, dataset_root_of(a.out_json), existing=True))
    return 0


def _done_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_json", type=Path)
    p.add_argument("outputs", type=Path, nargs="+", help="the session's finished outputs")
    p.add_argument("--root", type=Path, required=True, help="paths are written relative to this")
    p.add_argument("--label", required=True, help="sub-X_ses-Y")


@command("session-done", "write a session's completion marker (its outputs with SHA-256)")
@arguments(_done_args)
def _done(a: argparse.Namespace) -> int:
    from ..workflow.nightly import write_done_marker

    write_done_marker(a.out_json, a.outputs, a.root, a.label)
    return 0


def _workflow_args(default_profile: str) -> Callable[[argparse.ArgumentParser], None]:
    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--configfile", type=Path, required=True, help="the workflow config")
        p.add_argument("--cores", type=positive_int, default=None,
                       help="default: the profile's (all)")
        p.add_argument("--profile", type=Path, default=None,
                       help=f"Snakemake profile (default: {default_profile} of the checkout)")
        p.add_argument("--directory", type=Path, default=None,
                       help="Snakemake's working directory (default: the current one)")
        p.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                       help="after --: more Snakemake options and targets")

    return configure


_nightly_args = _workflow_args("profiles/nightly")


@command("nightly", "incremental run over a growing archive: new sessions only, report")
@arguments(_nightly_args)
def _nightly(a: argparse.Namespace) -> int:
    from ..workflow.nightly import run_nightly

    extra = [x for x in a.snakemake_args if x != "--"]
    return run_nightly(a.configfile, cores=a.cores, profile=a.profile, directory=a.directory,
                       snakemake_args=extra)


@command("run", "run the workflow; first stops the jobs and removes the lock a killed run left")
@arguments(_workflow_args("profiles/workstation"))
def _run(a: argparse.Namespace) -> int:
    from ..workflow.runner import run_workflow

    extra = [x for x in a.snakemake_args if x != "--"]
    return run_workflow(a.configfile, cores=a.cores, profile=a.profile, directory=a.directory,
                        snakemake_args=extra)


def _dd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path)
    p.add_argument("--container", default=None)


@command("dataset-description", "write the derivatives' dataset_description.json")
@arguments(_dd_args)
def _dd(a: argparse.Namespace) -> int:
    from ..workflow.provenance import write_dataset_description

    write_dataset_description(a.out_dir, a.container)
    return 0


def _failures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("failures_dir", type=Path)
    p.add_argument("out_tsv", type=Path)


@command("failures", "collect this run's failed sessions and reasons into a TSV")
@arguments(_failures_args)
def _failures(a: argparse.Namespace) -> int:
    from ..workflow.failures import write_failures_tsv

    n = write_failures_tsv(a.failures_dir, a.out_tsv)
    print(f"{n} failed step(s) listed in {a.out_tsv}")
    return 0


# ---------------------------------------------------------------------------------------------
# config / demo
# ---------------------------------------------------------------------------------------------


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, nargs="?", default=Path("workflow_config.yaml"))


@command("validate-config", "validate a workflow config file against the shipped schema")
@arguments(_validate_args)
def _validate(a: argparse.Namespace) -> int:
    from ..config import load_config

    load_config(a.config)
    print(f"{a.config}: valid")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo"), help="demo folder")
    p.add_argument("--cores", type=positive_int, default=2)
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--sessions", type=int, default=1)


@command("demo", "generate a small phantom archive and run the workflow on it")
@arguments(_demo_args)
def _demo(a: argparse.Namespace) -> int:
    from ..workflow.demo import run_demo

    return run_demo(a.out, cores=a.cores, subjects=a.subjects, sessions=a.sessions)

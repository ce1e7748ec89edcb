# Shared helpers: paths, session labels, and the tables produced by the `discover` checkpoint.
from pathlib import Path

from qmriflow.discover import read_sessions_tsv

OUT = Path(config["output_dir"])
WORK = Path(config["work_dir"])
INPUT = Path(config["input_dir"])
LOGS = WORK / "logs"
FAILURES = WORK / "failures"
PROV = WORK / "provenance"
SES = "sub-{subject}_ses-{session}"
CPU_IMAGE = config["containers"]["cpu"]


def sessions():
    """(subject, session) pairs discovered in the archive (complete or not: an incomplete or
    corrupt session still gets jobs, whose first step fails with its one-line reason)."""
    tsv = checkpoints.discover.get().output.sessions
    return [(r["subject"], r["session"]) for r in read_sessions_tsv(tsv)]


def session_targets(pattern):
    return [str(pattern).format(subject=sub, session=ses) for sub, ses in sessions()]


def params_outputs(wildcards):
    pattern = OUT / "sub-{subject}" / "ses-{session}" / f"{SES}_desc-protocol_params.json"
    return session_targets(pattern)


def session_flags(wildcards):
    return (
        f"--subject {wildcards.subject} --session {wildcards.session} "
        f"--failures {FAILURES}"
    )

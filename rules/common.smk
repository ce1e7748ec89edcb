# Shared helpers: paths and the sessions table produced by the `discover` checkpoint.
from pathlib import Path

from qmriflow.discover import read_sessions_tsv

OUT = Path(config["output_dir"])
WORK = Path(config["work_dir"])
INPUT = Path(config["input_dir"])
LOGS = WORK / "logs"


def sessions():
    """(subject, session) pairs discovered in the archive."""
    tsv = checkpoints.discover.get().output.tsv
    return [(r["subject"], r["session"]) for r in read_sessions_tsv(tsv)]


def converted_sessions(wildcards):
    return [
        str(WORK / "nifti" / f"sub-{sub}" / f"ses-{ses}") for sub, ses in sessions()
    ]

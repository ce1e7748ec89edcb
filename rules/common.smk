# Shared helpers: paths, session labels, and the tables produced by the `discover` checkpoint.
# Every path reaches a shell command quoted ({input:q}, {output:q}, {log:q}, {params.x:q}, or
# shlex.quote where a parameter holds several arguments): archive, work and output folders
# may hold spaces and non-ASCII characters ("PACS Export/Übergabe").
import shlex
from pathlib import Path

from qmriflow.archive.discover import is_deferred, read_sessions_tsv

OUT = Path(config["output_dir"])
WORK = Path(config["work_dir"])
INPUT = Path(config["input_dir"])
LOGS = WORK / "logs"
FAILURES = WORK / "failures"
PROV = WORK / "provenance"
SES = "sub-{subject}_ses-{session}"
ANAT = OUT / "sub-{subject}" / "ses-{session}" / "anat"
CPU_IMAGE = config["containers"]["cpu"]
DONE = WORK / "done" / f"{SES}.json"
EXCLUDED = set(config["exclude_sessions"])
FINAL_PATTERNS = [
    ANAT / f"{SES}_space-T2w_desc-preproc_T1w.nii.gz",
    ANAT / f"{SES}_space-T2w_desc-brain_mask.nii.gz",
    ANAT / f"{SES}_space-T2w_dseg.nii.gz",
    OUT / "sub-{subject}" / "ses-{session}" / f"{SES}_desc-provenance.json",
]


def sessions(usable=False):
    """(subject, session) pairs discovered in the archive (complete or not: an incomplete or
    corrupt session still gets jobs, whose first step fails with its one-line reason), less
    the deferred ones (files still arriving) and those listed in `exclude_sessions`.
    usable=True: only those whose discovery found nothing wrong (status "ok"), the inputs of
    the cohort steps (cluster fit, packing for training), so that a session already known to
    be corrupt or incomplete does not hold back the others' maps. A session that fails later
    (e.g. in registration) still does: `qmriflow nightly` then runs again without it."""
    tsv = checkpoints.discover.get().output.sessions
    return [
        (r["subject"], r["session"])
        for r in read_sessions_tsv(tsv)
        if (r.get("status", "ok") == "ok" if usable else not is_deferred(r))
        and f"sub-{r['subject']}_ses-{r['session']}" not in EXCLUDED
    ]


def session_targets(pattern, usable=False):
    return [str(pattern).format(subject=sub, session=ses) for sub, ses in sessions(usable)]


def final_outputs(wildcards):
    """Preprocessing outputs of every discovered session."""
    return [t for p in FINAL_PATTERNS for t in session_targets(p)]


def session_outputs(wildcards):
    """Every per-session output of the whole workflow for one session: the input of its
    completion marker (rules/done.smk). PRE, STATS_TSV and SESSION_REPORT come from the model
    and statistics rule files."""
    one = {"subject": wildcards.subject, "session": wildcards.session}
    patterns = [*FINAL_PATTERNS, *(f"{PRE}_{m}.nii.gz" for m in ("T1map", "T2map", "PDmap")),
                STATS_TSV, SESSION_REPORT]
    return [str(p).format(**one) for p in patterns] + session_cse(wildcards)


def session_cse(wildcards):
    """The PDFF maps of one session's multi-echo GRE series (an input of its QC page)."""
    label = SES.format(subject=wildcards.subject, session=wildcards.session)
    return [t for t in cse_outputs(wildcards) if Path(t).name.startswith(f"{label}_")]


def done_outputs(wildcards):
    """The completion marker of every discovered session."""
    return session_targets(DONE)


def params_outputs(wildcards):
    pattern = OUT / "sub-{subject}" / "ses-{session}" / f"{SES}_desc-protocol_params.json"
    return session_targets(pattern)


def session_flags(wildcards):
    return (
        f"--subject {wildcards.subject} --session {wildcards.session} "
        f"--failures {shlex.quote(str(FAILURES))}"
    )


def cse_outputs(wildcards):
    """PDFF maps of every selected multi-echo GRE series of every discovered session."""
    from qmriflow.archive.discover import read_series_tsv

    tsv = checkpoints.discover.get().output.series
    m = config["cse"]["method"]
    keep = set(sessions())
    return [
        str(OUT / "sub-{subject}" / "ses-{session}" / "anat"
            / f"{SES}_acq-{{acq}}_desc-{m}_PDFFmap.nii.gz").format(
            subject=r["subject"], session=r["session"], acq=r["series_id"]
        )
        for r in read_series_tsv(tsv)
        if r.get("role") == "megre" and r.get("selected")
        and (r["subject"], r["session"]) in keep
    ]


def stats_outputs(wildcards):
    """Targets of rules/stats.smk: every session's tissue table and QC
    page, the cohort tables, the reproducibility table (if enabled) and the cohort page."""
    targets = session_targets(ANAT / f"{SES}_space-T2w_desc-tissue_stats.tsv")
    targets += session_targets(OUT / f"{SES}.html")  # QC pages beside sub-*/, as fMRIPrep
    targets += [str(OUT / "group" / "cohort_tissue_stats.tsv"),
                str(OUT / "reports" / "cohort.html")]
    if config["stats"]["repro"]:
        targets.append(str(OUT / "group" / "reproducibility.tsv"))
    return targets


def infer_clusters_input(wildcards):
    """The clusters file as the input of one session's inference (rule infer, model.smk;
    PRE, CLUSTER_JSON and USE_CLUSTERS are defined there): a finished session's maps stay as
    they are when the cluster fit is updated for new sessions (ancient); a session
    without maps waits for the fit. (An ancient() input whose producing job has to run also
    drops the jobs below it that have missing outputs (Snakemake 9.15), so only finished
    sessions get it.)"""
    if not USE_CLUSTERS:
        return []
    maps = [Path(str(f"{PRE}_{m}.nii.gz").format(**wildcards))
            for m in ("T1map", "T2map", "PDmap")]
    return ancient(CLUSTER_JSON) if all(p.is_file() for p in maps) else CLUSTER_JSON

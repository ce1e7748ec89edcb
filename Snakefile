# qmriflow workflow: DICOM archive -> quantitative maps.
# Thin rules: each calls one `qmriflow <step>`; the science lives in src/qmriflow.
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from qmriflow.config import validate_config
from qmriflow.errors import ConfigError

min_version("9.0")


configfile: os.path.join(workflow.basedir, "workflow_config.yaml")


# The package's validation (fills defaults): a bad key stops the run with the same one-line
# `config key …: …` message as `qmriflow validate-config`, not a schema dump.
try:
    config = validate_config(config)
except ConfigError as _exc:
    sys.stderr.write(f"qmriflow: {_exc}\n")
    sys.exit(2)


# `--cores -2` (or 0) would reach every rule as `threads: -2` and the provenance as such.
try:
    _cores = workflow.cores
except WorkflowError:  # no --cores given (dry run, cluster executor): nothing to check
    _cores = None
if isinstance(_cores, int) and _cores < 1:
    raise WorkflowError(f"--cores must be at least 1, got {_cores}")


localrules:
    all,
    all_params,
    all_preproc,
    all_cse,
    dataset_description,
    session_done,


include: "rules/common.smk"
include: "rules/convert.smk"
include: "rules/preproc.smk"
include: "rules/model.smk"
include: "rules/cse.smk"
include: "rules/stats.smk"
include: "rules/done.smk"


rule all:
    input:
        final_outputs,
        model_outputs,
        stats_outputs,
        cse_outputs,
        done_outputs,
        OUT / "dataset_description.json",


# Fat/water maps only.
rule all_cse:
    input:
        cse_outputs,


# Preprocessing only (registration ... segmentation), no model.
rule all_preproc:
    input:
        final_outputs,
        OUT / "dataset_description.json",


# Discovery, conversion and parameter validation only (quick archive check).
rule all_params:
    input:
        params_outputs,


onsuccess:
    shell(f"qmriflow failures {shlex.quote(str(FAILURES))} "
          f"{shlex.quote(str(OUT / 'failures.tsv'))}")


onerror:
    shell(f"qmriflow failures {shlex.quote(str(FAILURES))} "
          f"{shlex.quote(str(OUT / 'failures.tsv'))}")

import json
import shlex

# The relaxometry model (seed 000 section 2.2): pack the preprocessed slices of every session
# once, train the self-supervised network on the archive (or use given weights), and infer
# T1/T2/PD maps for every session. Thin rules: each calls one `qmriflow <step>`.
#
# Config (section `model:`): checkpoint, width, epochs, batch_size, lr, lambda_tv, lambda_pd,
# distill, model_error, model_error_cluster, dropout, init, seed, scaling, map_smoothing,
# split, steps_per_epoch, device, precision, threads, train_gpu, train_mem_mb,
# train_runtime_min, infer_gpu, infer_batch_size, infer_mem_mb, min_head_fraction,
# search_trials, search_epochs.
MODEL = config["model"]
SMOOTH = MODEL["map_smoothing"]
PACK = WORK / "model" / "pack"
MODEL_DIR = OUT / "model"
TRAINED = MODEL_DIR / "model.pt"
CHECKPOINT = Path(MODEL["checkpoint"]) if MODEL.get("checkpoint") else TRAINED
PRE = ANAT / f"{SES}_space-T2w"
CLUSTERS = MODEL["clusters"]
CLUSTER_JSON = WORK / "model" / "clusters.json"
USE_CLUSTERS = CLUSTERS["enabled"] and MODEL["scaling"] == "calibrated"
DISTILL = MODEL["distill"] if MODEL["scaling"] == "calibrated" else 0.0


PACK_PATTERNS = [f"{PRE}_desc-preproc_{c}.nii.gz" for c in ("T1w", "T2w", "FLAIR")] + [
    f"{PRE}_desc-brain_mask.nii.gz",
    f"{PRE}_dseg.nii.gz",
    OUT / "sub-{subject}" / "ses-{session}" / f"{SES}_desc-protocol_params.json",
]
TRAIN_FLAGS = (
    f"--width {MODEL['width']} --epochs {MODEL['epochs']} --batch-size {MODEL['batch_size']} "
    f"--lr {MODEL['lr']} --lambda-tv {MODEL['lambda_tv']} --lambda-pd {MODEL['lambda_pd']} "
    f"--dropout {MODEL['dropout']} --init {MODEL['init']} --seed {MODEL['seed']} "
    f"--scaling {MODEL['scaling']} --distill {DISTILL} "
    f"--split {','.join(str(x) for x in MODEL['split'])} --device {MODEL['device']} "
    f"--precision {MODEL['precision']}"
    + (f" --steps-per-epoch {MODEL['steps_per_epoch']}" if MODEL.get("steps_per_epoch") else "")
)
# Targets for `rule all`: every session's maps, plus the training curve when trained here.
model_outputs = lambda wildcards: [
    t
    for m in ("T1map", "T2map", "PDmap")
    for t in session_targets(f"{PRE}_{m}.nii.gz")
] + ([] if MODEL.get("checkpoint") else [str(MODEL_DIR / "training_curve.png")])


# Scanner-protocol clusters and their gain ratios, fitted over the sessions present. A fitted
# cluster is kept as it is in WORK/model/clusters_state.json: when sessions are added (nightly)
# this rule records them and they join their fitted cluster at inference, without refitting
# it; refit explicitly with `qmriflow cluster-fit ... --refit`, which records what changed.
rule cluster_fit:
    input:
        lambda w: [t for p in PACK_PATTERNS for t in session_targets(p, usable=True)],
    output:
        CLUSTER_JSON,
    params:
        dirs=lambda w: session_targets(OUT / "sub-{subject}" / "ses-{session}", usable=True),
        calib=(f"--calibration {shlex.quote(json.dumps(CLUSTERS['calibration']))}"
               if CLUSTERS["calibration"] else ""),
        state=WORK / "model" / "clusters_state.json",
        min_sessions=CLUSTERS["min_sessions"],
        tolerance=CLUSTERS["tolerance"],
        prov=PROV / "cluster_fit.json",
    log:
        LOGS / "cluster_fit.log",
    threads: 1
    resources:
        mem_mb=4000,
    container:
        CPU_IMAGE
    shell:
        "qmriflow cluster-fit {output:q} {params.dirs:q} {params.calib} "
        "--state {params.state:q} --min-sessions {params.min_sessions} "
        "--tolerance {params.tolerance} --skip-incomplete --provenance {params.prov:q} "
        "&> {log:q}"


rule pack:
    input:
        sessions=lambda w: [t for p in PACK_PATTERNS for t in session_targets(p, usable=True)],
        clusters=CLUSTER_JSON if USE_CLUSTERS else [],
    output:
        index=PACK / "index.json",
        images=PACK / "images.npy",
        masks=PACK / "masks.npy",
    params:
        outdir=PACK,
        dirs=lambda w: session_targets(OUT / "sub-{subject}" / "ses-{session}", usable=True),
        frac=MODEL["min_head_fraction"],
        clusters=f"--clusters {shlex.quote(str(CLUSTER_JSON))}" if USE_CLUSTERS else "",
        targets="--targets" if DISTILL > 0 else "",
        prov=PROV / "pack.json",
    benchmark:
        WORK / "benchmarks" / "pack.tsv"
    log:
        LOGS / "pack.log",
    threads: 1
    resources:
        mem_mb=4000,
    container:
        CPU_IMAGE
    shell:
        "qmriflow pack {params.outdir:q} {params.dirs:q} --min-head-fraction {params.frac} "
        "--skip-incomplete {params.clusters} {params.targets} --provenance {params.prov:q} "
        "&> {log:q}"


# last.pt (the resumable state) is deliberately not an output: Snakemake must not delete it
# when a long training job is interrupted; re-running the rule resumes from it.
rule train:
    input:
        index=rules.pack.output.index,
    output:
        model=TRAINED,
        curve=MODEL_DIR / "training_curve.png",
        hyper=MODEL_DIR / "hyperparameters.json",
    params:
        outdir=MODEL_DIR,
        pack=PACK,
        split=",".join(str(x) for x in MODEL["split"]),
        prov=PROV / "train.json",
    benchmark:
        WORK / "benchmarks" / "train.tsv"
    log:
        LOGS / "train.log",
    threads: MODEL["threads"]
    resources:
        mem_mb=MODEL["train_mem_mb"],
        runtime=MODEL["train_runtime_min"],
        gpu=MODEL["train_gpu"],
    container:
        config["containers"]["cuda"] if MODEL["train_gpu"] else CPU_IMAGE
    shell:
        f"qmriflow train {{params.pack:q}} {{params.outdir:q}} {TRAIN_FLAGS} "
        "--threads {threads} --provenance {params.prov:q} &> {log:q}"


rule infer:
    input:
        t1w=f"{PRE}_desc-preproc_T1w.nii.gz",
        t2w=f"{PRE}_desc-preproc_T2w.nii.gz",
        flair=f"{PRE}_desc-preproc_FLAIR.nii.gz",
        mask=f"{PRE}_desc-brain_mask.nii.gz",
        dseg=f"{PRE}_dseg.nii.gz",
        params=OUT / "sub-{subject}" / "ses-{session}" / f"{SES}_desc-protocol_params.json",
        checkpoint=CHECKPOINT,
        clusters=infer_clusters_input,
    output:
        t1=f"{PRE}_T1map.nii.gz",
        t2=f"{PRE}_T2map.nii.gz",
        pd=f"{PRE}_PDmap.nii.gz",
        prov=PROV / f"{SES}_infer.json",
    params:
        sdir=lambda w: OUT / f"sub-{w.subject}" / f"ses-{w.session}",
        outdir=lambda w, output: Path(output.t1).parent,
        run=(f"--device {MODEL['device']} --precision {MODEL['precision']} "
             f"--batch-size {MODEL['infer_batch_size']} --scaling {MODEL['scaling']} "
             f"--smoothing {SMOOTH['radius']},{SMOOTH['sigma_space']},{SMOOTH['sigma_range']},"
             f"{SMOOTH['sigma_value']} "
             f"--smoothing-guide {SMOOTH['guide']} --model-error {MODEL['model_error']} "
             f"--model-error-cluster {MODEL['model_error_cluster']}"
             + (f" --clusters {shlex.quote(str(CLUSTER_JSON))}" if USE_CLUSTERS else "")),
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "infer" / f"{SES}.tsv"
    log:
        LOGS / "infer" / f"{SES}.log",
    threads: MODEL["threads"]
    resources:
        mem_mb=MODEL["infer_mem_mb"],
        gpu=MODEL["infer_gpu"],
    container:
        config["containers"]["cuda"] if MODEL["infer_gpu"] else CPU_IMAGE
    shell:
        "qmriflow infer {params.sdir:q} --checkpoint {input.checkpoint:q} "
        "--out-dir {params.outdir:q} {params.run} --threads {threads} {params.flags} "
        "--provenance {output.prov:q} &> {log:q}"


# Optional: Optuna search over the seed's Table B.1 space (`snakemake search`; needs optuna).
rule search:
    input:
        index=rules.pack.output.index,
    output:
        MODEL_DIR / "search" / "search.json",
    params:
        outdir=MODEL_DIR / "search",
        pack=PACK,
        run=(f"--trials {MODEL['search_trials']} --epochs {MODEL['search_epochs']} "
             f"--width {MODEL['width']} --device {MODEL['device']}"),
    log:
        LOGS / "search.log",
    threads: MODEL["threads"]
    resources:
        mem_mb=MODEL["train_mem_mb"],
        runtime=MODEL["train_runtime_min"],
        gpu=MODEL["train_gpu"],
    container:
        config["containers"]["cuda"] if MODEL["train_gpu"] else CPU_IMAGE
    shell:
        "qmriflow search {params.pack:q} {params.outdir:q} {params.run} --threads {threads} "
        "&> {log:q}"

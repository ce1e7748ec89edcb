# Statistics, cohort analysis, reproducibility and QC reports (seed 000 section 2.3).
# Thin rules: each calls one `qmriflow <step>`. Needs rules/model.smk (maps, PRE) included first.
#
# Config: section `stats:` (defaults and meaning in the config schema).
STATS = config["stats"]
GROUP = OUT / "group"
REPORTS = OUT / "reports"
# one QC page per session at the top of the derivatives, named and placed as the NiPreps
# (fMRIPrep, NiBabies, QSIPrep) place theirs; the cohort page stays in reports/
SESSION_REPORT = OUT / f"{SES}.html"
SESSION_DIR = OUT / "sub-{subject}" / "ses-{session}"
STATS_TSV = ANAT / f"{SES}_space-T2w_desc-tissue_stats.tsv"
HIST_TSV = ANAT / f"{SES}_space-T2w_desc-tissue_hist.tsv"
STATS_MAPS = [ANAT / f"{SES}_space-T2w_{m}.nii.gz" for m in ("T1map", "T2map", "PDmap")]


rule stats:
    input:
        maps=STATS_MAPS,
        wm=ANAT / f"{SES}_space-T2w_label-WM_desc-eroded_mask.nii.gz",
        gm=ANAT / f"{SES}_space-T2w_label-GM_desc-eroded_mask.nii.gz",
        dseg=ANAT / f"{SES}_space-T2w_dseg.nii.gz",
        mask=ANAT / f"{SES}_space-T2w_desc-brain_mask.nii.gz",
        params=SESSION_DIR / f"{SES}_desc-protocol_params.json",
    output:
        tsv=report(STATS_TSV, caption="report/tissue_stats.rst", category="Sessions",
                   subcategory="Tissue values"),
        hist=HIST_TSV,
        prov=PROV / f"{SES}_stats.json",
    params:
        sdir=lambda w: SESSION_DIR.as_posix().format(subject=w.subject, session=w.session),
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "stats" / f"{SES}.tsv"
    log:
        LOGS / "stats" / f"{SES}.log",
    threads: 1
    resources:
        mem_mb=STATS["mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow stats {params.sdir:q} --out-tsv {output.tsv:q} --out-hist {output.hist:q} "
        "{params.flags} --provenance {output.prov:q} &> {log:q}"


rule cohort:
    input:
        tsvs=lambda w: session_targets(STATS_TSV),
        hists=lambda w: session_targets(HIST_TSV),
        cse=cse_outputs,
    output:
        table=report(GROUP / "cohort_tissue_stats.tsv", caption="report/cohort_table.rst",
                     category="Cohort"),
        summary=GROUP / "cohort_summary.tsv",
        clusters=GROUP / "protocol_clusters.tsv",
        centroids=GROUP / "protocol_cluster_centroids.tsv",
        cv=report(GROUP / "intergroup_cv.tsv", caption="report/intergroup_cv.rst",
                  category="Cohort"),
        meta=GROUP / "cohort.json",
        dist=report(GROUP / "cohort_distributions.png", caption="report/distributions.rst",
                    category="Cohort"),
        dendrogram=report(GROUP / "protocol_dendrogram.png", caption="report/dendrogram.rst",
                          category="Cohort"),
        box_scanner=report(GROUP / "box_scanner.png", caption="report/box_groups.rst",
                           category="Cohort"),
        box_cluster=report(GROUP / "box_cluster.png", caption="report/box_groups.rst",
                           category="Cohort"),
        cse=report(GROUP / "cohort_cse_stats.tsv", caption="report/cse_table.rst",
                   category="Cohort"),
        prov=PROV / "cohort.json",
    params:
        outdir=GROUP,
        run=(f"--clusters {STATS['clusters']} --min-group-size {STATS['min_group_size']}"
             + (" --strict-clusters" if STATS["strict_clusters"] else "")),
    benchmark:
        WORK / "benchmarks" / "cohort.tsv"
    log:
        LOGS / "cohort.log",
    threads: 1
    resources:
        mem_mb=STATS["mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow cohort {params.outdir:q} {input.tsvs:q} {params.run} "
        "--cse-maps {input.cse:q} --provenance {output.prov:q} &> {log:q}"


rule repro:
    input:
        maps=lambda w: [t for p in STATS_MAPS for t in session_targets(p)],
        t2w=lambda w: session_targets(ANAT / f"{SES}_space-T2w_desc-preproc_T2w.nii.gz"),
        dseg=lambda w: session_targets(ANAT / f"{SES}_space-T2w_dseg.nii.gz"),
        mask=lambda w: session_targets(ANAT / f"{SES}_space-T2w_desc-brain_mask.nii.gz"),
    output:
        table=report(GROUP / "reproducibility.tsv", caption="report/reproducibility.rst",
                     category="Reproducibility"),
        meta=GROUP / "reproducibility.json",
        figures=report(directory(GROUP / "repro_figures"), patterns=["{name}.png"],
                       caption="report/reproducibility.rst", category="Reproducibility"),
        prov=PROV / "repro.json",
    params:
        outdir=GROUP,
        dirs=lambda w: session_targets(SESSION_DIR),
        run=(
            (f" --days {STATS['repro_days']}" if STATS["repro_days"] else "")
            + (f" --max-interval-days {STATS['max_interval_days']}"
               if STATS["max_interval_days"] is not None else "")
        ),
    benchmark:
        WORK / "benchmarks" / "repro.tsv"
    log:
        LOGS / "repro.log",
    threads: STATS["threads"]
    resources:
        mem_mb=STATS["repro_mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow repro {params.outdir:q} {params.dirs:q} --figures-dir {output.figures:q} "
        "--threads {threads}{params.run} --provenance {output.prov:q} &> {log:q}"


rule report_session:
    input:
        stats=STATS_TSV,
        maps=STATS_MAPS,
        images=[ANAT / f"{SES}_space-T2w_desc-preproc_{c}.nii.gz" for c in ("T1w", "T2w", "FLAIR")],
        provenance=SESSION_DIR / f"{SES}_desc-provenance.json",
        infer=PROV / f"{SES}_infer.json",
        cse=session_cse,
    output:
        report(SESSION_REPORT, caption="report/session_report.rst",
               category="Sessions", subcategory="QC pages"),
    params:
        sdir=lambda w: SESSION_DIR.as_posix().format(subject=w.subject, session=w.session),
        slices=STATS["report_slices"],
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "report_session" / f"{SES}.tsv"
    log:
        LOGS / "report_session" / f"{SES}.log",
    threads: 1
    resources:
        mem_mb=STATS["mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow report {params.sdir:q} {output:q} --step-provenance {input.infer:q} "
        "--slices {params.slices} {params.flags} &> {log:q}"


rule report_cohort:
    input:
        cohort=rules.cohort.output.meta,
        cv=rules.cohort.output.cv,
        repro=[rules.repro.output.table] if STATS["repro"] else [],
    output:
        report(REPORTS / "cohort.html", caption="report/cohort_report.rst", category="Cohort"),
    params:
        cohort=GROUP,
        repro=(f"--repro-dir {shlex.quote(str(GROUP))} "
               f"--repro-figures-dir {shlex.quote(str(GROUP / 'repro_figures'))}"
               if STATS["repro"] else ""),
    benchmark:
        WORK / "benchmarks" / "report_cohort.tsv"
    log:
        LOGS / "report_cohort.log",
    threads: 1
    resources:
        mem_mb=STATS["mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow report-cohort {params.cohort:q} {output:q} {params.repro} &> {log:q}"

# Archive discovery, DICOM -> NIfTI conversion (dcm2niix, anonymised sidecars), parameters.


checkpoint discover:
    input:
        INPUT,
    output:
        sessions=WORK / "sessions.tsv",
        series=WORK / "series.tsv",
    params:
        salt=config["pseudonym_salt"],
        fmt=config["input_format"],
        quiet=config["discovery"]["quiet_period_min"],
    log:
        LOGS / "discover.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["discover_mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow discover {input:q} {output.sessions:q} {output.series:q} "
        "--salt {params.salt:q} --input-format {params.fmt:q} "
        "--quiet-period-min {params.quiet} &> {log:q}"


# The tables are ancient() inputs: a new discovery (the archive grew) does not make the
# sessions converted before run again; a session is reprocessed only when its own files are
# removed or forced (--forcerun).
rule convert:
    input:
        sessions=ancient(WORK / "sessions.tsv"),
        series=ancient(WORK / "series.tsv"),
    output:
        session=directory(WORK / "nifti" / "sub-{subject}" / "ses-{session}"),
        prov=PROV / f"{SES}_convert.json",
    params:
        archive=INPUT,
        salt=config["pseudonym_salt"],
        fmt=config["input_format"],
        timeout=config["dcm2niix"]["timeout_s"],
        anon="" if config["dcm2niix"]["anonymise"] else "--no-anonymise",
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "convert" / f"{SES}.tsv"
    log:
        LOGS / "convert" / f"{SES}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["convert_mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow convert {input.sessions:q} {input.series:q} {params.archive:q} "
        "{output.session:q} --salt {params.salt:q} --input-format {params.fmt:q} "
        "--timeout {params.timeout} {params.anon} {params.flags} --provenance {output.prov:q} "
        "&> {log:q}"


rule params:
    input:
        session=WORK / "nifti" / "sub-{subject}" / "ses-{session}",
        series=ancient(WORK / "series.tsv"),
    output:
        params=OUT / "sub-{subject}" / "ses-{session}" / f"{SES}_desc-protocol_params.json",
        prov=PROV / f"{SES}_params.json",
    params:
        non3t="" if config["require_3t"] else "--allow-non-3t",
        tec=",".join(f"{k}={v}" for k, v in config["physics"]["te_correction"].items()),
        trains=",".join(f"{k}={'null' if v is None else v}"
                        for k, v in config["physics"]["echo_train"].items()),
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "params" / f"{SES}.tsv"
    log:
        LOGS / "params" / f"{SES}.log",
    threads: 1
    resources:
        mem_mb=500,
    container:
        CPU_IMAGE
    shell:
        "qmriflow params {input.session:q} {input.series:q} {output.params:q} {params.non3t} "
        "--te-correction {params.tec:q} --echo-train {params.trains:q} {params.flags} "
        "--provenance {output.prov:q} &> {log:q}"


rule dataset_description:
    output:
        OUT / "dataset_description.json",
        OUT / "README.md",
        OUT / ".bidsignore",
    params:
        outdir=OUT,
        image=CPU_IMAGE,
    log:
        LOGS / "dataset_description.log",
    threads: 1
    resources:
        mem_mb=500,
    container:
        CPU_IMAGE
    shell:
        "qmriflow dataset-description {params.outdir:q} --container {params.image:q} "
        "&> {log:q}"


onsuccess:
    shell(f"qmriflow failures {shlex.quote(str(FAILURES))} "
          f"{shlex.quote(str(OUT / 'failures.tsv'))}")


onerror:
    shell(f"qmriflow failures {shlex.quote(str(FAILURES))} "
          f"{shlex.quote(str(OUT / 'failures.tsv'))}")

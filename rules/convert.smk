# Archive discovery and DICOM -> NIfTI conversion (dcm2niix, anonymised sidecars).


checkpoint discover:
    input:
        INPUT,
    output:
        tsv=WORK / "sessions.tsv",
    params:
        salt=config["pseudonym_salt"],
    log:
        LOGS / "discover.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["discover_mem_mb"],
    container:
        config["containers"]["cpu"]
    shell:
        "qmriflow discover {input} {output.tsv} --salt {params.salt:q} &> {log}"


rule convert:
    input:
        tsv=WORK / "sessions.tsv",
    output:
        directory(WORK / "nifti" / "sub-{subject}" / "ses-{session}"),
    params:
        archive=INPUT,
        timeout=config["dcm2niix"]["timeout_s"],
        anon="" if config["dcm2niix"]["anonymise"] else "--no-anonymise",
    log:
        LOGS / "convert" / "sub-{subject}_ses-{session}.log",
    threads: 1
    resources:
        mem_mb=config["resources"]["convert_mem_mb"],
    container:
        config["containers"]["cpu"]
    shell:
        "qmriflow convert {input.tsv} {params.archive} {output} "
        "--subject {wildcards.subject} --session {wildcards.session} "
        "--timeout {params.timeout} {params.anon} &> {log}"

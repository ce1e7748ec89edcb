# Fat/water branch (seed 004): one `cse` job per multi-echo GRE magnitude series found by
# discovery. Independent of the relaxometry chain: it needs only the session's conversion.
CSE = config["cse"]
CSE_PRE = f"{SES}_acq-{{acq}}"
CSE_DIR = OUT / "sub-{subject}" / "ses-{session}" / "anat"




rule cse:
    input:
        session=NIFTI,
    output:
        pdff=CSE_DIR / f"{CSE_PRE}_desc-{CSE['method']}_PDFFmap.nii.gz",
        r2s=CSE_DIR / f"{CSE_PRE}_desc-{CSE['method']}_R2starmap.nii.gz",
        s0=CSE_DIR / f"{CSE_PRE}_desc-{CSE['method']}_S0map.nii.gz",
        prov=PROV / f"{SES}_acq-{{acq}}_cse.json",
    wildcard_constraints:
        acq="[A-Za-z0-9]+",
    params:
        echo1=lambda w, input: Path(input.session)
        / f"sub-{w.subject}_ses-{w.session}_acq-{w.acq}_echo-1_MEGRE.nii.gz",
        outdir=lambda w, output: Path(output.pdff).parent,
        prefix=lambda w: f"sub-{w.subject}_ses-{w.session}_acq-{w.acq}",
        run=(f"--method {CSE['method']} --device {CSE['device']} "
             f"--smooth-choice {CSE['smooth_choice']} --seed {CSE['seed']} "
             f"--readout {CSE.get('readout', 'auto')}"),
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "cse" / f"{SES}_acq-{{acq}}.tsv"
    log:
        LOGS / "cse" / f"{SES}_acq-{{acq}}.log",
    threads: CSE["threads"]
    resources:
        mem_mb=CSE["mem_mb"],
        gpu=CSE["gpu"],
    container:
        config["containers"]["cuda"] if CSE["gpu"] else CPU_IMAGE
    shell:
        "qmriflow cse-fit {params.echo1:q} --out {params.outdir:q} --prefix {params.prefix:q} "
        "{params.run} --threads {threads} {params.flags} --provenance {output.prov:q} "
        "&> {log:q}"

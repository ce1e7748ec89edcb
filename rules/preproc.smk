# Registration to the T2w, 1x1 mm / 224x224 resampling, N4 + slice selection, skull strip,
# tissue segmentation (seed 000 section 2.1.2), and the per-session provenance.
PP = config["preprocessing"]
NIFTI = WORK / "nifti" / "sub-{subject}" / "ses-{session}"
REG = WORK / "reg" / "sub-{subject}" / "ses-{session}"


rule register:
    input:
        session=NIFTI,
        params=OUT / "sub-{subject}" / "ses-{session}" / f"{SES}_desc-protocol_params.json",
    output:
        t1w=REG / f"{SES}_space-T2w_desc-reg_T1w.nii.gz",
        t2w=REG / f"{SES}_space-T2w_desc-reg_T2w.nii.gz",
        flair=REG / f"{SES}_space-T2w_desc-reg_FLAIR.nii.gz",
        t1w_xfm=REG / f"{SES}_from-T1w_to-T2w_mode-image_xfm.mat",
        flair_xfm=REG / f"{SES}_from-FLAIR_to-T2w_mode-image_xfm.mat",
        prov=PROV / f"{SES}_register.json",
    params:
        outdir=lambda w, output: Path(output.t1w).parent,
        t1w=lambda w, input: Path(input.session) / f"sub-{w.subject}_ses-{w.session}_T1w.nii.gz",
        t2w=lambda w, input: Path(input.session) / f"sub-{w.subject}_ses-{w.session}_T2w.nii.gz",
        flair=lambda w, input: Path(input.session)
        / f"sub-{w.subject}_ses-{w.session}_FLAIR.nii.gz",
        inplane=PP["inplane_mm"],
        size=PP["matrix"],
        mt="" if PP["deterministic"] else "--multithreaded",
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "register" / f"{SES}.tsv"
    log:
        LOGS / "register" / f"{SES}.log",
    threads: PP["threads"] if not PP["deterministic"] else 1
    resources:
        mem_mb=PP["register_mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow register --t1w {params.t1w:q} --t2w {params.t2w:q} --flair {params.flair:q} "
        "--out-dir {params.outdir:q} --inplane-mm {params.inplane} --size {params.size} "
        "--threads {threads} {params.mt} {params.flags} --provenance {output.prov:q} "
        "&> {log:q}"


rule n4:
    input:
        t1w=rules.register.output.t1w,
        t2w=rules.register.output.t2w,
        flair=rules.register.output.flair,
    output:
        t1w=ANAT / f"{SES}_space-T2w_desc-preproc_T1w.nii.gz",
        t2w=ANAT / f"{SES}_space-T2w_desc-preproc_T2w.nii.gz",
        flair=ANAT / f"{SES}_space-T2w_desc-preproc_FLAIR.nii.gz",
        prov=PROV / f"{SES}_n4.json",
    params:
        area=PP["slice_selection"]["min_area_fraction"],
        drop=PP["slice_selection"]["drop_fraction"],
        shrink=PP["n4_shrink"],
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "n4" / f"{SES}.tsv"
    log:
        LOGS / "n4" / f"{SES}.log",
    threads: PP["threads"]
    resources:
        mem_mb=PP["n4_mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow n4 --t1w {input.t1w:q} --t2w {input.t2w:q} --flair {input.flair:q} "
        "--out-t1w {output.t1w:q} --out-t2w {output.t2w:q} --out-flair {output.flair:q} "
        "--min-area-fraction {params.area} --drop-fraction {params.drop} "
        "--shrink {params.shrink} --threads {threads} {params.flags} "
        "--provenance {output.prov:q} &> {log:q}"


rule skullstrip:
    input:
        t1w=rules.n4.output.t1w,
        t2w=rules.n4.output.t2w,
    output:
        mask=ANAT / f"{SES}_space-T2w_desc-brain_mask.nii.gz",
        prov=PROV / f"{SES}_skullstrip.json",
    params:
        backend=config["skullstrip"]["backend"],
        device=config["skullstrip"]["device"],
        download="--allow-download" if config["skullstrip"]["allow_download"] else "",
        fill=config["skullstrip"]["csf_fill_mm"],
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "skullstrip" / f"{SES}.tsv"
    log:
        LOGS / "skullstrip" / f"{SES}.log",
    threads: PP["threads"]
    resources:
        mem_mb=config["skullstrip"]["mem_mb"],
    container:
        CPU_IMAGE
    shell:
        "qmriflow skullstrip {input.t1w:q} {output.mask:q} --backend {params.backend} "
        "--device {params.device} {params.download} --t2w {input.t2w:q} "
        "--csf-fill-mm {params.fill} --threads {threads} {params.flags} "
        "--provenance {output.prov:q} &> {log:q}"


SEG = config["segmentation"]


rule segment:
    input:
        t1w=rules.n4.output.t1w,
        t2w=rules.n4.output.t2w,
        flair=rules.n4.output.flair,
        mask=rules.skullstrip.output.mask,
    output:
        dseg=ANAT / f"{SES}_space-T2w_dseg.nii.gz",
        gm=ANAT / f"{SES}_space-T2w_label-GM_probseg.nii.gz",
        wm=ANAT / f"{SES}_space-T2w_label-WM_probseg.nii.gz",
        csf=ANAT / f"{SES}_space-T2w_label-CSF_probseg.nii.gz",
        wm_eroded=ANAT / f"{SES}_space-T2w_label-WM_desc-eroded_mask.nii.gz",
        gm_eroded=ANAT / f"{SES}_space-T2w_label-GM_desc-eroded_mask.nii.gz",
        prov=PROV / f"{SES}_segment.json",
    params:
        prefix=lambda w, output: output.dseg.removesuffix("_dseg.nii.gz"),
        backend=SEG["backend"],
        erode=SEG["erode_mm"],
        extra=lambda w, input: (
            f"--t2w {shlex.quote(input.t2w)} --flair {shlex.quote(input.flair)}"
            if SEG["multichannel"] else ""
        ),
        flags=session_flags,
    benchmark:
        WORK / "benchmarks" / "segment" / f"{SES}.tsv"
    log:
        LOGS / "segment" / f"{SES}.log",
    threads: PP["threads"]
    resources:
        mem_mb=SEG["mem_mb"],
    container:
        config["containers"]["fsl"] if SEG["backend"] == "fast" else CPU_IMAGE
    shell:
        "qmriflow segment {input.t1w:q} {input.mask:q} --out-prefix {params.prefix:q} "
        "{params.extra} --backend {params.backend} --erode-mm {params.erode} "
        "--threads {threads} {params.flags} --provenance {output.prov:q} &> {log:q}"


rule provenance:
    input:
        PROV / f"{SES}_convert.json",
        PROV / f"{SES}_params.json",
        PROV / f"{SES}_register.json",
        PROV / f"{SES}_n4.json",
        PROV / f"{SES}_skullstrip.json",
        PROV / f"{SES}_segment.json",
    output:
        OUT / "sub-{subject}" / "ses-{session}" / f"{SES}_desc-provenance.json",
    params:
        label=SES,
    log:
        LOGS / "provenance" / f"{SES}.log",
    threads: 1
    resources:
        mem_mb=500,
    container:
        CPU_IMAGE
    shell:
        "qmriflow provenance {output:q} {input:q} --label {params.label:q} &> {log:q}"

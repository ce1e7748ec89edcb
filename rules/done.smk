# Per-session completion marker: written once every per-session output of the workflow
# exists; lists them with sizes and SHA-256. `qmriflow nightly` reads these markers to tell
# finished sessions from failed or pending ones.


rule session_done:
    input:
        session_outputs,
    output:
        DONE,
    params:
        root=OUT,
        label=SES,
    log:
        LOGS / "session_done" / f"{SES}.log",
    threads: 1
    resources:
        mem_mb=500,
    container:
        CPU_IMAGE
    shell:
        "qmriflow session-done {output:q} {input:q} --root {params.root:q} "
        "--label {params.label:q} &> {log:q}"

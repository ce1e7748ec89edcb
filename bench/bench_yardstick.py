"""An honest yardstick for the relaxometry maps: the pipeline's own preprocessing and
segmentation, a phantom whose tissue values are not the estimator's priors, and baselines.

    python bench/bench_yardstick.py WORK --phantom-seed S [--subjects 10] [--sessions 2]
        [--clusters 1] [--tissue-range 0.2] [--global-shift 0.1]
        [--gain-model independent|protocol] [--gain-jitter 0.03] [--mismatch on|off]
        [--segmentation pipeline|truth] [--methods seed calibrated network-free network-only]
        [--seeds 0 1 2] [--quick]

Unlike bench_model_accuracy.py and bench_scale_degeneracy.py (ideal preprocessing, truth
segmentation), nothing here hands an estimator the truth:

1. a ``qmriflow phantom`` archive (size small) drawn around the generator's *independent*
   tissue table (its centres are not the estimator's priors), every subject with a brain-wide
   T1/T2 factor (``--global-shift``), sessions assigned round robin to ``--clusters`` protocol
   clusters, series gains from ``--gain-model``, the scanner-realistic forward model on or off
   (``--mismatch``). An existing WORK/archive is reused only if its options are the ones asked;
2. the real workflow (Snakemake, target ``all_preproc``: dcm2niix, registration, N4, skull
   strip, segmentation) at 2 mm in-plane on a 112 × 112 grid, exactly as a user runs it; its
   sessions are mapped back to the phantom's by the pseudonyms of the DICOM headers' PatientID
   and StudyInstanceUID (same salt). Sessions the pipeline failed on are reported and left out;
3. the truth maps of every session's T2w series resampled onto the pipeline's grid (identity
   world transform: both are in scanner coordinates) and the eroded true WM/GM masks (2 mm
   from CSF, lesions excluded) -- for the metrics only. ``--segmentation truth`` (a diagnosis,
   titled "TRUTH SEGMENTATION") instead gives the estimators the truth dseg, brain mask, eroded
   masks and probsegs on the grid (copies of the sessions in WORK/results_truthseg/);
4. ``pack`` every session, ``train`` (width 8, CPU, 2 threads; 20 epochs, ``--quick`` 6) per
   seed: a ``scaling=seed`` model (method ``seed``) and a ``scaling=calibrated`` one (methods
   ``calibrated`` and ``network-only``); ``network-free`` needs no training;
5. infer every session with every method (fp32, CPU) into WORK/maps/<method>/seed<k>/
   (``network-free``: WORK/maps/network-free/untrained/);
6. per session the means over the eroded TRUE WM and GM of T1, T2, PD (estimated and true)
   and of the uncertainty maps where written, plus protocol-twin voxel agreement (the second
   session resampled onto the first's grid through the TRUE rigid transform between them;
   the same for the two sessions' TRUE maps gives the ceiling that resampling leaves);
   two baselines: ``prior`` (the estimator's prior centres) and ``constant`` (the mean of the
   TRUE values over all sessions: the best any single constant does; it uses the truth);
7. WORK/yardstick.json and Markdown tables on stdout and in WORK/yardstick.md (with
   ``--segmentation truth``: yardstick_truthseg.json/.md, models and maps under
   *_truthseg, so a diagnosis never overwrites the honest numbers).

Every stage's wall-clock time is printed as it ends and recorded in the JSON; an interrupted
run resumes (Snakemake, training and finished maps are reused). ``--quick --subjects 6
--sessions 1``, all methods, on 2 shared CPU cores (2026-12-04): 12.7 min with 3 epochs on a
quiet machine (phantom 107 s, pipeline 459 s, training 72 s, inference 105 s); epochs 4-6 add
about 95 s (≈ 14 min); 27 min with 6 epochs while the shared machine ran every pipeline step
twice as slowly. The pipeline dominates (≈ 75 s per session when quiet, the hd-bet skull strip
half of it), so no epoch count buys back a slow machine.

Bad options end in one line on stderr and exit status 2, before any heavy import or work.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import numpy as np

PROG = "bench_yardstick"
REPO = Path(__file__).resolve().parents[1]
METHODS = ("seed", "calibrated", "network-free", "network-only", "per-session")
BASELINES = ("prior", "constant")
PARAMS = ("T1", "T2", "PD")
TISSUES = ("WM", "GM")
MAP_KEY = {"T1": "T1map", "T2": "T2map", "PD": "PDmap"}
PRIOR_KEY = {"T1": "t1_s", "T2": "t2_s", "PD": "pd"}
UNIT = {"T1": "s", "T2": "s", "PD": "water = 1"}
# method -> (scaling of the trained model or None, scaling at inference, estimator)
METHOD_SPEC: dict[str, tuple[str | None, str, str]] = {
    "seed": ("seed", "seed", "refined"),
    "calibrated": ("calibrated", "calibrated", "refined"),
    "network-only": ("calibrated", "calibrated", "network-only"),
    "network-free": (None, "calibrated", "network-free"),
    # the network-free estimator with each session's own calibration (no protocol clusters):
    # what the cluster-level scales change, with no training in between
    "per-session": (None, "calibrated", "network-free"),
}
PER_SESSION = {"per-session"}
"""Methods that never use the protocol clusters' scales."""
SALT = "bench-yardstick-salt"
INPLANE_MM = 2.0
MATRIX = 112
ERODE_MM = 2.0
WIDTH = 8
THREADS = 2
EPOCHS = {"quick": 6, "full": 20}  # full: ~750 steps on 20 sessions (batch 16)
HEAD_ROLES = ("t1w", "t2w", "flair")
PROBSEG = {"GM": 1, "WM": 2, "CSF": 3}


# ---------------------------------------------------------------------------------------------
# command line (no heavy import before the options are checked)
# ---------------------------------------------------------------------------------------------


def fail(message: str, status: int = 2) -> NoReturn:
    """One line on stderr, then exit."""
    sys.stderr.write(f"{PROG}: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    raise SystemExit(status)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"error: {message}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the options; any problem ends in :func:`fail` (exit 2)."""
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="working folder (archive, pipeline, models, maps)")
    ap.add_argument("--phantom-seed", type=int, required=True, help="seed of the phantom")
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--sessions", type=int, default=2, help="sessions per subject")
    ap.add_argument("--clusters", type=int, default=1,
                    help="protocol clusters (sessions assigned round robin)")
    ap.add_argument("--tissue-range", type=float, default=0.2,
                    help="every tissue parameter drawn within ±R of the generator's table")
    ap.add_argument("--global-shift", type=float, default=0.1,
                    help="brain-wide T1/T2 factor per subject within ±G")
    ap.add_argument("--gain-model", choices=("independent", "protocol"), default="protocol")
    ap.add_argument("--gain-jitter", type=float, default=0.03)
    ap.add_argument("--mismatch", choices=("on", "off"), default="on",
                    help="scanner-realistic forward model of the phantom")
    ap.add_argument("--segmentation", choices=("pipeline", "truth"), default="pipeline",
                    help="truth: the estimators get the TRUE segmentation (diagnosis only)")
    ap.add_argument("--methods", nargs="+", choices=METHODS,
                    default=[m for m in METHODS if m != "per-session"])
    ap.add_argument("--cluster-scales", choices=("on", "off"), default="on",
                    help="scales identified per protocol cluster (the workflow's default, "
                         "model.clusters.enabled); off: per session")
    ap.add_argument("--calibration-session", choices=("on", "off"), default="off",
                    help="on: the first session of each cluster is a calibration session whose "
                         "reference maps are its TRUE maps (titles say so)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of the calibrated network's distillation term towards the "
                         "packed network-free maps (0 = off; > 0: pack, models and maps in "
                         "*_distill<W> folders)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{EPOCHS['quick']} training epochs instead of {EPOCHS['full']}")
    ap.add_argument("--model-error", type=float, default=None,
                    help="infer --model-error (relative signal-model error in the uncertainty "
                         "maps where the scales come from the session alone; default: the "
                         "package's; maps in *_me<X> folders)")
    ap.add_argument("--model-error-cluster", type=float, default=None,
                    help="infer --model-error-cluster (the same where the scales come from a "
                         "protocol cluster; maps in *_mec<X> folders)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="training epochs (overrides --quick's and the full count; models and "
                         "maps in *_e<N> folders)")
    a = ap.parse_args(argv)
    checks = [
        (a.phantom_seed >= 0, f"argument --phantom-seed: must be >= 0, got {a.phantom_seed}"),
        (a.subjects >= 1, f"argument --subjects: must be >= 1, got {a.subjects}"),
        (a.sessions >= 1, f"argument --sessions: must be >= 1, got {a.sessions}"),
        (a.clusters >= 1, f"argument --clusters: must be >= 1, got {a.clusters}"),
        (0.0 <= a.tissue_range < 0.5,
         f"argument --tissue-range: must be in [0, 0.5), got {a.tissue_range}"),
        (0.0 <= a.global_shift < 0.5,
         f"argument --global-shift: must be in [0, 0.5), got {a.global_shift}"),
        (math.isfinite(a.gain_jitter) and a.gain_jitter >= 0,
         f"argument --gain-jitter: must be >= 0, got {a.gain_jitter}"),
        (all(s >= 0 for s in a.seeds), f"argument --seeds: must be >= 0, got {a.seeds}"),
        (a.epochs is None or a.epochs >= 1, f"argument --epochs: must be >= 1, got {a.epochs}"),
        (a.model_error is None or (math.isfinite(a.model_error) and a.model_error >= 0),
         f"argument --model-error: must be >= 0, got {a.model_error}"),
        (a.model_error_cluster is None
         or (math.isfinite(a.model_error_cluster) and a.model_error_cluster >= 0),
         f"argument --model-error-cluster: must be >= 0, got {a.model_error_cluster}"),
        (math.isfinite(a.distill) and a.distill >= 0,
         f"argument --distill: must be >= 0, got {a.distill}"),
        (len(set(a.seeds)) == len(a.seeds), f"argument --seeds: repeated seed in {a.seeds}"),
    ]
    for ok, message in checks:
        if not ok:
            ap.error(message)
    a.methods = [m for m in METHODS if m in a.methods]  # canonical order, no repeats
    return a


def phantom_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The ``PhantomOptions`` of the requested archive (``workers`` aside)."""
    return {"subjects": a.subjects, "sessions": a.sessions, "size": "small",
            "seed": a.phantom_seed, "tissue_range": a.tissue_range, "clusters": a.clusters,
            "gain_model": a.gain_model, "gain_jitter": a.gain_jitter,
            "tissue_table": "independent", "global_shift": a.global_shift,
            "mismatch": a.mismatch == "on"}


# ---------------------------------------------------------------------------------------------
# 1. phantom
# ---------------------------------------------------------------------------------------------


def ensure_archive(archive: Path, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Generate the archive, or reuse one generated with exactly these options (else refuse)."""
    from qmriflow.errors import QmriflowError
    from qmriflow.phantom.generate import PhantomOptions, generate_archive, load_manifest

    opts = PhantomOptions(**kwargs, workers=THREADS)
    asked = json.loads(json.dumps({k: getattr(opts, k) for k in opts.__dataclass_fields__
                                   if k != "workers"}))
    if (archive / "manifest.json").is_file():
        have = load_manifest(archive).get("options", {})
        diff = [f"{k}: {have.get(k)!r} there, {asked.get(k)!r} asked"
                for k in sorted(set(asked) | set(have)) if have.get(k) != asked.get(k)]
        if diff:
            fail(f"{archive} holds a phantom generated with other options ({'; '.join(diff)}); "
                 "use another WORK folder or remove that archive")
        return load_manifest(archive)
    try:
        return generate_archive(archive, opts)
    except (QmriflowError, ValueError) as exc:
        fail(f"phantom seed {kwargs['seed']}: cannot build the archive: {exc}")


# ---------------------------------------------------------------------------------------------
# 2. the pipeline's own preprocessing
# ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    """One phantom session and where the pipeline put it."""

    subject: str
    session: str
    label: str  # sub-<pseudonym>_ses-<pseudonym>
    pipeline_dir: Path
    cluster: int
    t2w: dict[str, Any]  # manifest row of the T2w series (truth paths, head pose)

    @property
    def name(self) -> str:
        return f"{self.subject}/{self.session}"


def pipeline_config(work: Path, archive: Path) -> Path:
    """The workflow config of this benchmark (written to WORK/pipeline_config.yaml)."""
    import yaml

    cfg = {"input_dir": str(archive / "dicom"), "output_dir": str(work / "results"),
           "work_dir": str(work / "wf"), "pseudonym_salt": SALT,
           "preprocessing": {"inplane_mm": INPLANE_MM, "matrix": MATRIX}}
    path = work / "pipeline_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_pipeline(work: Path, archive: Path) -> int:
    """``snakemake all_preproc`` on the archive (keep-going); returns its exit status."""
    from qmriflow.workflow.demo import tool_env

    cfg = pipeline_config(work, archive)
    log = work / "wf" / "snakemake.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--configfile", str(cfg), "--directory", str(work), "--cores", str(THREADS),
           "--keep-going", "all_preproc"]
    with log.open("w") as fh:
        return subprocess.run(cmd, cwd=work, stdout=fh, stderr=subprocess.STDOUT,
                              env=tool_env(), check=False).returncode


def session_labels(archive: Path, manifest: dict[str, Any],
                   salt: str = SALT) -> dict[tuple[str, str], str]:
    """(subject, session) of the phantom -> the pipeline's ``sub-X_ses-Y``, from the pseudonyms
    of PatientID and StudyInstanceUID of one DICOM file per series."""
    import pydicom

    from qmriflow.archive.discover import pseudonym

    out: dict[tuple[str, str], str] = {}
    for r in manifest["series"]:
        if r["role"] not in HEAD_ROLES:
            continue
        f = min((archive / r["dicom_dir"]).glob("*.dcm"))
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        label = (f"sub-{pseudonym(str(ds.PatientID), salt)}_"
                 f"ses-{pseudonym(str(ds.StudyInstanceUID), salt)}")
        key = (r["subject"], r["session"])
        if out.setdefault(key, label) != label:
            raise RuntimeError(f"{key}: series disagree on the session label ({label} vs "
                               f"{out[key]})")
    return out


def label_dir(root: Path, label: str) -> Path:
    """``root/sub-X/ses-Y`` of ``sub-X_ses-Y``."""
    sub, ses = label.split("_")
    return root / sub / ses


def session_complete(sdir: Path) -> bool:
    """Every file the estimators read, and the provenance record written last."""
    from qmriflow.model.data import session_files

    f = session_files(sdir)
    need = [*f.images.values(), f.brain_mask, f.params, f.dseg,
            sdir / f"{f.label}_desc-provenance.json"]
    return all(p.is_file() for p in need)


def pipeline_sessions(work: Path, archive: Path, manifest: dict[str, Any],
                      rc: int) -> list[Session]:
    """The sessions the pipeline finished; one line for each it did not; stops (exit 1, with
    the Snakemake log's tail) when it finished none."""
    from qmriflow.workflow.failures import collect

    labels = session_labels(archive, manifest)
    t2w = {(r["subject"], r["session"]): r for r in manifest["series"] if r["role"] == "t2w"}
    failures: dict[str, list[str]] = {}
    for rec in collect(work / "wf" / "failures"):
        failures.setdefault(rec.get("session", ""), []).append(
            f"{rec.get('step', '?')}: {rec.get('reason', '')}")
    done: list[Session] = []
    for key in sorted(labels):
        label = labels[key]
        sdir = label_dir(work / "results", label)
        if session_complete(sdir):
            row = t2w[key]
            done.append(Session(key[0], key[1], label, sdir, int(row["protocol_cluster"]), row))
        else:
            why = "; ".join(failures.get(label, [])) or "outputs missing (see the Snakemake log)"
            print(f"{PROG}: session {key[0]}/{key[1]} ({label}): the pipeline failed, left out: "
                  f"{why}", flush=True)
    log = work / "wf" / "snakemake.log"
    if not done:
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
        sys.stderr.write("\n".join(tail) + "\n")
        fail(f"the pipeline finished no session (Snakemake exit status {rc}; log: {log})", 1)
    if rc != 0:
        print(f"{PROG}: Snakemake exit status {rc} (log: {log}); {len(done)} of {len(labels)} "
              "sessions finished", flush=True)
    return done


# ---------------------------------------------------------------------------------------------
# 3. truth on the pipeline's grid (metrics only)
# ---------------------------------------------------------------------------------------------


def resample_world(data: np.ndarray, src_affine: np.ndarray, grid_affine: np.ndarray,
                   grid_shape: Sequence[int], grid_to_src_world: np.ndarray | None = None,
                   order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (voxel -> world ``src_affine``) sampled at the world positions of a grid's
    voxels mapped by ``grid_to_src_world`` (4×4, default identity); linear (``order=1``) or
    nearest (0). Returns the values (0 outside) and the mask of grid voxels inside the source."""
    import numpy as np
    from scipy import ndimage

    t = np.eye(4) if grid_to_src_world is None else np.asarray(grid_to_src_world, float)
    m = np.linalg.inv(np.asarray(src_affine, float)) @ t @ np.asarray(grid_affine, float)
    shape = tuple(int(s) for s in grid_shape)
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    vox = m[:3, :3] @ ijk + m[:3, 3:4]
    near = np.round(vox)  # rounding noise must not push a voxel on the edge outside
    vox = np.where(np.abs(vox - near) < 1e-4, near, vox)
    src = np.asarray(data)
    inside = np.all((vox >= 0) & (vox <= np.asarray(src.shape[:3])[:, None] - 1), axis=0)
    out = ndimage.map_coordinates(src.astype(np.float64), vox, order=order, mode="constant",
                                  cval=0.0, prefilter=False)
    return out.reshape(shape), inside.reshape(shape)


def truth_paths(work: Path, label: str) -> dict[str, Path]:
    """Files of a session's truth on the pipeline's grid (WORK/truth/<label>/)."""
    d = work / "truth" / label
    paths = {k: d / f"{label}_{k}.nii.gz" for k in MAP_KEY.values()}
    paths.update(dseg=d / f"{label}_dseg.nii.gz", brain=d / f"{label}_desc-brain_mask.nii.gz",
                 WM=d / f"{label}_label-WM_desc-eroded_mask.nii.gz",
                 GM=d / f"{label}_label-GM_desc-eroded_mask.nii.gz")
    return paths


def preproc_t2w(sdir: Path) -> Path:
    """The pipeline's preprocessed T2w (the grid of everything in the session)."""
    from qmriflow.model.data import session_files

    return session_files(sdir).images["T2w"]


def build_truth(work: Path, archive: Path, s: Session) -> dict[str, Path]:
    """The T2w series' truth maps (linear), dseg and brain mask (nearest) on the grid of the
    pipeline's preprocessed T2w, and the eroded true WM/GM masks (2 mm from CSF; lesion labels
    are not WM/GM/CSF)."""
    import nibabel as nib
    import numpy as np

    from qmriflow.io import save_nifti
    from qmriflow.preproc.segment import erode_near_csf

    paths = truth_paths(work, s.label)
    if all(p.is_file() for p in paths.values()):
        return paths
    grid = nib.load(preproc_t2w(s.pipeline_dir))
    aff, shape = grid.affine, grid.shape[:3]
    for key in MAP_KEY.values():
        src = nib.load(archive / s.t2w["truth"][key])
        vals, _ = resample_world(np.asarray(src.dataobj), src.affine, aff, shape)
        save_nifti(paths[key], vals, aff, {"Description": f"phantom truth {key} on the "
                                                          "pipeline's grid (linear)"})
    src = nib.load(archive / s.t2w["truth"]["dseg"])
    dseg = np.rint(resample_world(np.asarray(src.dataobj), src.affine, aff, shape,
                                  order=0)[0]).astype(np.uint8)
    src = nib.load(archive / s.t2w["truth"]["brainmask"])
    brain = resample_world(np.asarray(src.dataobj), src.affine, aff, shape, order=0)[0] > 0.5
    seg3 = np.where(np.isin(dseg, (1, 2, 3)), dseg, 0).astype(np.uint8)
    zooms = tuple(float(z) for z in np.linalg.norm(aff[:3, :3], axis=0))
    wm, gm = erode_near_csf(seg3, zooms, ERODE_MM)  # type: ignore[arg-type]
    if not (wm.any() and gm.any()):
        raise RuntimeError(f"session {s.name}: no eroded true WM or GM on the pipeline's grid")
    save_nifti(paths["dseg"], seg3, aff, {"Description": "phantom truth dseg (1 GM, 2 WM, "
                                                         "3 CSF; lesions 0), nearest"},
               dtype=np.uint8)
    save_nifti(paths["brain"], brain, aff, dtype=np.uint8)
    save_nifti(paths["WM"], wm, aff, dtype=np.uint8)
    save_nifti(paths["GM"], gm, aff, dtype=np.uint8)
    return paths


def truth_segmentation_copy(work: Path, s: Session) -> Path:
    """A copy of the pipeline's session in WORK/results_truthseg/ whose dseg, brain mask,
    eroded masks and probsegs are the truth's on the same grid (diagnosis only)."""
    import nibabel as nib
    import numpy as np

    from qmriflow.io import save_nifti
    from qmriflow.model.data import session_files

    dst = label_dir(work / "results_truthseg", s.label)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(s.pipeline_dir, dst)
    f = session_files(dst)
    tp = truth_paths(work, s.label)
    for src, target in ((tp["dseg"], f.dseg), (tp["brain"], f.brain_mask),
                        (tp["WM"], f.wm_eroded), (tp["GM"], f.gm_eroded)):
        shutil.copyfile(src, target)
        target.with_name(target.name.replace(".nii.gz", ".json")).unlink(missing_ok=True)
    seg = nib.load(tp["dseg"])
    dseg = np.asarray(seg.dataobj)
    for name, lab in PROBSEG.items():
        p = f.dseg.with_name(f.dseg.name.replace("_dseg.", f"_label-{name}_probseg."))
        if p.is_file():
            save_nifti(p, (dseg == lab).astype(np.float32), seg.affine,
                       {"Description": f"TRUTH segmentation: 1 where the true dseg is {name}"})
    return dst


# ---------------------------------------------------------------------------------------------
# 4./5. pack, train, infer
# ---------------------------------------------------------------------------------------------


def ensure_pack(pack_dir: Path, dirs: Sequence[Path], stale: Sequence[Path],
                clusters: Path | None = None, targets: bool = False) -> bool:
    """Pack the sessions unless ``pack_dir`` already holds exactly them (with the same
    clusters file); a new pack removes the ``stale`` folders (models and maps of the old one).
    Returns True if it packed."""
    from qmriflow.model.clusters import load_clusters
    from qmriflow.model.data import pack_sessions

    idx = pack_dir / "index.json"
    want = sorted(str(d) for d in dirs)
    stamp = pack_dir / "clusters_used.txt"
    used = "" if clusters is None else f"{clusters} {clusters.stat().st_mtime_ns}"
    if idx.is_file():
        have = json.loads(idx.read_text())
        if (sorted(s["session_dir"] for s in have["sessions"]) == want and not have["skipped"]
                and (stamp.read_text() if stamp.is_file() else "") == used):
            return False
    for d in (pack_dir, *stale):
        if d.exists():
            shutil.rmtree(d)
    index = pack_sessions(list(dirs), pack_dir, skip_incomplete=True,
                          clusters=None if clusters is None else load_clusters(clusters),
                          targets=targets)
    stamp.write_text(used)
    for sk in index["skipped"]:
        print(f"{PROG}: not packed: {sk['session_dir']}: {sk['reason']}", flush=True)
    return True


def maps_dir(work: Path, tag: str, method: str, seed: int | None) -> Path:
    """WORK/maps<tag>/<method>/seed<k>/ (``untrained`` for the network-free method)."""
    return work / f"maps{tag}" / method / ("untrained" if seed is None else f"seed{seed}")


def same_model_error(t1map: Path, requested: dict[str, float]) -> bool:
    """Whether maps on record were made with the signal-model errors of this run (``infer``'s
    ``model_error`` / ``model_error_cluster``, the package's defaults where not requested):
    their uncertainty maps depend on it, the maps themselves do not. Maps without uncertainty
    maps always match; maps from before the sidecar said which error applied never do."""
    from qmriflow.model.calibration import DEFAULT_MODEL_ERROR, DEFAULT_MODEL_ERROR_CLUSTER

    side = json.loads(t1map.with_name(t1map.name.replace(".nii.gz", ".json")).read_text())
    unc = ((side.get("Scaling") or {}).get("pinning") or {}).get("uncertainty")
    if unc is None:
        return True
    if "model_error_for" not in unc:
        return False
    cluster = "protocol cluster" in unc["model_error_for"]
    want = (requested.get("model_error_cluster", DEFAULT_MODEL_ERROR_CLUSTER) if cluster
            else requested.get("model_error", DEFAULT_MODEL_ERROR))
    return bool(unc.get("model_error_log_sd") == want)


def method_seeds(method: str, seeds: Sequence[int]) -> list[int | None]:
    """The training seeds a method is run with (None: the method has no training)."""
    return [None] if METHOD_SPEC[method][0] is None else list(seeds)


# ---------------------------------------------------------------------------------------------
# 6. per-session values
# ---------------------------------------------------------------------------------------------


def _load(path: Path) -> np.ndarray:
    import nibabel as nib
    import numpy as np

    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def tissue_means(maps: dict[str, Path], masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """{tissue: {param: mean over the mask}} of the maps ``{T1map: path, ...}``."""
    out: dict[str, Any] = {}
    vols = {p: _load(maps[MAP_KEY[p]]) for p in PARAMS}
    for t in TISSUES:
        out[t] = {p: float(vols[p][masks[t]].mean()) for p in PARAMS}
    return out


def global_factors(archive: Path, subject: str) -> dict[str, float]:
    """The subject's drawn brain-wide factors g (T1, T2) from truth/<subject>/subject.json."""
    js = json.loads((archive / "truth" / subject / "subject.json").read_text())
    g = {p: float(js["global_shift"][p]) for p in ("T1", "T2")}
    for p, v in g.items():
        if not 0.4 < v < 2.5:  # a factor near 1, not a shift near 0
            raise RuntimeError(f"{subject}: global_shift {p} = {v} is not a factor near 1")
    return g


def twin_voxels(s1: Session, s2: Session, maps1: dict[str, Path], maps2: dict[str, Path],
                masks1: dict[str, np.ndarray]) -> dict[str, Any]:
    """Voxel Pearson r and Lin's CCC of two sessions' maps in the first session's eroded true
    WM+GM, the second resampled onto the first's grid through the TRUE rigid transform between
    them (a world point x1 of session 1 is at P2·P1⁻¹·x1 in session 2, P = T2w head pose)."""
    import nibabel as nib
    import numpy as np

    from qmriflow.stats.metrics import lin_ccc, pearson_r

    p1 = np.asarray(s1.t2w["head_pose"], float)
    p2 = np.asarray(s2.t2w["head_pose"], float)
    to2 = p2 @ np.linalg.inv(p1)
    both = masks1["WM"] | masks1["GM"]
    out: dict[str, Any] = {"r": {}, "ccc": {}}
    keep = None
    vals = {}
    for p in PARAMS:
        a = nib.load(maps1[MAP_KEY[p]])
        b = nib.load(maps2[MAP_KEY[p]])
        va = np.asarray(a.dataobj, np.float64)
        vb, inside = resample_world(np.asarray(b.dataobj, np.float64), b.affine, a.affine,
                                    va.shape, to2)
        ok = both & inside & (va > 0) & (vb > 0)
        keep = ok if keep is None else keep & ok
        vals[p] = (va, vb)
    assert keep is not None
    out["n_voxels"] = int(keep.sum())
    for p in PARAMS:
        va, vb = vals[p]
        enough = out["n_voxels"] >= 2
        out["r"][p] = pearson_r(va[keep], vb[keep]) if enough else float("nan")
        out["ccc"][p] = lin_ccc(va[keep], vb[keep]) if enough else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# 8. metrics and tables (from the JSON alone)
# ---------------------------------------------------------------------------------------------


def _nan() -> float:
    return float("nan")


def _slope_r(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    from qmriflow.stats.metrics import slope_r

    return slope_r(x, y) if len(x) >= 2 else (_nan(), _nan())


def errors_pct(rows: Sequence[dict[str, Any]], tissue: str, param: str) -> list[float]:
    """100·(estimated − true)/true of every row."""
    return [100.0 * (r["estimated"][tissue][param] - r["true"][tissue][param])
            / r["true"][tissue][param] for r in rows]


def error_summary(rows: Sequence[dict[str, Any]], tissue: str, param: str) -> dict[str, float]:
    """Mean, SD, max |·| and RMS of the relative errors (%) over the rows."""
    import numpy as np

    e = np.asarray(errors_pct(rows, tissue, param), float)
    if e.size == 0:
        return {"mean": _nan(), "sd": _nan(), "max_abs": _nan(), "rms": _nan()}
    return {"mean": float(e.mean()), "sd": float(e.std()), "max_abs": float(np.abs(e).max()),
            "rms": float(np.sqrt(np.mean(e ** 2)))}


def between_slope(rows: Sequence[dict[str, Any]], tissue: str,
                  param: str) -> tuple[float, float]:
    """Slope and r of the estimated vs the true session means (all rows)."""
    x = [r["true"][tissue][param] for r in rows]
    y = [r["estimated"][tissue][param] for r in rows]
    return _slope_r(x, y)


def within_cluster_slope(rows: Sequence[dict[str, Any]], tissue: str,
                         param: str) -> tuple[float, float]:
    """Slope and r of estimated vs true session means after removing, from each, the mean of
    its protocol cluster (per training seed): the variation a cluster-wide offset cannot
    explain."""
    from qmriflow.stats.metrics import group_centred

    groups = [(r["cluster"], r.get("seed")) for r in rows]
    true = [r["true"][tissue][param] for r in rows]
    est = [r["estimated"][tissue][param] for r in rows]
    if _constant_within(true, groups):  # e.g. one session per cluster: nothing to regress on
        return _nan(), _nan()
    if _constant_within(est, groups):  # exactly (centring would leave rounding residue)
        return 0.0, _nan()
    return _slope_r(list(group_centred(true, groups)), list(group_centred(est, groups)))


def _constant_within(values: Sequence[float], groups: Sequence[Any]) -> bool:
    """Whether every group's values are all equal (exactly)."""
    first: dict[Any, float] = {}
    return all(first.setdefault(g, v) == v for g, v in zip(groups, values, strict=True))


def recovered_shift(rows: Sequence[dict[str, Any]], param: str) -> dict[str, Any]:
    """Per subject est_shift = mean over its rows and over WM/GM of log(estimated/true) +
    log g (g: the subject's drawn brain-wide factor); the slope and r of est_shift on log g
    across subjects (1: the shift fully recovered, 0: ignored)."""
    import numpy as np

    per: dict[str, list[float]] = {}
    log_g: dict[str, float] = {}
    for r in rows:
        g = math.log(r["global_factor"][param])
        log_g[r["subject"]] = g
        per.setdefault(r["subject"], []).extend(
            math.log(r["estimated"][t][param] / r["true"][t][param]) + g for t in TISSUES)
    subs = sorted(per)
    x = [log_g[s] for s in subs]
    y = [float(np.mean(per[s])) for s in subs]
    slope, rr = _slope_r(x, y)
    return {"slope": slope, "se": slope_se(x, y), "r": rr, "n_subjects": len(subs),
            "log_g": x, "est_shift": y}


def slope_se(x: Sequence[float], y: Sequence[float]) -> float:
    """Standard error of the least-squares slope of y on x (NaN below 3 points or for a
    constant x): sqrt(residual variance / Σ(x − x̄)²)."""
    import numpy as np

    a, b = np.asarray(x, float), np.asarray(y, float)
    if a.size < 3 or np.all(a == a[0]):
        return _nan()
    da = a - a.mean()
    slope = float(np.dot(da, b - b.mean()) / np.dot(da, da))
    res = (b - b.mean()) - slope * da
    return float(np.sqrt(np.dot(res, res) / (a.size - 2) / np.dot(da, da)))


def twin_mean_diffs(rows: Sequence[dict[str, Any]], tissue: str, param: str) -> list[float]:
    """|difference| of the estimated tissue means, % of their mean, between each subject's
    first session and each later one (same training seed)."""
    by: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["subject"], r.get("seed")), []).append(r)
    out = []
    for lst in by.values():
        lst = sorted(lst, key=lambda r: r["session"])
        a = lst[0]["estimated"][tissue][param]
        for other in lst[1:]:
            b = other["estimated"][tissue][param]
            out.append(200.0 * abs(a - b) / (a + b))
    return out


def seed_spread(rows: Sequence[dict[str, Any]], tissue: str, param: str) -> list[float]:
    """Per session: (max − min) over training seeds of the estimated mean, % of their mean
    (only sessions with ≥ 2 seeds)."""
    import numpy as np

    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get("seed") is not None:
            by.setdefault((r["subject"], r["session"]), []).append(
                r["estimated"][tissue][param])
    return [float(100.0 * (max(v) - min(v)) / np.mean(v)) for v in by.values() if len(v) >= 2]


def _f(v: float, fmt: str = ".2f") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, fmt)


def _sr(sr: tuple[float, float]) -> str:
    return f"{_f(sr[0])} ({_f(sr[1])})"


def title_suffix(settings: dict[str, Any]) -> str:
    """What every table title states."""
    seg = ("TRUTH SEGMENTATION" if settings["segmentation"] == "truth"
           else "pipeline segmentation")
    extra = ""
    if settings.get("cluster_scales", "off") == "on":
        extra = ", cluster-level scales"
        if settings.get("calibration_session") == "on":
            extra += " + one calibration session per cluster (its TRUE maps as reference)"
    return (f"phantom seed {settings['phantom_seed']}, gain model {settings['gain_model']}, "
            f"{seg}, mismatch {settings['mismatch']}{extra}")


def method_order(report: dict[str, Any]) -> list[str]:
    """Methods in canonical order, then the baselines, then anything else on record."""
    names = list(report["methods"])
    order = [m for m in (*METHODS, *BASELINES) if m in names]
    return order + [m for m in names if m not in order]


def render_tables(report: dict[str, Any]) -> str:
    """The Markdown tables of a yardstick report (the ``yardstick.json`` content)."""
    import numpy as np

    st = report["settings"]
    suf = title_suffix(st)
    methods = method_order(report)
    lines: list[str] = []
    n_ses = len({(r["subject"], r["session"]) for m in methods
                 for r in report["methods"][m]["sessions"]})
    lines += [f"## Yardstick — {suf}", "",
              f"{n_ses} sessions used ({st['subjects']} subjects × {st['sessions']} sessions "
              "asked); "
              f"{st['clusters']} protocol cluster(s), tissue range ±{st['tissue_range']}, "
              f"global shift ±{st['global_shift']}, gain jitter {st['gain_jitter']}, "
              f"tissue table {st['tissue_table']}, seeds {st['seeds']}, "
              f"{'quick' if st.get('quick') else 'full'} training "
              f"({st.get('epochs', '?')} epochs), default method "
              f"`{st.get('default_method', '?')}`. Baselines: `prior` = the estimator's prior "
              "centres for every session; `constant` = the mean of the TRUE values over all "
              "sessions (uses the truth: the best any single constant can do). Errors pool "
              "sessions × seeds; slope (r) = least-squares slope of estimated on true session "
              "means and Pearson r; within cluster: each protocol cluster's mean removed from "
              "both first.", ""]
    for p in PARAMS:
        lines += [f"### {p} ({UNIT[p]}) vs truth in eroded true WM/GM — {suf}", ""]
        head = ["method", "n"]
        for t in TISSUES:
            head += [f"{t} err % mean ± SD", f"{t} max abs %", f"{t} RMS %",
                     f"{t} slope (r)", f"{t} within-cluster slope (r)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            rows = report["methods"][m]["sessions"]
            note = (" (baseline)" if report["methods"][m].get("baseline") else
                    " (default)" if m == st.get("default_method") else "")
            cells = [m + note, str(len(rows))]
            for t in TISSUES:
                e = error_summary(rows, t, p)
                cells += [f"{_f(e['mean'], '+.1f')} ± {_f(e['sd'], '.1f')}",
                          _f(e["max_abs"], ".1f"), _f(e["rms"], ".1f"),
                          _sr(between_slope(rows, t, p)), _sr(within_cluster_slope(rows, t, p))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    # recovered brain-wide shift
    lines += [f"### Recovered fraction of the brain-wide shift — {suf}", "",
              "Per subject est_shift = mean over its sessions (and seeds) and WM/GM of "
              "log(estimated/true) + log g; slope ± its standard error (r) of est_shift on "
              "log g across subjects (1 = the shift fully recovered, 0 = ignored; the other "
              "per-subject tissue variation makes the slope noisy with few subjects).", "",
              "| method | T1 slope ± SE (r) | T2 slope ± SE (r) | subjects |",
              "|---|---|---|---|"]
    for m in methods:
        rows = report["methods"][m]["sessions"]
        cells = [m]
        for p in ("T1", "T2"):
            rs = recovered_shift(rows, p)
            cells.append(f"{_f(rs['slope'])} ± {_f(rs['se'])} ({_f(rs['r'])})")
        lines.append("| " + " | ".join(cells) + f" | {rs['n_subjects']} |")
    lines.append("")
    # protocol twins
    if any(twin_mean_diffs(report["methods"][m]["sessions"], "WM", "T1") for m in methods):
        lines += [f"### Protocol twins (same subject, another session) — {suf}", "",
                  "|Δ| of the WM/GM means, % of their mean (mean / max over pairs, tissues and "
                  "seeds); voxel Pearson r and Lin's CCC in the first session's eroded true "
                  "WM+GM, the second session resampled through the TRUE rigid transform "
                  "(mean / min). `truth maps (ceiling)`: the same for the two sessions' TRUE "
                  "maps on the pipeline's grids (what resampling the slices leaves).", ""]
        head = ["method"]
        for p in PARAMS:
            head += [f"{p} abs Δ mean/max %", f"{p} voxel r", f"{p} CCC"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            rec = report["methods"][m]
            cells = [m]
            for p in PARAMS:
                d = [v for t in TISSUES for v in twin_mean_diffs(rec["sessions"], t, p)]
                cells.append(f"{_f(float(np.mean(d)) if d else _nan())} / "
                             f"{_f(max(d) if d else _nan())}")
                for k in ("r", "ccc"):
                    v = [tw[k][p] for tw in rec.get("twins", []) if math.isfinite(tw[k][p])]
                    cells.append(f"{_f(float(np.mean(v)), '.3f')} / {_f(min(v), '.3f')}"
                                 if v else "—")
            lines.append("| " + " | ".join(cells) + " |")
        if report.get("twins_truth"):
            cells = ["truth maps (ceiling)"]
            true_rows = list({(r["subject"], r["session"]): {**r, "estimated": r["true"],
                                                             "seed": None}
                              for m in methods for r in report["methods"][m]["sessions"]
                              }.values())
            for p in PARAMS:
                d = [v for t in TISSUES for v in twin_mean_diffs(true_rows, t, p)]
                cells.append(f"{_f(float(np.mean(d)) if d else _nan())} / "
                             f"{_f(max(d) if d else _nan())}")
                for k in ("r", "ccc"):
                    v = [tw[k][p] for tw in report["twins_truth"] if math.isfinite(tw[k][p])]
                    cells.append(f"{_f(float(np.mean(v)), '.3f')} / {_f(min(v), '.3f')}"
                                 if v else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    # seed spread
    spread_rows = []
    for m in methods:
        rows = report["methods"][m]["sessions"]
        cells = [_f(max(s), ".1f") if (s := seed_spread(rows, t, p)) else None
                 for p in PARAMS for t in TISSUES]
        if any(c is not None for c in cells):
            spread_rows.append("| " + " | ".join([m, *(c or "—" for c in cells)]) + " |")
    if spread_rows:
        head = ["method"] + [f"{p} {t}" for p in PARAMS for t in TISSUES]
        lines += [f"### Seed spread: max over sessions of (max − min over seeds) of the WM/GM "
                  f"means, % — {suf}", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head), *spread_rows, ""]
    # reported uncertainty vs the actual error
    unc = [m for m in methods if any("uncertainty" in r for r in report["methods"][m]["sessions"])]
    if unc:
        head = ["method"] + [f"{p} {t}" for p in PARAMS for t in TISSUES]
        lines += [f"### Reported uncertainty vs actual error: RMS error % / RMS of the mean "
                  f"uncertainty map % / sessions whose |error| is within the stated SD — "
                  f"{suf}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in unc:
            rows = [r for r in report["methods"][m]["sessions"] if "uncertainty" in r]
            cells = [m]
            for p in PARAMS:
                for t in TISSUES:
                    u = [100.0 * r["uncertainty"][t][p] / r["estimated"][t][p] for r in rows]
                    err = errors_pct(rows, t, p)
                    cover = float(np.mean([abs(e) <= ui for e, ui in zip(err, u, strict=True)]))
                    cells.append(f"{_f(error_summary(rows, t, p)['rms'], '.1f')} / "
                                 f"{_f(float(np.sqrt(np.mean(np.square(u)))), '.1f')} / "
                                 f"{100 * cover:.0f} %")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


class Timer:
    """Wall-clock time of every stage, printed as it ends."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    def done(self, name: str, since: float) -> None:
        dt = time.perf_counter() - since
        self.stages[name] = round(self.stages.get(name, 0.0) + dt, 1)
        print(f"[{time.perf_counter() - self.t0:7.0f} s] {name}: {dt:.0f} s", flush=True)

    def total(self) -> dict[str, float]:
        return {**self.stages, "total": round(time.perf_counter() - self.t0, 1)}


def fit_cluster_scales(work: Path, tag: str, sessions: Sequence[Session],
                       dirs: dict[str, Path], calibration_session: bool) -> Path:
    """``qmriflow cluster-fit`` over the sessions (as the workflow's rule cluster_fit runs it);
    with ``calibration_session`` the first session (by subject, session) of every protocol
    cluster gets its TRUE maps as reference maps. Refitted on every run (a changed file makes
    the pack, models and maps stale)."""
    from qmriflow.model.clusters import fit_clusters, group_sessions, observe

    out = work / f"clusters{tag}.json"
    calibration: dict[str, Any] = {}
    if calibration_session:
        sigs = {s.label: observe(dirs[s.label]).signature for s in sessions}
        for members in group_sessions(sigs).values():
            first = min(members, key=lambda lab: next((s.subject, s.session) for s in sessions
                                                      if s.label == lab))
            tp = truth_paths(work, first)
            calibration[first] = {"maps": {k: str(tp[k]) for k in ("T1map", "T2map", "PDmap")}}
    if out.is_file():
        have = json.loads(out.read_text())
        if sorted(have.get("sessions", {})) == sorted(s.label for s in sessions):
            return out
        out.unlink()
    doc = fit_clusters([dirs[s.label] for s in sessions], out, calibration=calibration,
                       log=lambda msg: print(f"{PROG}: {msg}", flush=True))
    for name, c in doc["clusters"].items():
        print(f"{PROG}: {name}: {c['status']}", flush=True)
    return out


def baselines(sessions_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``prior`` and ``constant`` pseudo-methods on the sessions of ``sessions_rows``."""
    import numpy as np

    from qmriflow.model.calibration import Priors

    centres = Priors().centres
    keep = ("subject", "session", "label", "cluster", "global_factor", "true")
    prior = {t: {p: float(centres[t][PRIOR_KEY[p]]) for p in PARAMS} for t in TISSUES}
    const = {t: {p: float(np.mean([r["true"][t][p] for r in sessions_rows])) for p in PARAMS}
             for t in TISSUES}
    return {
        "prior": {"baseline": True, "description": "every session estimated as the "
                  "estimator's prior centres (qmriflow.model.calibration.Priors().centres)",
                  "sessions": [{**{k: r[k] for k in keep}, "seed": None, "estimated": prior}
                               for r in sessions_rows]},
        "constant": {"baseline": True, "uses_truth": True, "description": "every session "
                     "estimated as the mean of the TRUE values over all sessions: the best any "
                     "single constant can do (it uses the truth)",
                     "sessions": [{**{k: r[k] for k in keep}, "seed": None, "estimated": const}
                                  for r in sessions_rows]},
    }


def run(a: argparse.Namespace) -> int:
    """Every stage (module docstring); returns the exit status."""
    import torch

    from qmriflow.errors import QmriflowError
    from qmriflow.model.calibration import DEFAULT_ESTIMATOR, DEFAULT_METHOD
    from qmriflow.model.infer import infer_session, map_paths
    from qmriflow.model.train import TrainConfig, train

    torch.set_num_threads(THREADS)
    clock = Timer()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    archive = work / "archive"
    truthseg = a.segmentation == "truth"
    # variants write their own packs, models, maps and tables beside the default run
    tag = (("_truthseg" if truthseg else "")
           + ("_calsession" if a.cluster_scales == "on" and a.calibration_session == "on"
              else "")
           + ("_nocluster" if a.cluster_scales == "off" else "")
           + (f"_distill{a.distill:g}" if a.distill > 0 else "")
           + (f"_e{a.epochs}" if a.epochs is not None else ""))
    epochs = a.epochs or EPOCHS["quick" if a.quick else "full"]
    # a model-error variant reuses the pack and models, with its own maps and tables
    mtag = (tag + (f"_me{a.model_error:g}" if a.model_error is not None else "")
            + (f"_mec{a.model_error_cluster:g}" if a.model_error_cluster is not None else ""))
    infer_extra = {k: v for k, v in (("model_error", a.model_error),
                                     ("model_error_cluster", a.model_error_cluster))
                   if v is not None}

    t = time.perf_counter()
    manifest = ensure_archive(archive, phantom_kwargs(a))
    clock.done("phantom", t)

    t = time.perf_counter()
    rc = run_pipeline(work, archive)
    sessions = pipeline_sessions(work, archive, manifest, rc)
    clock.done("pipeline (snakemake all_preproc)", t)

    t = time.perf_counter()
    masks: dict[str, dict[str, np.ndarray]] = {}
    for s in sessions:
        tp = build_truth(work, archive, s)
        masks[s.label] = {tt: _load(tp[tt]) > 0 for tt in TISSUES}
    dirs = {s.label: (truth_segmentation_copy(work, s) if truthseg else s.pipeline_dir)
            for s in sessions}
    clock.done("truth on the grid" + (" + truth-segmentation copies" if truthseg else ""), t)

    clusters_json = None
    if a.cluster_scales == "on":
        t = time.perf_counter()
        clusters_json = fit_cluster_scales(work, tag, sessions, dirs,
                                           a.calibration_session == "on")
        clock.done("cluster fit", t)

    t = time.perf_counter()
    pack = work / f"pack{tag}"
    ensure_pack(pack, list(dirs.values()), [work / f"models{tag}", work / f"maps{tag}"],
                clusters_json, targets=a.distill > 0)
    packed = {x["label"] for x in json.loads((pack / "index.json").read_text())["sessions"]}
    for s in [s for s in sessions if s.label not in packed]:
        print(f"{PROG}: session {s.name} ({s.label}): left out (not packed)", flush=True)
    sessions = [s for s in sessions if s.label in packed]
    clock.done("pack", t)

    scalings = sorted({METHOD_SPEC[m][0] for m in a.methods} - {None})  # type: ignore[type-var]
    models: dict[tuple[str, int], Path] = {}
    splits: dict[tuple[str, int], dict[str, str]] = {}
    trained: dict[str, Any] = {}  # what the models on record were actually trained for
    for scaling in scalings:
        for seed in a.seeds:
            t = time.perf_counter()
            mdir = work / f"models{tag}" / scaling / f"seed{seed}"
            summary = train(pack, mdir, TrainConfig(
                width=WIDTH, epochs=epochs, seed=seed, device="cpu", threads=THREADS,
                scaling=scaling, distill=a.distill if scaling == "calibrated" else 0.0),
                progress=False)
            trained[f"{scaling}/seed{seed}"] = {
                "epochs": len(summary["history"]), "best_epoch": summary["best_epoch"],
                "best_val_loss": summary["best_val_loss"]}
            models[scaling, seed] = mdir / "model.pt"
            splits[scaling, seed] = json.loads((mdir / "split.json").read_text())["subjects"]
            clock.done(f"train scaling={scaling} seed={seed} ({epochs} epochs)", t)

    failed: set[str] = set()
    for m in a.methods:
        trained_as, scaling, estimator = METHOD_SPEC[m]
        for seed in method_seeds(m, a.seeds):
            t = time.perf_counter()
            ckpt = None if trained_as is None else models[trained_as, seed]  # type: ignore[index]
            out = maps_dir(work, mtag, m, seed)
            for s in sessions:
                done = map_paths(out, s.label)["T1map"]
                if done.is_file() and (ckpt is None or done.stat().st_mtime
                                       > ckpt.stat().st_mtime) and same_model_error(
                                           done, infer_extra):
                    continue
                try:
                    infer_session(dirs[s.label], ckpt, out, scaling=scaling, estimator=estimator,
                                  precision="fp32", device="cpu", threads=THREADS, synth=False,
                                  clusters=None if m in PER_SESSION else clusters_json,
                                  **infer_extra)
                except QmriflowError as exc:
                    print(f"{PROG}: session {s.name}: {m} seed {seed}: inference failed, "
                          f"session left out: {exc}", flush=True)
                    failed.add(s.label)
            clock.done(f"infer {m} " + ("(untrained)" if seed is None else f"seed={seed}"), t)
    sessions = [s for s in sessions if s.label not in failed]

    t = time.perf_counter()
    truth_means = {s.label: tissue_means(truth_paths(work, s.label), masks[s.label])
                   for s in sessions}
    factors = {sub: global_factors(archive, sub) for sub in sorted({s.subject for s in sessions})}
    by_subject: dict[str, list[Session]] = {}  # protocol twins: first session vs each later
    for s in sorted(sessions, key=lambda x: (x.subject, x.session)):
        by_subject.setdefault(s.subject, []).append(s)
    methods: dict[str, Any] = {}
    for m in a.methods:
        trained_as = METHOD_SPEC[m][0]
        rows, twins = [], []
        for seed in method_seeds(m, a.seeds):
            out = maps_dir(work, mtag, m, seed)
            for s in sessions:
                mp = map_paths(out, s.label)
                row: dict[str, Any] = {
                    "subject": s.subject, "session": s.session, "label": s.label,
                    "cluster": s.cluster, "seed": seed,
                    "global_factor": factors[s.subject], "true": truth_means[s.label],
                    "estimated": tissue_means(mp, masks[s.label]),
                    "n_voxels": {tt: int(masks[s.label][tt].sum()) for tt in TISSUES}}
                if trained_as is not None:  # the training split of the (pseudonymised) subject
                    row["split"] = splits[trained_as, seed].get(s.label.split("_")[0][4:], "?")
                if all(mp[f"sd_{MAP_KEY[p]}"].is_file() for p in PARAMS):
                    row["uncertainty"] = tissue_means(
                        {MAP_KEY[p]: mp[f"sd_{MAP_KEY[p]}"] for p in PARAMS}, masks[s.label])
                rows.append(row)
            for lst in by_subject.values():
                for s2 in lst[1:]:
                    s1 = lst[0]
                    tw = twin_voxels(s1, s2, map_paths(out, s1.label), map_paths(out, s2.label),
                                     masks[s1.label])
                    twins.append({"subject": s1.subject, "sessions": [s1.session, s2.session],
                                  "clusters": [s1.cluster, s2.cluster], "seed": seed, **tw})
        methods[m] = {"baseline": False, "scaling": METHOD_SPEC[m][1],
                      "estimator": METHOD_SPEC[m][2], "trained_as": trained_as,
                      "sessions": rows, "twins": twins}
    # the same comparison between the two sessions' TRUTH maps on the pipeline's grids: the
    # ceiling that resampling 4 mm slices through the true transform leaves any estimator
    ceiling = []
    for lst in by_subject.values():
        for s2 in lst[1:]:
            s1 = lst[0]
            tw = twin_voxels(s1, s2, truth_paths(work, s1.label), truth_paths(work, s2.label),
                             masks[s1.label])
            ceiling.append({"subject": s1.subject, "sessions": [s1.session, s2.session],
                            "clusters": [s1.cluster, s2.cluster], **tw})
    methods.update(baselines([{"subject": s.subject, "session": s.session, "label": s.label,
                               "cluster": s.cluster, "global_factor": factors[s.subject],
                               "true": truth_means[s.label]} for s in sessions]))
    clock.done("metrics", t)

    # the method a user gets by default (scaling and estimator defaults of the package)
    default = next(m for m, (_, sc, est) in METHOD_SPEC.items()
                   if (sc, est) == (DEFAULT_METHOD, DEFAULT_ESTIMATOR))
    settings = {
        "phantom_seed": a.phantom_seed, "subjects": a.subjects, "sessions": a.sessions,
        "clusters": a.clusters, "tissue_range": a.tissue_range,
        "global_shift": a.global_shift, "gain_model": a.gain_model,
        "gain_jitter": a.gain_jitter, "mismatch": a.mismatch, "segmentation": a.segmentation,
        "cluster_scales": a.cluster_scales, "calibration_session": a.calibration_session,
        "distill": a.distill, "model_error": a.model_error,
        "model_error_cluster": a.model_error_cluster,
        "methods": list(a.methods), "seeds": list(a.seeds), "quick": a.quick, "epochs": epochs,
        "trained": trained, "width": WIDTH, "threads": THREADS, "default_method": default,
        "tissue_table": "independent", "pseudonym_salt": SALT,
        "grid": {"inplane_mm": INPLANE_MM, "matrix": MATRIX, "erode_mm": ERODE_MM,
                 "resampling": "truth maps linear, dseg and brain mask nearest, identity "
                               "world transform"},
        "sessions_used": len(sessions),
        "timing_s": clock.total(),
    }
    report = {"settings": settings, "methods": methods, "twins_truth": ceiling}
    out_json = work / f"yardstick{mtag}.json"
    out_json.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    text = render_tables(report)
    (work / f"yardstick{mtag}.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    print(f"timing (s): {json.dumps(settings['timing_s'])}")
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Check the options (exit 2 on bad ones), then run."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Issue 24: outputs are created as the umask says (0644/0755 under 022, 0640/0750 under 027),
not 0600/0700 as ``mkstemp``/``mkdtemp`` make them. (The workflow run under umask 027 is in
test_workflow_hospital.py.)"""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest

from qmriflow.archive.discover import write_tables
from qmriflow.io import atomic_path, current_umask, make_temp_dir, save_nifti, write_json
from qmriflow.workflow.failures import record_failure, write_failures_tsv


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_main_writers_honour_the_umask(umask, tmp_path):
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    assert current_umask() == umask and current_umask() == umask  # read, not changed
    written = [
        write_json(tmp_path / "a" / "x.json", {"a": 1}),
        save_nifti(tmp_path / "a" / "m.nii.gz", np.zeros((2, 2, 2)), np.eye(4), {"b": 2}),
        tmp_path / "a" / "m.json",
        record_failure(tmp_path / "failures", "sub-x_ses-y", "convert", "reason"),
    ]
    write_failures_tsv(tmp_path / "failures", tmp_path / "out" / "failures.tsv")
    write_tables([{"subject": "x", "session": "y", "status": "ok"}], [],
                 tmp_path / "s.tsv", tmp_path / "r.tsv")
    written += [tmp_path / "out" / "failures.tsv", tmp_path / "s.tsv", tmp_path / "r.tsv"]
    # a writer that replaces the temporary file rather than writing into it
    src = tmp_path / "src.bin"
    src.write_bytes(b"1")
    with atomic_path(tmp_path / "copy.bin") as t:
        t.unlink()
        shutil.copyfile(src, t)
    written.append(tmp_path / "copy.bin")
    assert {str(p): oct(_mode(p)) for p in written} == {str(p): oct(want_file) for p in written}
    # a scratch folder that becomes an output by rename (converted session folders)
    d = make_temp_dir(".sub-x_ses-y.", tmp_path)
    assert _mode(d) == want_dir
    assert _mode(tmp_path / "a") == want_dir

"""A save that fails on a rank (here: a real full filesystem) fails every rank promptly, in one line
naming the rank and the cause; the previous complete checkpoint stays intact and resumes.

checkpoint.dir is a small tmpfs of its own (mounting needs root, as in CI); a filler file leaves it
less room than one checkpoint needs. Real processes: 2 gloo ranks under ZeRO-1, so both ranks write
optimizer partitions of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from tests.helpers import TINY, describe, launch

pytestmark = pytest.mark.slow

# collective_timeout_s is far above the test's own timeout: a rank left waiting at a barrier would
# make the launch time out (and the test fail) instead of ending in the collective timeout's line.
ARGS = TINY + ["checkpoint.every_steps=2", "tracking.enabled=false", "cluster.nproc_per_node=2", "parallel.dp=2",
               "parallel.zero_stage=1", "cluster.collective_timeout_s=900"]


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk, leave_bytes: int) -> None:
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    assert shutil.disk_usage(disk).free <= leave_bytes + 8192


def test_a_save_that_fails_on_a_full_disk_fails_every_rank_in_one_line(tmp_path, data_cache, small_disk):
    ck = small_disk / "ck"
    common = ARGS + [f"run.root={tmp_path}/runs", f"data.cache_dir={data_cache}", f"checkpoint.dir={ck}"]
    first = launch(common + ["trainer.max_steps=2"], cwd=tmp_path, timeout=300)
    assert first.returncode == 0, describe(first)
    one_checkpoint = sum(p.stat().st_size for p in (ck / "step_00000002").iterdir())

    _fill(small_disk, one_checkpoint // 2)  # room for half of the next checkpoint
    failed = launch(common + ["trainer.max_steps=4"], cwd=tmp_path, timeout=300)
    assert failed.returncode == 1, describe(failed)
    # The ranks' one line (rank 0 prints it for all); the launcher's summary follows it.
    errors = [ln.split(": ", 1)[1] for ln in failed.stderr.splitlines() if ln.startswith("[rank") and ": error: " in ln]
    assert len(errors) == 1, describe(failed)
    line = errors[0]
    print(line)
    assert f"checkpoint.dir={ck}: saving step_00000004 failed on rank " in line, line
    assert "the last complete checkpoint step_00000002 is intact" in line, line
    assert "No space left on device" in line or "the disk is full" in line, line
    assert "Traceback" not in failed.stderr, describe(failed)
    # Nothing of the failed save remains; the earlier checkpoint is untouched.
    assert sorted(p.name for p in ck.iterdir() if p.name != ".staging") == ["step_00000002"]
    staged = [p for p in (ck / ".staging").rglob("*") if p.is_file()] if (ck / ".staging").exists() else []
    assert staged == [], staged

    os.remove(small_disk / "filler")  # the user frees space and runs the same command again
    again = launch(common + ["trainer.max_steps=4"], cwd=tmp_path, timeout=300)
    assert again.returncode == 0, describe(again)
    assert "step_00000002" in again.stdout and "saved checkpoint step_00000004" in again.stdout, describe(again)

"""Two faults of long runs, end to end with `python launch.py` (issue #16):

- rolling back with checkpoint.load_step=N and training on: the abandoned branch's later
  checkpoints are moved aside, the new branch's saves really write, and the next resume-latest
  continues the new branch;
- extending a finished run (a larger trainer.max_steps, optim.decay_steps unset): the LR schedule
  continues with the checkpoint's decay horizon, so the extended run equals, bitwise, a run that
  had that horizon from the start (CPU, fp32: deterministic, nothing to tolerate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY, describe, launch, read_metrics

pytestmark = pytest.mark.slow

COMMON = TINY + ["trainer.log_every=1", "trainer.eval_every=0", "tracking.enabled=false", "checkpoint.keep_last=0",
                 "optim.warmup_steps=2"]


def _args(tmp_path: Path, data_cache: Path, extra=()) -> list[str]:
    return COMMON + list(extra) + [f"run.root={tmp_path}/runs", f"data.cache_dir={data_cache}"]


def _manifest(checkpoints: Path, step: int) -> dict:
    return json.loads((checkpoints / f"step_{step:08d}" / "manifest.json").read_text())


def test_rollback_moves_the_abandoned_branch_aside_and_saves_for_real(tmp_path, data_cache):
    run_dir = tmp_path / "runs" / "default"
    checkpoints = run_dir / "checkpoints"
    first = launch(_args(tmp_path, data_cache, ["trainer.max_steps=12", "checkpoint.every_steps=3",
                                                "optim.decay_steps=12"]), cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    old_times = {s: _manifest(checkpoints, s)["time"] for s in (9, 12)}
    first_losses = {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}

    second = launch(_args(tmp_path, data_cache, ["trainer.max_steps=12", "checkpoint.every_steps=3",
                                                 "checkpoint.load_step=6", "optim.decay_steps=40"]), cwd=tmp_path)
    assert second.returncode == 0, describe(second)
    assert "resumed from step_00000006" in second.stdout
    moved = [ln for ln in second.stdout.splitlines() if "abandoned branch" in ln]
    assert len(moved) == 1 and "step_00000009, step_00000012" in moved[0], second.stdout
    # The saves of steps 9 and 12 wrote the new branch (its config), and the log says so truly.
    for step in (9, 12):
        assert f"saved checkpoint step_{step:08d}" in second.stdout
        assert _manifest(checkpoints, step)["config"]["optim"]["decay_steps"] == 40
    abandoned = list((checkpoints / "abandoned").iterdir())
    assert len(abandoned) == 1 and abandoned[0].name.endswith("-after-step_00000006"), abandoned
    for step in (9, 12):  # the old branch, intact and loadable, beside the run
        assert _manifest(abandoned[0], step)["time"] == old_times[step]
        assert _manifest(abandoned[0], step)["config"]["optim"]["decay_steps"] == 12
    # Step 7's loss comes from step 6's weights: the same on both branches.
    second_losses = {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}
    assert second_losses[7] == first_losses[7]

    third = launch(_args(tmp_path, data_cache, ["trainer.max_steps=13", "checkpoint.every_steps=3",
                                                "optim.decay_steps=40"]), cwd=tmp_path)
    assert third.returncode == 0, describe(third)
    assert "resumed from step_00000012" in third.stdout and "abandoned" not in third.stdout, third.stdout
    assert _manifest(checkpoints, 13)["config"]["optim"]["decay_steps"] == 40


def test_extending_a_run_keeps_the_schedule_continuous(tmp_path, data_cache):
    """8 steps with warmup 2 and decay_steps unset decay over 6 steps; extended to 12 the schedule
    stays at its end (flat at min_lr_ratio x lr) and the losses equal a 12-step run with
    optim.decay_steps=6 from the start."""
    reference_root = tmp_path / "reference"
    reference = launch(COMMON + ["trainer.max_steps=12", "optim.decay_steps=6", f"run.root={reference_root}",
                                 f"data.cache_dir={data_cache}"], cwd=tmp_path)
    assert reference.returncode == 0, describe(reference)
    expected = {m["step"]: (m["loss"], m["lr"]) for m in read_metrics(reference_root / "default") if "loss" in m}

    first = launch(_args(tmp_path, data_cache, ["trainer.max_steps=8"]), cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    extended = launch(_args(tmp_path, data_cache, ["trainer.max_steps=12"]), cwd=tmp_path)
    assert extended.returncode == 0, describe(extended)
    lines = [ln for ln in extended.stdout.splitlines() if ln.startswith("extending run: LR schedule continues")]
    assert len(lines) == 1 and "decay horizon (6 steps after 2 warmup" in lines[0], extended.stdout
    got = {m["step"]: (m["loss"], m["lr"]) for m in read_metrics(tmp_path / "runs" / "default") if "loss" in m}
    assert got == expected
    lrs = [got[s][1] for s in range(8, 13)]
    assert lrs == sorted(lrs, reverse=True), f"the LR must not rise at the resume step: {lrs}"

    # An explicit horizon on resume is a choice, said in one line.
    again = launch(_args(tmp_path, data_cache, ["trainer.max_steps=14", "optim.decay_steps=20"]), cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    assert "LR schedule: optim.decay_steps=20 replaces the checkpoint's decay horizon of 6 steps" in again.stdout

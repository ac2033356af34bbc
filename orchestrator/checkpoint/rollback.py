"""Rolling back: a run that starts from a step older than the newest checkpoint trains a new branch."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Optional

from orchestrator.checkpoint.manager import MANIFEST, _barrier, _broadcast, _rank, step_of, tag_for_step
from orchestrator.storage import Storage

if TYPE_CHECKING:
    from orchestrator.checkpoint.manager import CheckpointManager



ABANDONED = "abandoned"


def abandon_checkpoints_after(manager: "CheckpointManager", step: int) -> Optional[str]:
    """Move every complete checkpoint newer than `step` (the step this run starts from) to
    `abandoned/<time>-after-step_N/` in the checkpoint directory, so that a run that rolled back
    (checkpoint.load_step, a damaged newest checkpoint, checkpoint.resume=false) trains a new
    branch: its saves write their own step directories, and the old branch's later checkpoints
    never win a later "resume latest". Nothing is deleted. Collective; returns rank 0's one-line
    report (None when nothing was newer). Local moves are renames; remote ones copy and delete."""
    message = None
    if _rank() == 0:
        newer = [name for name in manager.storage.list_dirs()
                 if (step_of(name) or 0) > step and manager.storage.exists(f"{name}/{MANIFEST}")]
        if newer:
            target = f"{ABANDONED}/{time.strftime('%Y%m%dT%H%M%S')}-after-{tag_for_step(step)}"
            for name in sorted(newer, key=step_of, reverse=True):  # newest first
                _move_tree(manager.storage, name, f"{target}/{name}")
            message = (f"checkpoint: starting from step {step}, older than the newest checkpoint: moved "
                       f"{', '.join(sorted(newer))} of the abandoned branch to {manager.storage.display(target)} "
                       f"(delete it when no longer needed)")
    _barrier()
    return _broadcast(message)


def _move_tree(storage: Storage, rel: str, new_rel: str) -> None:
    if storage.local:
        os.makedirs(os.path.dirname(storage.path(new_rel)), exist_ok=True)
        os.replace(storage.path(rel), storage.path(new_rel))
    else:
        storage.fs.mv(storage.path(rel), storage.path(new_rel), recursive=True)
        storage.fs.invalidate_cache()

"""Checkpoints: crash-safe saves to any fsspec URL (manager.py), their layout-free part with global
coordinates (portable.py), resuming under another layout (reshard.py), rolling back (rollback.py),
warm start and consolidated reads (warm_start.py), export (export.py).
The trainer only calls CheckpointManager.save / load and warm_start.init_from."""

from orchestrator.checkpoint.manager import *  # noqa: F401,F403
from orchestrator.checkpoint.manager import (MANIFEST, CheckpointManager, CheckpointSaveError, Loaded, UnsafeCheckpointError,  # noqa: F401
                                             config_differences, rank_file, rng_state, safe_load, set_rng_state,
                                             sha256_file, step_of, tag_for_step, test_kill_point)
from orchestrator.checkpoint.rollback import abandon_checkpoints_after  # noqa: F401

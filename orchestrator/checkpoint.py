"""Basic checkpoints through DeepSpeed's own save/load (model, optimizer and ZeRO partitions,
LR scheduler) plus our trainer state as DeepSpeed's client state.

A checkpoint is `<dir>/step_XXXXXXXX/`; DeepSpeed writes `<dir>/latest` only after every file
of a save is written, so a run killed mid-save resumes from the previous tag.
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch

LATEST_FILE = "latest"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    return tag if tag and os.path.isdir(os.path.join(ckpt_dir, tag)) else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, ckpt_dir: str, step: int, client_state: dict[str, Any]) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for_step(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={**client_state, "rng": rng_state()})
    return tag


def load(engine, ckpt_dir: str) -> Optional[dict[str, Any]]:
    """Collective: load the latest checkpoint if there is one; returns its client state."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    set_rng_state(client_state["rng"])
    return client_state

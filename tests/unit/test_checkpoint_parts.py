"""The pieces of checkpointing that need no training run: URL redaction, config comparison,
RNG state in weights-only form, listing only committed checkpoints, refusing pickled code."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from orchestrator.checkpoint import (MANIFEST, CheckpointManager, config_differences, rng_state, safe_load,
                                     set_rng_state, step_of, tag_for_step)
from orchestrator.config import CheckpointConfig
from orchestrator.storage import Storage, redact


def test_redact_hides_userinfo_only():
    assert redact("s3://AKIA:secret@bucket/x") == "s3://***@bucket/x"
    assert redact("http://user:pw@host:5000/path") == "http://***@host:5000/path"
    assert redact("s3://bucket/x") == "s3://bucket/x"
    assert redact("/local/path@2") == "/local/path@2"


def test_config_differences_allow_schedule_length_and_intervals():
    saved = {"trainer": {"max_steps": 10, "log_every": 1, "seed": 1}, "optim": {"lr": 1e-3, "decay_steps": None},
             "model": {"d_model": 64}, "checkpoint": {"dir": "/a"}, "run": {"dir": "/r"}}
    current = {"trainer": {"max_steps": 99, "log_every": 5, "seed": 1}, "optim": {"lr": 1e-3, "decay_steps": 50},
               "model": {"d_model": 64}, "checkpoint": {"dir": "/b"}, "run": {"dir": "/s"}}
    assert config_differences(saved, current) == []
    current["model"]["d_model"] = 128
    current["trainer"]["seed"] = 2
    assert config_differences(saved, current) == ["model.d_model (64 -> 128)", "trainer.seed (1 -> 2)"]


def test_config_differences_ignore_an_unused_pkm_block_and_isoflop_metadata():
    # A checkpoint written before model.pkm and isoflop existed resumes under today's config.
    saved = {"model": {"ffn": "peer", "d_model": 64}}
    current = {"model": {"ffn": "peer", "d_model": 64, "pkm": {"num_values": 16384}}, "isoflop": None}
    assert config_differences(saved, current) == []
    saved["model"]["ffn"] = current["model"]["ffn"] = "pkm"
    assert config_differences(saved, current) == ["model.pkm.num_values (<absent> -> 16384)"]


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save({"rng": state}, tmp_path / "r.pt")
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(safe_load(str(tmp_path / "r.pt"))["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/peerlab-exploit-ran",))


def test_safe_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Exploit()}, path)
    with pytest.raises(pickle.UnpicklingError):
        safe_load(str(path))
    assert not os.path.exists("/tmp/peerlab-exploit-ran")


def test_only_committed_checkpoints_are_listed(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), every_steps=1, resume=True, load_step=None, keep_last=0,
                           staging_dir=None, init_from=None, init_optimizer=False, init_strict=True,
                           export_max_shard_gb=2.0)
    storage = Storage(str(tmp_path))
    for step in (2, 4, 6):
        os.makedirs(tmp_path / tag_for_step(step))
    storage.write_bytes_atomic(f"{tag_for_step(2)}/{MANIFEST}", json.dumps({"step": 2}).encode())
    storage.write_bytes_atomic(f"{tag_for_step(4)}/{MANIFEST}", json.dumps({"step": 4}).encode())
    (tmp_path / tag_for_step(6) / f"{MANIFEST}.tmp-123").write_text("{")  # a commit that never finished
    (tmp_path / ".staging").mkdir()
    infos = CheckpointManager(cfg).complete_checkpoints()
    assert [i.step for i in infos] == [2, 4]
    assert step_of("step_00000042") == 42 and step_of(".staging") is None


def test_file_url_and_plain_path_are_the_same_place(tmp_path):
    a, b = Storage(str(tmp_path)), Storage(f"file://{tmp_path}")
    a.write_bytes_atomic("x/y.bin", b"123")
    assert b.read_bytes("x/y.bin") == b"123" and b.list_dirs() == ["x"]

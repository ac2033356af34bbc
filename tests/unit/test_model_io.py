"""orchestrator/model_io.py without a training run: exports written here, BatchNorm pooling.
(Checkpoints of real runs: tests/e2e/test_evaluate_generate.py.)"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model.lm import build_model
from orchestrator.checkpoint.portable import pool_batchnorm_statistics
from orchestrator.errors import ConfigError
from orchestrator.model_io import ModelState, build_loaded_model, read_model_state
from tests.e2e.test_evaluate_generate import write_test_export
from tests.unit.test_model_lm import tiny_config


def _state() -> ModelState:
    cfg = tiny_config("peer", sparse_layers=[1])
    torch.manual_seed(3)
    model = build_model(cfg)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    bn.running_mean.normal_()
    return ModelState(config={"model": dataclasses.asdict(cfg)}, state_dict=model.state_dict(), step=7,
                      source="test", kind="checkpoint")


def test_export_round_trip_gives_the_same_model(tmp_path):
    state = _state()
    write_test_export(state, tmp_path / "e", num_shards=3)
    read = read_model_state(str(tmp_path / "e"))
    assert read.kind == "export" and read.step == 7
    assert read.state_dict.keys() == state.state_dict.keys()
    assert all(torch.equal(read.state_dict[k], v) for k, v in state.state_dict.items())
    model = build_loaded_model(read)
    assert not model.training
    tokens = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(model(tokens).logits, build_loaded_model(state)(tokens).logits, rtol=0, atol=0)


def test_damaged_exports_are_refused(tmp_path):
    state = _state()
    write_test_export(state, tmp_path / "e")
    index = tmp_path / "e" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["metadata"]["total_size"] += 4
    index.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="the index says"):
        read_model_state(str(tmp_path / "e"))
    (tmp_path / "e" / "model-00002-of-00002.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(ConfigError, match="00002-of-00002.safetensors is damaged"):
        read_model_state(str(tmp_path / "e"))
    (tmp_path / "e" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="is missing"):
        read_model_state(str(tmp_path / "e"))
    header = tmp_path / "e" / "config.json"
    header.write_text(json.dumps({**json.loads(header.read_text()), "version": 99}))
    with pytest.raises(ConfigError, match="version 1 header"):
        read_model_state(str(tmp_path / "e"))


def test_tensors_that_do_not_fit_the_config_are_refused():
    state = _state()
    state.state_dict.pop("embed.weight")
    with pytest.raises(ConfigError, match="1 missing, 0 unexpected; missing embed.weight"):
        build_loaded_model(state)


def test_batchnorm_statistics_pool_over_ranks():
    """Two ranks whose batches had means 0 and 2 and variance 1 each: their union has mean 1 and
    variance 1 + 1 = 2; num_batches_tracked is rank 0's; a single rank is returned as it is."""
    name = "blocks.1.ffn.query_norm."
    ranks = [{name + "running_mean": torch.full((3,), m), name + "running_var": torch.ones(3),
              name + "num_batches_tracked": torch.tensor(5)} for m in (0.0, 2.0)]
    pooled = pool_batchnorm_statistics(ranks)
    torch.testing.assert_close(pooled[name + "running_mean"], torch.ones(3))
    torch.testing.assert_close(pooled[name + "running_var"], torch.full((3,), 2.0))
    assert int(pooled[name + "num_batches_tracked"]) == 5
    single = pool_batchnorm_statistics(ranks[1:])
    assert all(torch.equal(single[k], v) for k, v in ranks[1].items())
    assert pool_batchnorm_statistics([{}]) == {}

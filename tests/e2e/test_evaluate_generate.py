"""`python -m orchestrator.evaluate` and `python -m orchestrator.generate` on checkpoints of real
tiny training runs (`python launch.py`), and on exports of them.

Tolerances. Evaluate reproduces the run's logged val_loss to 1e-6 (relative): the same weights,
BatchNorm statistics, windows and fp32 CPU arithmetic; the trainer averages the batch means of
F.cross_entropy while evaluate sums per-token losses and divides once, so only the summation
order differs. An export holds the checkpoint's tensors bit for bit, so its evaluation is equal (==).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.errors import ConfigError
from orchestrator.evaluate import evaluate_checkpoint
from orchestrator.evaluate import main as evaluate_main
from orchestrator.generate import main as generate_main
from orchestrator.model_io import build_loaded_model, read_model_state
from tests.helpers import ROOT, TINY, describe, launch, read_metrics

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = TINY + [f"trainer.max_steps={STEPS}", "trainer.eval_every=3", "checkpoint.every_steps=3",
                 "trainer.log_every=3", "checkpoint.keep_last=0", "model.max_seq_len=96"]
# A second named source evaluated during training: one stdlib package (its own val split).
JSON_SOURCE = os.path.join(os.path.dirname(json.__file__), "*.py")


def write_test_export(state, out: Path, num_shards: int = 2) -> None:
    """Test-only exporter of the fixed export format (orchestrator/model_io.py docstring)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    names = sorted(state.state_dict)
    shards = [names[i::num_shards] for i in range(num_shards)]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        tensors = {n: state.state_dict[n].contiguous() for n in shard}
        save_file(tensors, str(out / file))
        weight_map.update({n: file for n in shard})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "config.json").write_text(json.dumps({"format": "peer-lab-export", "version": 1, "step": state.step,
                                                 "source": state.source, "config": state.config}))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """A PEER run (MLflow on, trainer.eval_sources set) and a MoE run, each 6 steps."""
    out = {}
    for name, extra in {"peer": [f"trainer.eval_sources={{json: '{JSON_SOURCE}'}}"],
                        "moe": ["model=moe", "tracking.enabled=false"]}.items():
        root = tmp_path_factory.mktemp(f"run_{name}")
        proc = launch(COMMON + extra + [f"run.root={root}", f"data.cache_dir={data_cache}"], cwd=root)
        assert proc.returncode == 0, describe(proc)
        out[name] = root / "default"
    return out


def _logged(run_dir: Path, key: str, step: int = STEPS) -> float:
    return next(m[key] for m in read_metrics(run_dir) if m["step"] == step and key in m)


def test_evaluate_reproduces_the_logged_val_loss_and_links_mlflow(runs, tmp_path, data_cache, capsys):
    run = runs["peer"]
    out = tmp_path / "eval.json"
    code = evaluate_main([str(run), f"eval.sources={{val: stdlib, json: '{JSON_SOURCE}'}}", f"eval.output={out}",
                          f"data.cache_dir={data_cache}"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    record = json.loads(out.read_text())
    val, js = record["results"]["val"], record["results"]["json"]
    assert record["checkpoint"]["step"] == STEPS
    assert val["loss"] == pytest.approx(_logged(run, "val_loss"), rel=1e-6)
    assert val["layers"][0]["usage"] == pytest.approx(_logged(run, "expert_usage"), rel=1e-9)
    # trainer.eval_sources: the trainer logged the same named source with the same code and windows.
    assert js["loss"] == pytest.approx(_logged(run, "val_json_loss"), rel=1e-6)
    assert js["bits_per_byte"] == pytest.approx(_logged(run, "val_json_bits_per_byte"), rel=1e-6)
    assert _logged(run, "val_json_loss", step=3) != _logged(run, "val_json_loss")  # evaluated at every eval
    assert val["num_windows"] == 2 * 4 and val["windows"]["window_tokens"] == 65  # eval_batches x micro batch
    assert "val " in printed and "json " in printed and "windows of 65 tokens" in printed

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=record["tracking"]["uri"])
    train_id = record["checkpoint"]["train_run_id"]
    assert train_id and client.get_run(train_id).info.run_name == "default"
    linked = client.search_runs([client.get_experiment_by_name("peer-lab").experiment_id],
                                filter_string=f"tags.`peer_lab.train_run_id` = '{train_id}'")
    assert len(linked) == 1
    assert linked[0].data.metrics["val_loss"] == pytest.approx(val["loss"])


def test_export_evaluates_like_its_checkpoint(runs, tmp_path, data_cache):
    state = read_model_state(str(runs["peer"]))
    export = tmp_path / "export"
    write_test_export(state, export)
    overrides = {"tracking.enabled": False, "data.cache_dir": str(data_cache), "eval.batches": 1}
    _, from_checkpoint = evaluate_checkpoint(str(runs["peer"] / "checkpoints"), overrides)
    record, from_export = evaluate_checkpoint("file://" + str(export), overrides)
    assert record["checkpoint"]["kind"] == "export"
    assert {n: (r.loss, r.layers) for n, r in from_export.items()} == \
           {n: (r.loss, r.layers) for n, r in from_checkpoint.items()}


def test_moe_checkpoint_experts_evaluate_and_generate(runs, data_cache, capsys):
    run = runs["moe"]
    state = read_model_state(str(run))
    assert any(".deepspeed_experts.3." in n for n in state.state_dict), "expert files merged"
    _, results = evaluate_checkpoint(str(run), {"data.cache_dir": str(data_cache)})
    assert results["val"].loss == pytest.approx(_logged(run, "val_loss"), rel=1e-6)
    # A 6-step model's greedy text ends at once; a seeded sample is long enough to compare (the
    # same generator draws from the same probabilities; the exact greedy test is in tests/unit).
    outputs = []
    capsys.readouterr()
    for extra in ([], ["--no-cache"]):
        assert generate_main([str(run), "--prompt", "def ", "--max-new-tokens", "40", "--seed", "1", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("def ") and len(outputs[0]) > 15, outputs


def test_generate_streams_a_seeded_sample(runs, capsys):
    args = [str(runs["peer"]), "--prompt", "import ", "--max-new-tokens", "20", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.95", "--seed", "3", "--num-samples", "2"]
    assert generate_main(args) == 0
    first = capsys.readouterr()
    assert generate_main(args) == 0
    second = capsys.readouterr()
    assert first.out == second.out and first.out.count("import ") >= 2
    assert "sample 2/2" in first.err and "new tokens; stopped by" in first.err


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_are_one_line_and_exit_2(runs, tmp_path, capsys, data_cache):
    run = runs["peer"]
    step_dir = run / "checkpoints" / f"step_{STEPS:08d}"
    assert generate_main([str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "no such file" in _one_error_line(capsys)
    # A damaged tensor file (same size, one byte of the tensors changed): the chunk's checksum catches it.
    damaged = tmp_path / "damaged"
    shutil.copytree(step_dir, damaged)
    model_file = damaged / "state_rank_00000.safetensors"
    tensors = json.loads((damaged / "manifest.json").read_text())["portable"]["tensors"]
    chunk = next(c for key, e in tensors.items() if key.startswith("model/") for c in e["chunks"] if c["end"] > c["begin"])
    data = bytearray(model_file.read_bytes())
    data[(chunk["begin"] + chunk["end"]) // 2] ^= 0xFF  # a byte of a model weight, not of an optimizer moment
    model_file.write_bytes(bytes(data))
    assert evaluate_main([str(damaged), "tracking.enabled=false"]) == 2
    assert "differ from their SHA-256" in _one_error_line(capsys)
    # An interrupted save: step folders without a manifest.
    interrupted = tmp_path / "interrupted" / "checkpoints" / "step_00000009"
    interrupted.mkdir(parents=True)
    assert evaluate_main([str(tmp_path / "interrupted")]) == 2
    assert "no complete checkpoint" in _one_error_line(capsys)
    assert evaluate_main([str(run), "eval.sources={docs: /no/such/dir}", "tracking.enabled=false"]) == 2
    assert _one_error_line(capsys).startswith("error: eval.sources.docs='/no/such/dir'")
    assert evaluate_main([str(run), "eval.nonsense=1"]) == 2
    assert "unknown key" in _one_error_line(capsys)
    assert generate_main([str(run), "--prompt", "x", "--max-new-tokens", "95"]) == 2
    assert "exceed the model's context of 96 tokens" in _one_error_line(capsys)
    assert generate_main([str(run), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p=0.0" in _one_error_line(capsys)
    # Invalid UTF-8 on the command line reaches Python as lone surrogates: refused, one line, exit 2.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable.encode(), b"-m", b"orchestrator.generate", str(run).encode(),
                           b"--prompt", b"caf\xff"], capture_output=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot be encoded" in lines[0] and proc.stdout == b""
    assert not list(tmp_path.glob("eval_step*.json")), "nothing written on a refusal"


def test_two_data_parallel_ranks_eval_sources_and_pooled_batchnorm(tmp_path, data_cache):
    """dp = 2: the trainer's eval_sources sum over both ranks' windows (equal to what one process
    computes with the same statistics); evaluate uses the ranks' pooled BatchNorm statistics, not
    each rank's own, so it is close to the logged val loss but not equal (3e-3 relative: tiny model,
    4 steps, statistics of 4 batches per rank)."""
    proc = launch(COMMON + ["trainer.max_steps=4", "cluster.nproc_per_node=2", "parallel.dp=2",
                            "tracking.enabled=false", f"trainer.eval_sources={{json: '{JSON_SOURCE}'}}",
                            f"run.root={tmp_path}", f"data.cache_dir={data_cache}"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    run = tmp_path / "default"
    state = read_model_state(str(run))
    rank_files = sorted((run / "checkpoints" / "step_00000004").glob("rank_*.pt"))
    assert len(rank_files) == 2
    _, results = evaluate_checkpoint(str(run), {"data.cache_dir": str(data_cache),
                                                "eval.sources": {"val": "stdlib", "json": JSON_SOURCE}})
    assert results["val"].loss == pytest.approx(_logged(run, "val_loss", step=4), rel=3e-3)
    assert results["json"].loss == pytest.approx(_logged(run, "val_json_loss", step=4), rel=3e-3)
    assert results["json"].num_windows == 2 * 4  # both ranks' batches, as one process reads them
    name = next(n for n in state.state_dict if n.endswith("running_mean"))
    from orchestrator.checkpoint import safe_load

    own = [safe_load(str(f))["extra"]["buffers"][name] for f in rank_files]
    assert not torch.equal(own[0], own[1])
    torch.testing.assert_close(state.state_dict[name], (own[0] + own[1]) / 2)

"""Warm start (checkpoint.init_from) and export (python -m orchestrator.export), end to end.

The source is a dp2 x ep2 run (PEER tables split over two ranks) saved at step 2. A fine-tune in
one process on another corpus (this repository's model/ sources) starts from it:
- at step 0 with a fresh optimizer (its own checkpoint's AdamW step counts are its own steps),
- its first loss equals the source model's loss on the fine-tune's first batch, computed here
  in this process from `read_model_state` and `build_model` (same weights, same batch, train
  mode as the trainer's step; relative 1e-6: one process with one thread both times, the only
  difference the kernels' summation order in a different process, ~1e-7),
- requeued (the same command), it resumes its own checkpoint and says that init_from is ignored.
Export: the source step exported, and the same state resharded to one process (the test hook
PEERLAB_TEST_RESAVE_AFTER_RESHARD) exported, hold identical tensors; both are exactly the keys of
the single-process model's state_dict; a fine-tune from the export trains to the same losses (==)
as one from the checkpoint. Bad input: a shape mismatch is refused in one line naming the tensor
and both shapes (exit 2, nothing written); init_strict=false loads a dense model's tensors into
this PEER model and lists what was new and unused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.warm_start import read_full_state, read_model_state
from tests.helpers import ROOT, TINY, describe, launch, train_losses

pytestmark = pytest.mark.slow

COMMON = TINY + ["trainer.log_every=1", "trainer.eval_every=0", "tracking.enabled=false", "checkpoint.keep_last=0",
                 "optim.warmup_steps=1", "optim.decay_steps=4", "checkpoint.every_steps=2"]
SOURCE_LAYOUT = ["cluster.nproc_per_node=2", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=1"]
FINE_TUNE_DATA = [f"data.source={ROOT / 'model'}", "data.val_fraction=0.2", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_cache) -> Path:
    root = tmp_path_factory.mktemp("source")
    proc = launch(COMMON + SOURCE_LAYOUT + ["trainer.max_steps=2", f"run.root={root}", f"data.cache_dir={data_cache}"],
                  cwd=root)
    assert proc.returncode == 0, describe(proc)
    return root / "default" / "checkpoints"


def _fine_tune(tmp_path: Path, data_cache, init_from, steps=2, extra=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = COMMON + FINE_TUNE_DATA + [f"trainer.max_steps={steps}", f"run.root={tmp_path}",
                                      f"data.cache_dir={data_cache}", f"checkpoint.init_from={init_from}", *extra]
    return launch(args, cwd=tmp_path)


def _source_loss_on_first_batch(run_dir: Path, source_dir: str) -> float:
    from model.lm import build_model
    from orchestrator.config import load_config
    from orchestrator.data import TrainBatches, prepare_corpus
    from orchestrator.tokenizer import load_tokenizer

    cfg = load_config(json.loads((run_dir / "config.json").read_text()))
    corpus = prepare_corpus(cfg.data, load_tokenizer(cfg.data.tokenizer))
    t = cfg.trainer
    batches = TrainBatches(corpus.load("train"), cfg.data.seq_len, t.micro_batch_size, t.grad_accum_steps, 0, 1, t.seed)
    _, state, _ = read_model_state(source_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    model.train()  # the trainer's step: BatchNorm on batch statistics
    torch.set_num_threads(1)
    with torch.no_grad():
        losses = [float(model(x, y).loss) for x, y in batches.next_step()]
    return sum(losses) / len(losses)


def test_warm_start_fine_tunes_from_another_layout_and_requeues(source, tmp_path, data_cache):
    step_dir = source / "step_00000002"
    first = _fine_tune(tmp_path, data_cache, source)
    assert first.returncode == 0, describe(first)
    line = next(ln for ln in first.stdout.splitlines() if ln.startswith("warm start:"))
    assert "model weights from" in line and "(step 2, step)" in line and "training starts at step 0" in line, line
    assert "new" not in line and "unused" not in line, line
    run_dir = tmp_path / "default"
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2], losses
    expected = _source_loss_on_first_batch(run_dir, str(step_dir))
    assert abs(losses[1] - expected) / expected < 1e-6, (losses[1], expected)
    own, own_step = read_full_state(str(run_dir / "checkpoints"))
    assert own_step == 2 and all(float(v) == 2.0 for k, v in own.items() if k.startswith("step/")), \
        "a fresh optimizer: its step counts are the fine-tune's own two steps"

    again = _fine_tune(tmp_path, data_cache, source, steps=4)
    assert again.returncode == 0, describe(again)
    assert f"checkpoint.init_from={source} ignored: this run resumes its own checkpoint step_00000002" in again.stdout
    assert "resumed from step_00000002" in again.stdout and "warm start:" not in again.stdout
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]


def test_warm_start_refuses_a_shape_mismatch_and_loads_what_matches(source, tmp_path, data_cache):
    bad = _fine_tune(tmp_path / "bad", data_cache, source, extra=["model.d_ff=96"])
    assert bad.returncode == 2, describe(bad)
    err = bad.stderr.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint.init_from=") and "blocks.0.ffn.up.weight" in err, err
    assert "(128, 64)" in err and "(96, 64)" in err and "init_strict=false" in err, err
    assert not (tmp_path / "bad" / "default" / "checkpoints").exists() or \
        not list((tmp_path / "bad" / "default" / "checkpoints").glob("step_*"))

    dense = _fine_tune(tmp_path / "dense", data_cache, source, steps=1, extra=["model=dense", "checkpoint.init_strict=false"])
    assert dense.returncode == 0, describe(dense)
    line = next(ln for ln in dense.stdout.splitlines() if ln.startswith("warm start:"))
    new, unused = line.split("; new (kept as initialised): ")[1].split("; unused: ")
    assert new.split(", ") == ["model/blocks.1.ffn.down.weight", "model/blocks.1.ffn.up.weight"], line
    assert "model/blocks.1.ffn.expert_down.weight" in unused and "model/blocks.0" not in unused, line


def _export(src, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.export", str(src), str(out), "--max-shard-gb", "0.0003"],
                          capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                                         "OMP_NUM_THREADS": "1"})


def test_exports_of_two_layouts_are_identical_and_warm_start_from_export(source, tmp_path, data_cache):
    from model.lm import build_model
    from orchestrator.config import load_config

    step_dir = source / "step_00000002"
    # The same state resharded to one process and written back from there.
    resaved = tmp_path / "resaved"
    one = launch(COMMON + ["trainer.grad_accum_steps=2", "trainer.max_steps=2", f"run.root={tmp_path / 'one'}",
                           f"data.cache_dir={data_cache}", f"checkpoint.dir={source}"], cwd=tmp_path,
                 extra_env={"PEERLAB_TEST_RESAVE_AFTER_RESHARD": str(resaved)})
    assert one.returncode == 0 and "resharded step_00000002" in one.stdout, describe(one)
    outs = {}
    for name, src in (("dp2ep2", step_dir), ("one", resaved)):
        proc = _export(src, tmp_path / f"export_{name}")
        assert proc.returncode == 0, proc.stderr
        assert "peak memory" in proc.stdout
        outs[name] = tmp_path / f"export_{name}"
    meta = json.loads((outs["dp2ep2"] / "config.json").read_text())
    assert meta["format"] == "peer-lab-export" and meta["version"] == 1 and meta["step"] == 2
    index = json.loads((outs["dp2ep2"] / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors"), files
    _, a, _ = read_model_state(str(outs["dp2ep2"]))
    _, b, _ = read_model_state(str(outs["one"]))
    model_keys = set(build_model(load_config(meta["config"]).model).state_dict())
    assert set(a) == set(b) == model_keys
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Bad input: the output exists already.
    again = _export(step_dir, outs["one"])
    assert again.returncode == 2 and again.stderr.startswith("error: out=") and "already holds an export" in again.stderr

    from_export = _fine_tune(tmp_path / "ft_export", data_cache, outs["dp2ep2"])
    from_checkpoint = _fine_tune(tmp_path / "ft_ckpt", data_cache, step_dir)
    assert from_export.returncode == 0 and from_checkpoint.returncode == 0, describe(from_export)
    assert "(step 2, export)" in from_export.stdout
    assert train_losses(tmp_path / "ft_export" / "default") == train_losses(tmp_path / "ft_ckpt" / "default")

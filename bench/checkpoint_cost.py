"""Checkpoint cost: save and load time and size, for the default model and for one with a PEER layer
of 256^2 experts, through the same CheckpointManager the trainer uses (DeepSpeed engine, ZeRO 0,
fp32, one process, local disk).

    python bench/checkpoint_cost.py [--repeats 3] [--dir /tmp/ckpt-bench]

Prints one row per model: parameters, bytes on disk, save and load seconds (median of repeats),
and the throughput of each. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "default (peer 128^2, d=128)": [],
    "peer 256^2, d=128": ["model.peer.num_experts=65536"],
}


def build(overrides: list[str], ckpt_dir: str):
    from hydra import compose, initialize_config_dir

    import launch
    from model.lm import build_model
    from orchestrator.engine import build_engine

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = launch.to_train_config(compose(config_name="config", overrides=overrides + [
            f"checkpoint.dir={ckpt_dir}", "checkpoint.keep_last=0"]))
    import torch

    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine, _ = build_engine(model, cfg, bf16=False)
    # One real step so that the optimizer holds its moments (as in any checkpoint after step 1).
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.trainer.micro_batch_size, cfg.data.seq_len + 1))
    out = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(out.loss)
    engine.step()
    return cfg, engine, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/peerlab-ckpt-bench")
    args = parser.parse_args()

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    import deepspeed

    from orchestrator.checkpoint import CheckpointManager
    from orchestrator.config import to_dict

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rows = []
    for name, overrides in MODELS.items():
        shutil.rmtree(args.dir, ignore_errors=True)
        cfg, engine, num_params = build(overrides, args.dir)
        manager = CheckpointManager(cfg.checkpoint, log=lambda m: None)
        saves, loads = [], []
        for i in range(args.repeats):
            started = time.perf_counter()
            manager.save(engine, i + 1, {"train_state": {"step": i + 1}}, {"data": {}}, to_dict(cfg))
            saves.append(time.perf_counter() - started)
        size = sum(f.stat().st_size for f in Path(args.dir, f"step_{args.repeats:08d}").iterdir())
        for _ in range(args.repeats):
            started = time.perf_counter()
            loaded = manager.load(engine, to_dict(cfg))
            loads.append(time.perf_counter() - started)
            assert loaded is not None and loaded.info.step == args.repeats
        save_s, load_s = statistics.median(saves), statistics.median(loads)
        rows.append((name, num_params, size, save_s, load_s))
        del engine
    shutil.rmtree(args.dir, ignore_errors=True)
    print(f"{'model':30s} {'params':>10s} {'size MB':>9s} {'save s':>8s} {'MB/s':>7s} {'load s':>8s} {'MB/s':>7s}")
    for name, n, size, s, l in rows:
        mb = size / 1e6
        print(f"{name:30s} {n / 1e6:9.2f}M {mb:9.1f} {s:8.2f} {mb / s:7.0f} {l:8.2f} {mb / l:7.0f}")
    print("(save: DeepSpeed files + rank file + SHA-256 of each + commit; load: verify checksums + "
          "weights-only load; median of", args.repeats, "repeats)")


if __name__ == "__main__":
    main()

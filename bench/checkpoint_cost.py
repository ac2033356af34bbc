"""Checkpoint cost: save and load time and size, for the default model and for ones with a PEER
layer of 256^2 and 1024^2 experts, through the same CheckpointManager the trainer uses (DeepSpeed
engine, ZeRO 0, fp32, one process, local disk); then the tensor files' bytes, a reshard load (the
path any other layout takes), and an export with its peak memory.

    python bench/checkpoint_cost.py [--repeats 3] [--dir /tmp/ckpt-bench] [--models 0,1,2]

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
    # One PEER layer of 1024^2 experts: U and V hold 2 x 1M x d numbers (x3 with AdamW's moments).
    "peer 1024^2, d=64": ["model.peer.num_experts=1048576", "model.d_model=64"],
}


def build(overrides: list[str], ckpt_dir: str):
    import launch
    from model.lm import build_model
    from orchestrator.engine import build_engine

    cfg = launch.compose_train_config(overrides + [f"checkpoint.dir={ckpt_dir}", "checkpoint.keep_last=0"])
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


def _rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss, monotonic)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def portable_costs(manager, engine, cfg, step_dir: Path, export_dir: str, max_shard_gb: float) -> dict:
    """The layout-free part: its bytes, a reshard load (the portable path every other layout
    takes, here into the same one-process engine), and an export in a child process (its own peak
    memory)."""
    import subprocess

    from orchestrator.checkpoint.manager import layout_of
    from orchestrator.checkpoint.reshard import load_portable
    from orchestrator.config import to_dict

    portable_bytes = sum(f.stat().st_size for f in step_dir.glob("state_rank_*.safetensors"))
    info = next(i for i in manager.complete_checkpoints() if i.tag == step_dir.name)
    layout = layout_of(to_dict(cfg))
    started = time.perf_counter()
    loaded = load_portable(manager, engine.deepspeed_engine if hasattr(engine, "deepspeed_engine") else engine,
                          info, layout, layout)
    reshard_s = time.perf_counter() - started
    assert loaded is not None
    shutil.rmtree(export_dir, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.export", str(step_dir), export_dir,
                           "--max-shard-gb", str(max_shard_gb)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    export_s = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    peak = float(proc.stdout.rsplit("peak memory ", 1)[1].split()[0])
    export_bytes = sum(f.stat().st_size for f in Path(export_dir).iterdir())
    shutil.rmtree(export_dir, ignore_errors=True)
    return {"portable_bytes": portable_bytes, "reshard_s": reshard_s, "export_s": export_s,
            "export_peak_mb": peak, "export_bytes": export_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/peerlab-ckpt-bench")
    parser.add_argument("--models", default=",".join(str(i) for i in range(len(MODELS))),
                        help="comma-separated indices into MODELS (0 = default) to run")
    parser.add_argument("--max-shard-gb", type=float, default=0.5, help="export shard size")
    args = parser.parse_args()

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    import deepspeed

    from orchestrator.checkpoint import CheckpointManager
    from orchestrator.config import to_dict

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rows = []
    for index in args.models.split(","):
        name, overrides = list(MODELS.items())[int(index)]
        shutil.rmtree(args.dir, ignore_errors=True)
        cfg, engine, num_params = build(overrides, args.dir)
        rss_built = _rss_mb()
        manager = CheckpointManager(cfg.checkpoint, log=lambda m: None)
        saves, loads = [], []
        for i in range(args.repeats):
            started = time.perf_counter()
            manager.save(engine, i + 1, {"train_state": {"step": i + 1}}, {"data": {}}, to_dict(cfg))
            saves.append(time.perf_counter() - started)
        rss_saved = _rss_mb()
        step_dir = Path(args.dir, f"step_{args.repeats:08d}")
        size = sum(f.stat().st_size for f in step_dir.iterdir())
        for _ in range(args.repeats):
            started = time.perf_counter()
            loaded = manager.load(engine, to_dict(cfg))
            loads.append(time.perf_counter() - started)
            assert loaded is not None and loaded.info.step == args.repeats
        extra = portable_costs(manager, engine, cfg, step_dir, args.dir + "-export", args.max_shard_gb)
        rss_end = _rss_mb()
        save_s, load_s = statistics.median(saves), statistics.median(loads)
        rows.append((name, num_params, size, save_s, load_s, extra, (rss_built, rss_saved, rss_end)))
        del engine
    shutil.rmtree(args.dir, ignore_errors=True)
    print(f"{'model':30s} {'params':>10s} {'size MB':>9s} {'save s':>8s} {'MB/s':>7s} {'load s':>8s} {'MB/s':>7s}")
    for name, n, size, s, l, _, _ in rows:
        mb = size / 1e6
        print(f"{name:30s} {n / 1e6:9.2f}M {mb:9.1f} {s:8.2f} {mb / s:7.0f} {l:8.2f} {mb / l:7.0f}")
    print("(save: rank file + tensor file streamed + SHA-256 of each + commit; load (same layout): ranged reads "
          "of every chunk + per-chunk SHA-256 + copy into the engine + the rank file; median of", args.repeats, "repeats)")
    print(f"{'model':30s} {'portable MB':>11s} {'reshard s':>9s} {'export s':>8s} {'export MB':>9s} "
          f"{'export peak MB':>14s} {'RSS built/saved/end MB':>24s}")
    for name, _, _, _, _, x, rss in rows:
        print(f"{name:30s} {x['portable_bytes'] / 1e6:11.1f} {x['reshard_s']:9.2f} {x['export_s']:8.2f} "
              f"{x['export_bytes'] / 1e6:9.1f} {x['export_peak_mb']:14.0f} {'/'.join(f'{v:.0f}' for v in rss):>24s}")
    print("(reshard: the portable path another layout takes, ranged reads + per-chunk SHA-256 + copy into the "
          "engine, once; export: `python -m orchestrator.export` in a child process, wall time incl. its start, "
          "its own peak RSS; RSS: this process's peak after building, after the saves, at the end)")


if __name__ == "__main__":
    main()

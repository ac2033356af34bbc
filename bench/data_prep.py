"""Corpus preparation throughput and memory: orchestrator/data (1 and 2 workers) against
`datasets.load_dataset('json') + Dataset.map` with the same tokenizer, on generated JSON Lines.

    python bench/data_prep.py [--sizes-mb 100 1024] [--workers 1 2] [--dir /tmp/peerlab-data-bench]

Generates a JSON Lines corpus of each size under --dir (deleted at the end unless --keep), trains a
small byte-level BPE tokenizer (8192 tokens) on a sample, then runs every preparation in a fresh
child process and prints one row each: seconds, input MB/s, tokens/s, and peak RSS of the main
process and of its largest worker (getrusage). Every preparation writes its own cache, deleted
after its row. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be has had "
         "not but what all when we there can out other one so some them these would time could into two more "
         "experts layer retrieval product keys model training data token parameter gradient").split()
FILE_MB = 64  # generated file size: a 1 GB corpus is 16 files


def generate(folder: Path, size_mb: int, seed: int = 0) -> list[Path]:
    """Documents of 40-1200 random words (a pool of 4000 texts, each record made unique by a prefix)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 1200))) for _ in range(4000)]
    target, written, files, doc = size_mb << 20, 0, [], 0
    while written < target:
        path = folder / f"part-{len(files):05d}.jsonl"
        with open(path, "w") as f:
            file_bytes = 0
            while file_bytes < min(FILE_MB << 20, target - written):
                line = json.dumps({"id": doc, "text": f"record {doc}: {pool[doc % len(pool)]}"}) + "\n"
                f.write(line)
                file_bytes += len(line)
                doc += 1
        written += file_bytes
        files.append(path)
    return files


def train_tokenizer(files: list[Path], out: Path) -> Path:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    sample = []
    with open(files[0]) as f:
        for _, line in zip(range(2000), f):
            sample.append(json.loads(line)["text"])
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out))
    return out


# ----------------------------------------------------------------------------- children


def child_ours(corpus: str, tokenizer: str, workers: int, cache: str) -> dict:
    from orchestrator.config import DataConfig
    from orchestrator.data import prepare_corpus
    from orchestrator.tokenizer import load_tokenizer

    cfg = DataConfig(source=corpus, tokenizer=tokenizer, seq_len=128, val_fraction=0.01, cache_dir=cache,
                     text_field="text", num_workers=workers, mixture=[])
    started = time.perf_counter()
    corpus_ = prepare_corpus(cfg, load_tokenizer(tokenizer))
    seconds = time.perf_counter() - started
    m = corpus_.meta
    return {"seconds": seconds, "tokens": m["train"]["num_tokens"] + m["val"]["num_tokens"],
            "documents": m["train"]["num_documents"] + m["val"]["num_documents"]}


def child_datasets(corpus: str, tokenizer: str, workers: int, cache: str) -> dict:
    import datasets

    from orchestrator.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    files = sorted(str(p) for p in Path(corpus).glob("*.jsonl"))
    started = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
    loaded = time.perf_counter()
    tok = load_tokenizer(tokenizer)  # the very tokenizer object orchestrator/data uses
    encode_batch = getattr(tok, "encode_batch", None) or (lambda texts: [tok.encode(t) for t in texts])

    def tokenize(batch):
        return {"ids": [np.append(ids, tok.eos_id) for ids in encode_batch(batch["text"])]}

    out = ds.map(tokenize, batched=True, batch_size=1000, num_proc=workers if workers > 1 else None,
                 remove_columns=ds.column_names, desc=None)
    finished = time.perf_counter()
    tokens = sum(len(x) for batch in out.with_format("numpy").iter(batch_size=10000) for x in batch["ids"])
    return {"seconds": finished - started, "load_seconds": loaded - started, "tokens": tokens, "documents": len(out)}


def _child_main(kind: str, corpus: str, tokenizer: str, workers: int, cache: str) -> None:
    result = (child_ours if kind == "ours" else child_datasets)(corpus, tokenizer, workers, cache)
    result["rss_main_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_worker_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_child(kind: str, corpus: Path, tokenizer: Path, workers: int, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "true"}
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(corpus), str(tokenizer), str(workers),
                           str(cache)], env=env, capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{kind} x{workers} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, corpus, tokenizer, workers, cache = sys.argv[2:7]
        return _child_main(kind, corpus, tokenizer, int(workers), cache)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1024])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dir", default="/tmp/peerlab-data-bench")
    p.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bytes",
                   help="bytes: the built-in byte tokenizer; bpe: a byte-level BPE of 8192 tokens trained on the corpus")
    p.add_argument("--no-datasets", action="store_true", help="skip the datasets.map rows")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora")
    args = p.parse_args()
    root = Path(args.dir)
    try:
        print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        corpora = {}
        for size in args.sizes_mb:
            t0 = time.perf_counter()
            files = generate(root / f"corpus_{size}mb", size)
            corpora[size] = (root / f"corpus_{size}mb", sum(f.stat().st_size for f in files), len(files))
            print(f"generated {size} MB ({len(files)} files) in {time.perf_counter() - t0:.0f}s")
        tokenizer = "bytes" if args.tokenizer == "bytes" else \
            train_tokenizer(sorted(corpora[min(corpora)][0].glob("*.jsonl")), root / "tokenizer.json")
        print(f"tokenizer: {tokenizer}")
        header = (f"{'input':>8} {'pipeline':<28} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} {'tokens':>13} "
                  f"{'RSS main':>9} {'RSS worker':>10}")
        print(header + "\n" + "-" * len(header), flush=True)
        for size, (folder, nbytes, _) in corpora.items():
            kinds = [("ours", w) for w in args.workers] + ([] if args.no_datasets else [("datasets", w) for w in args.workers])
            for kind, w in kinds:
                r = run_child(kind, folder, tokenizer, w, root / f"cache_{kind}_{w}")
                name = f"orchestrator/data x{w}" if kind == "ours" else \
                    f"datasets.map num_proc={w}" + f" (load {r['load_seconds']:.0f}s)"
                print(f"{nbytes / 1e6:>6.0f}MB {name:<28} {r['seconds']:>8.1f} {nbytes / 1e6 / r['seconds']:>7.2f} "
                      f"{r['tokens'] / 1e6 / r['seconds']:>7.3f} {r['tokens']:>13,} {r['rss_main_mb']:>7.0f}MB "
                      f"{r['rss_worker_mb']:>8.0f}MB", flush=True)
        print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

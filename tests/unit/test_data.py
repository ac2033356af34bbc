"""Corpus preparation (sources, split, cache) and the train/val batch samplers."""

import json
import multiprocessing
import os
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from orchestrator.config import DataConfig, TrainerConfig
from orchestrator.data import TrainBatches, ValBatches, hash_fraction, list_source, make_batches, prepare_corpus
from orchestrator.errors import ConfigError
from orchestrator.tokenizer import ByteTokenizer, load_tokenizer

BYTES = ByteTokenizer()


def _cfg(source, cache_dir, val_fraction=0.3, seq_len=8, tokenizer="bytes", **more):
    fields = {"text_field": "text", "num_workers": 1, "mixture": [], **more}
    return DataConfig(source=str(source), tokenizer=tokenizer, seq_len=seq_len, val_fraction=val_fraction,
                      cache_dir=str(cache_dir), **fields)


def _write_docs(root, num_docs=12):
    """Documents whose text names them, so a split's tokens tell which documents it holds."""
    texts = {}
    for i in range(num_docs):
        rel = f"sub{i % 3}/doc{i:02d}.txt"
        texts[rel] = f"<<{rel}>> " + "lorem ipsum é " * (i + 1)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(texts[rel], encoding="utf-8")
    return texts


def _documents(corpus):
    lines = (corpus.dir / "files.jsonl").read_text().splitlines()
    return {d["path"]: d for d in map(json.loads, lines)}


def _text(corpus, split):
    return BYTES.decode(corpus.load(split))


def test_prepare_directory_splits_by_document(tmp_path):
    texts = _write_docs(tmp_path / "src")
    corpus = prepare_corpus(_cfg(tmp_path / "src", tmp_path / "cache"), BYTES)
    meta, docs = corpus.meta, _documents(corpus)
    assert not corpus.from_cache and meta["split_by"] == "document"
    assert set(docs) == set(texts) and meta["num_files"] == len(texts)
    train = {p for p, d in docs.items() if d["split"] == "train"}
    val = {p for p, d in docs.items() if d["split"] == "val"}
    assert train and val and not train & val and train | val == set(texts)
    assert val == {p for p in texts if hash_fraction(p) < 0.3} or meta["moved_document"]
    # The tokens of each split are exactly its documents, each followed by eos.
    for split, members in (("train", train), ("val", val)):
        tokens = np.asarray(corpus.load(split))
        assert tokens.dtype == np.uint16 and len(tokens) == meta[split]["num_tokens"]
        assert int((tokens == BYTES.eos_id).sum()) == len(members) == meta[split]["num_documents"]
        assert len(tokens) == sum(len(texts[p].encode()) + 1 for p in members)
        text = _text(corpus, split)
        assert all(f"<<{p}>>" in text for p in members)
        assert not any(f"<<{p}>>" in text for p in set(texts) - members)
    assert "train" in corpus.summary() and "\n" not in corpus.summary()


def test_split_and_tokens_are_deterministic(tmp_path):
    _write_docs(tmp_path / "src")
    a = prepare_corpus(_cfg(tmp_path / "src", tmp_path / "cache_a"), BYTES)
    b = prepare_corpus(_cfg(tmp_path / "src", tmp_path / "cache_b"), BYTES)
    assert a.dir.name == b.dir.name  # the key does not depend on where the cache lives
    assert not b.from_cache
    for split in ("train", "val"):
        assert a.load(split).tobytes() == b.load(split).tobytes()
    assert _documents(a) == _documents(b)


def test_single_file_is_split_by_position(tmp_path):
    path = tmp_path / "book.txt"
    text = "It was the best of times. " * 100
    path.write_text(text)
    corpus = prepare_corpus(_cfg(path, tmp_path / "cache", val_fraction=0.1), BYTES)
    meta = corpus.meta
    assert meta["split_by"] == "position" and meta["num_files"] == 1
    assert meta["train"]["num_tokens"] + meta["val"]["num_tokens"] == len(text) + 1
    assert meta["val"]["num_tokens"] == round(0.1 * (len(text) + 1))
    assert _text(corpus, "train") + _text(corpus, "val") == text  # the tail is val; eos decodes to nothing


def test_glob_and_file_url_sources(tmp_path):
    src = tmp_path / "src"
    texts = _write_docs(src, num_docs=6)
    (src / "notes.md").write_text("# markdown")
    (src / "top.txt").write_text("top level")
    (src / ".hidden").mkdir()
    (src / ".hidden" / "secret.txt").write_text("hidden")

    def rels(source):
        return [f.rel for f in list_source(source).files]

    assert rels(f"{src}/*.txt") == ["top.txt"]
    assert rels(f"{src}/**/*.txt") == sorted([*texts, "top.txt"])  # ** spans folders; hidden ones skipped
    assert rels(f"file://{src}/sub1/*") == ["doc01.txt", "doc04.txt"]
    assert rels(f"file://{src}") == sorted([*texts, "notes.md", "top.txt"])
    assert rels(str(src / ".hidden" / "secret.txt")) == ["secret.txt"]  # named directly: taken

    corpus = prepare_corpus(_cfg(f"file://{src}/**/*.txt", tmp_path / "cache"), BYTES)
    assert corpus.meta["train"]["num_documents"] + corpus.meta["val"]["num_documents"] == len(texts) + 1
    assert corpus.meta["location"] == f"file://{src}/**/*.txt"
    url_dir = prepare_corpus(_cfg(f"file://{src}", tmp_path / "cache"), BYTES)
    plain_dir = prepare_corpus(_cfg(src, tmp_path / "cache"), BYTES)
    assert plain_dir.dir == url_dir.dir and plain_dir.from_cache  # one location, however spelled


def test_non_local_fsspec_source(tmp_path):
    import fsspec

    fs, root = fsspec.filesystem("memory"), f"/{tmp_path.name}"  # in-process, like a bucket
    try:
        for i in range(5):
            fs.pipe(f"{root}/d{i}.txt", f"document {i}".encode())
        fs.pipe(f"{root}/deep/e.txt", b"deep")
        corpus = prepare_corpus(_cfg(f"memory://{root}", tmp_path / "cache"), BYTES)
        assert [d for d in _documents(corpus)] == [*(f"d{i}.txt" for i in range(5)), "deep/e.txt"]
        assert prepare_corpus(_cfg(f"memory://{root}", tmp_path / "cache"), BYTES).from_cache
        fs.pipe(f"{root}/d0.txt", b"rewritten")  # a new object: new stamp and size, new key
        assert not prepare_corpus(_cfg(f"memory://{root}", tmp_path / "cache"), BYTES).from_cache
    finally:
        fs.rm(root, recursive=True)


def test_binary_and_invalid_utf8_files(tmp_path):
    src = tmp_path / "src"
    _write_docs(src, num_docs=4)
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (src / "latin1.txt").write_bytes("café".encode("latin-1"))
    corpus = prepare_corpus(_cfg(src, tmp_path / "cache"), BYTES)
    docs = _documents(corpus)
    assert docs["image.png"]["split"] == "skipped"
    assert corpus.meta["num_skipped_binary"] == 1 and corpus.meta["num_decoded_with_replacement"] == 1
    assert docs["latin1.txt"]["num_tokens"] == len("caf\ufffd".encode()) + 1
    assert "binary" in corpus.summary()


def test_missing_or_empty_source_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "nope", tmp_path / "empty", f"{tmp_path}/*.txt", "nosuchproto://x"):
        with pytest.raises(ConfigError) as excinfo:
            prepare_corpus(_cfg(source, tmp_path / "cache"), BYTES)
        message = str(excinfo.value)
        assert message.startswith("data.source=") and "\n" not in message and "fix: " in message
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ConfigError, match="binary"):
        prepare_corpus(_cfg(tmp_path / "bin", tmp_path / "cache"), BYTES)


def test_cache_is_reused_and_follows_file_changes(tmp_path):
    src = tmp_path / "src"
    _write_docs(src)
    cfg = _cfg(src, tmp_path / "cache")
    first = prepare_corpus(cfg, BYTES)
    stamps = {name: os.stat(first.dir / name) for name in ("meta.json", "shards/000000.train.bin", "shards/000000.val.bin")}
    second = prepare_corpus(cfg, BYTES)
    assert second.from_cache and second.dir == first.dir and second.meta == first.meta
    for name, st in stamps.items():
        now = os.stat(first.dir / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    (src / "sub0" / "doc00.txt").write_text("changed, and longer than before")
    third = prepare_corpus(cfg, BYTES)
    assert not third.from_cache and third.dir != first.dir
    assert "changed, and longer" in _text(third, "train") + _text(third, "val")
    # Other val_fraction or tokenizer: other key.
    assert prepare_corpus(_cfg(src, tmp_path / "cache", val_fraction=0.5), BYTES).dir != third.dir
    # Only the (empty) lock files stay beside the caches: no partial or stale folder.
    assert all(p.name.endswith(".lock") and p.is_file() for p in (tmp_path / "cache").iterdir() if p.name.startswith("."))


def test_half_written_cache_is_never_read(tmp_path):
    src = tmp_path / "src"
    _write_docs(src)
    cfg = _cfg(src, tmp_path / "cache")
    good = prepare_corpus(cfg, BYTES)
    expected = {s: good.load(s).tobytes() for s in ("train", "val")}

    def rebuilt():
        again = prepare_corpus(cfg, BYTES)
        return not again.from_cache and {s: again.load(s).tobytes() for s in expected} == expected

    shard = good.dir / "shards" / "000000.train.bin"
    # The final folder without meta.json (not made by prepare_corpus) is rebuilt.
    (good.dir / "meta.json").rename(tmp_path / "meta.json")
    assert rebuilt()
    # A meta.json whose token files are truncated (a partial copy) is rebuilt too.
    with open(shard, "r+b") as f:
        f.truncate(10)
    assert rebuilt()
    # A partial folder of the same key with an unfinished shard (no record) and a damaged finished
    # one (its record says more tokens than the file holds) is not trusted: both are rebuilt.
    shutil.rmtree(good.dir)
    partial = good.dir.with_name(f".{good.dir.name}.partial")
    (partial / "shards").mkdir(parents=True)
    (partial / "shards" / "000000.train.bin.tmp").write_bytes(b"\x01\x00" * 3)
    assert rebuilt() and not partial.exists()
    assert prepare_corpus(cfg, BYTES).from_cache


def _prepare_in_child(args):
    source, cache = args
    corpus = prepare_corpus(_cfg(source, cache), BYTES)
    return str(corpus.dir), corpus.load("train").tobytes()


def test_concurrent_preparation_agrees(tmp_path):
    # Three processes ask for the stdlib corpus at once: one builds it under the key's lock, the
    # others wait and read it; any interleaving must agree.
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_prepare_in_child, [("stdlib", str(tmp_path / "cache"))] * 3)
    assert len(set(results)) == 1
    key = os.path.basename(results[0][0])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([key, f".{key}.lock"])


def test_both_splits_are_never_empty(tmp_path):
    src = tmp_path / "src"
    _write_docs(src, num_docs=3)
    low = prepare_corpus(_cfg(src, tmp_path / "cache", val_fraction=1e-9), BYTES)
    assert low.meta["val"]["num_documents"] == 1 and low.meta["moved_document"]
    high = prepare_corpus(_cfg(src, tmp_path / "cache", val_fraction=1 - 1e-9), BYTES)
    assert high.meta["train"]["num_documents"] == 1 and high.meta["moved_document"]


def test_stdlib_corpus_prepares(tmp_path):
    corpus = prepare_corpus(_cfg("stdlib", tmp_path / "cache", val_fraction=0.05), BYTES)
    meta, docs = corpus.meta, _documents(corpus)
    assert meta["num_files"] > 300 and meta["train"]["num_documents"] > meta["val"]["num_documents"] > 0
    assert all(p.endswith(".py") for p in docs)
    assert not any(part in {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
                   for p in docs for part in p.split("/")[:-1])
    assert "os.py" in docs and "json/decoder.py" in docs
    root = sysconfig.get_paths()["stdlib"]
    total = sum(os.path.getsize(os.path.join(root, p)) for p in docs)
    assert total < 50e6
    assert meta["train"]["num_tokens"] + meta["val"]["num_tokens"] == total + len(docs)


def test_prepare_with_a_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "lorem": 1, "ipsum": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(str(tmp_path / "tokenizer.json"))
    _write_docs(tmp_path / "src")
    corpus = prepare_corpus(_cfg(tmp_path / "src", tmp_path / "cache"), hf)
    assert corpus.meta["tokenizer"] == hf.name and corpus.meta["vocab_size"] == 4
    train = np.asarray(corpus.load("train"))
    assert int((train == 3).sum()) == corpus.meta["train"]["num_documents"] and train.max() == 3
    assert corpus.dir != prepare_corpus(_cfg(tmp_path / "src", tmp_path / "cache"), BYTES).dir


# ----------------------------------------------------------------------------- batches


def _ramp(n=5000):
    """Token i has value i (mod 2^16): a window's values reveal where it starts."""
    return np.arange(n, dtype=np.uint16)


def _step_tensors(batches):
    return [t for pair in batches.next_step() for t in pair]


def test_train_windows_are_shifted_and_in_range():
    tokens = _ramp()
    batches = TrainBatches(tokens, seq_len=16, micro_batch_size=3, grad_accum_steps=2, dp_rank=0, dp_size=1, seed=5)
    for _ in range(20):
        for inputs, targets in batches.next_step():
            assert inputs.shape == targets.shape == (3, 16) and inputs.dtype == targets.dtype == torch.long
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            assert torch.equal(targets, inputs + 1)  # consecutive tokens of the ramp
            assert int(inputs.min()) >= 0 and int(targets.max()) <= len(tokens) - 1
    assert batches.batches_consumed == 20 and batches.tokens_per_step == 3 * 2 * 16


def test_train_batches_are_deterministic_and_resume_exactly():
    make = lambda seed=1: TrainBatches(_ramp(), 8, 2, 3, dp_rank=1, dp_size=2, seed=seed)  # noqa: E731
    a, b = make(), make()
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(_step_tensors(a), _step_tensors(b)))
    assert not all(torch.equal(x, y) for x, y in zip(_step_tensors(make(1)), _step_tensors(make(2))))
    state = a.state_dict()
    assert state["batches_consumed"] == 3
    following = [_step_tensors(a) for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(state)
    for expected in following:
        assert all(torch.equal(x, y) for x, y in zip(expected, _step_tensors(resumed)))


def test_data_parallel_split_regroups_the_same_global_batch():
    tokens = _ramp()
    single = TrainBatches(tokens, 8, micro_batch_size=4, grad_accum_steps=2, dp_rank=0, dp_size=1, seed=3)
    ranks = [TrainBatches(tokens, 8, micro_batch_size=4, grad_accum_steps=1, dp_rank=r, dp_size=2, seed=3)
             for r in range(2)]
    for _ in range(5):
        micro_steps = single.next_step()
        per_rank = [r.next_step() for r in ranks]
        assert len(micro_steps) == 2 and all(len(p) == 1 for p in per_rank)
        for r in range(2):
            assert torch.equal(per_rank[r][0][0], micro_steps[r][0])
            assert torch.equal(per_rank[r][0][1], micro_steps[r][1])


def test_sample_index_layout_across_ranks_and_micro_steps():
    tokens, mb, accum, dp = _ramp(), 2, 3, 4
    ranks = [TrainBatches(tokens, 8, mb, accum, r, dp, seed=9) for r in range(dp)]
    starts = ranks[0].global_starts(0)
    steps = [r.next_step() for r in ranks]
    for r in range(dp):
        for a in range(accum):
            i = a * dp * mb + r * mb
            assert steps[r][a][0][:, 0].tolist() == starts[i:i + mb].tolist()


def test_train_split_shorter_than_a_window_is_a_config_error():
    with pytest.raises(ConfigError, match="data.seq_len=16.*train split holds 10 tokens"):
        TrainBatches(_ramp(10), 16, 1, 1, 0, 1, 0)
    with pytest.raises(ConfigError, match="trainer.seed"):
        TrainBatches(_ramp(), 16, 1, 1, 0, 1, -1)


def test_val_batches_are_fixed_and_partitioned_across_ranks():
    tokens = _ramp(3000)
    full = ValBatches(tokens, 8, batch_size=2, num_batches=7, dp_rank=0, dp_size=1, seed=0)
    reference = list(full)
    assert len(reference) == 7
    again = list(full)  # a second evaluation sees the same windows
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(reference, again))
    assert all(torch.equal(t, i + 1) for i, t in reference)
    dp = 3
    seen = {}
    for r in range(dp):
        part = ValBatches(tokens, 8, 2, 7, dp_rank=r, dp_size=dp, seed=0)
        assert len(part) == len(range(r, 7, dp))
        for j, (inputs, targets) in zip(range(r, 7, dp), part):
            seen[j] = inputs
    assert sorted(seen) == list(range(7))
    assert all(torch.equal(seen[j], reference[j][0]) for j in range(7))


def test_val_split_shorter_than_a_window_names_the_fix():
    with pytest.raises(ConfigError) as excinfo:
        ValBatches(_ramp(20), 64, 2, 3, 0, 1)
    message = str(excinfo.value)
    assert message.startswith("data.seq_len=64") and "data.val_fraction" in message and "seq_len<=19" in message


def test_make_batches_from_a_prepared_corpus(tmp_path):
    _write_docs(tmp_path / "src", num_docs=20)
    data = _cfg(tmp_path / "src", tmp_path / "cache", seq_len=8)
    corpus = prepare_corpus(data, BYTES)
    trainer = TrainerConfig(max_steps=10, seed=0, micro_batch_size=2, grad_accum_steps=2, log_every=1, eval_every=0,
                            eval_batches=3, precision="fp32", device="cpu", progress_bar=False)
    train, val = make_batches(corpus, data, trainer, dp_rank=0, dp_size=1)
    steps = train.next_step()
    assert len(steps) == 2 and steps[0][0].shape == (2, 8)
    assert len(list(val)) == 3
    start = int(train.global_starts(0)[0])
    assert steps[0][0][0].tolist() == corpus.load("train")[start:start + 8].tolist()


# ----------------------------------------------------------------------------- mixtures


def _mixture_sources(lengths=(5000, 3000, 800)):
    """Sources whose tokens tell them apart: source k holds only ids in [100k, 100k + 100)."""
    return [(np.arange(n) % 100 + 100 * k).astype(np.uint16) for k, n in enumerate(lengths)]


def _source_of(window_BT):
    return window_BT[:, 0] // 100


def test_mixture_proportions_are_within_binomial_bounds():
    weights = [0.7, 0.2, 0.1]
    b = TrainBatches(_mixture_sources(), seq_len=8, micro_batch_size=16, grad_accum_steps=2, dp_rank=0, dp_size=1,
                     seed=3, weights=weights)
    counts, n = np.zeros(3), 0
    for _ in range(300):
        for inputs, targets in b.next_step():
            src = _source_of(inputs)
            # Every window lies inside one source (its tokens never mix two sources).
            assert (inputs // 100 == src[:, None]).all() and (targets // 100 == src[:, None]).all()
            counts += np.bincount(src.numpy(), minlength=3)
            n += len(src)
    # Each source's count is Binomial(n, w): within 5 standard deviations (a false alarm has
    # probability below 1e-6 per source), about +-1.6 percentage points of 9600 draws for w = 0.7.
    for count, w in zip(counts, weights):
        assert abs(count - n * w) <= 5 * np.sqrt(n * w * (1 - w)), (counts / n, weights)


def test_mixture_resumes_exactly_under_another_layout():
    sources, weights = _mixture_sources(), [0.5, 0.3, 0.2]
    one = TrainBatches(sources, 8, micro_batch_size=4, grad_accum_steps=2, dp_rank=0, dp_size=1, seed=11, weights=weights)
    reference = [one.next_step() for _ in range(6)]
    # Interrupted after 3 steps, resumed on 2 data-parallel ranks with one accumulation step each:
    # the same global batches, regrouped by sample index.
    first = TrainBatches(sources, 8, 4, 2, 0, 1, seed=11, weights=weights)
    for _ in range(3):
        first.next_step()
    state = first.state_dict()
    ranks = [TrainBatches(sources, 8, 4, 1, r, 2, seed=11, weights=weights) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for step in range(3, 6):
        got = [r.next_step()[0] for r in ranks]
        for a in range(2):
            assert torch.equal(got[a][0], reference[step][a][0]) and torch.equal(got[a][1], reference[step][a][1])
    # Nothing else than (seed, step) decides the draw: a fresh object gives the same step 4.
    again = TrainBatches(sources, 8, 4, 2, 0, 1, seed=11, weights=weights)
    again.load_state_dict({"batches_consumed": 4})
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(again.next_step(), reference[4]))


def test_single_source_draw_is_unchanged_by_mixture_support():
    tokens = (np.arange(1000) % 251).astype(np.uint16)
    b = TrainBatches(tokens, 8, 4, 1, 0, 1, seed=5)
    expected = np.random.default_rng([5, 0, 0]).integers(0, 1000 - 8, size=4)  # the documented rule
    assert (b.global_starts(0) == expected).all()


def test_mixture_from_config_prepares_each_source_with_its_own_val(tmp_path):
    for name in ("web", "code"):
        _write_docs(tmp_path / name, num_docs=8)
    mixture = [{"name": "web", "source": str(tmp_path / "web"), "weight": 3},
               {"name": "code", "source": str(tmp_path / "code"), "weight": 1}]
    from orchestrator.data import prepare_sources, val_loss_by_source

    cfg = _cfg("", tmp_path / "cache", mixture=mixture)
    corpora = prepare_sources(cfg, BYTES)
    assert list(corpora) == ["web", "code"]
    trainer = TrainerConfig(max_steps=1, seed=0, micro_batch_size=2, grad_accum_steps=1, log_every=1, eval_every=0,
                            eval_batches=3, precision="fp32", device="cpu", progress_bar=False)
    train, val = make_batches(corpora, cfg, trainer, dp_rank=0, dp_size=1)
    assert train.weights.tolist() == [0.75, 0.25] and val.is_mixture and len(val) == 6
    overall, per_source = val_loss_by_source(val, lambda x, y: float(x.double().mean()), "cpu")
    assert set(per_source) == {"web", "code"}
    assert overall == pytest.approx(sum(per_source.values()) / 2)  # equal batches per source

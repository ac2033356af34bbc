"""Tokenizers: the byte tokenizer, tokenizer.json files, and their one-line errors."""

import sys

import numpy as np
import pytest

from orchestrator.config import BYTE_VOCAB_SIZE
from orchestrator.errors import ConfigError
from orchestrator.tokenizer import ByteTokenizer, Tokenizer, check_model_vocab, load_tokenizer, token_dtype


def test_byte_tokenizer_round_trip_with_non_ascii():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    text = "déjà vu — 数据 🚀\n\ttab"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eos_id) == (BYTE_VOCAB_SIZE, 256)


def test_byte_decode_drops_eos_and_accepts_lists_and_tensors():
    torch = pytest.importorskip("torch")
    tok = ByteTokenizer()
    ids = list("ab".encode()) + [tok.eos_id] + list("c".encode()) + [300]  # 300: a padded-vocab id
    assert tok.decode(ids) == "abc"
    assert tok.decode(torch.tensor(ids)) == "abc"
    assert tok.encode("").size == 0


def test_token_dtype():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 still fit
    assert token_dtype(65537) == np.uint32


def _one_line_error(excinfo, key):
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(key + "=") and "; fix: " in message
    return message


def test_missing_tokenizer_file_is_a_one_line_error(tmp_path):
    spec = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(ConfigError) as excinfo:
        load_tokenizer(spec)
    message = _one_line_error(excinfo, "data.tokenizer")
    assert "no such file" in message and "data.tokenizer=bytes" in message


def test_folder_without_tokenizer_json_and_remote_url_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ConfigError) as excinfo:
        load_tokenizer("s3://bucket/tokenizer.json")
    assert "remote" in _one_line_error(excinfo, "data.tokenizer")


def test_missing_tokenizers_package_is_a_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what `import tokenizers` sees when not installed
    with pytest.raises(ConfigError) as excinfo:
        load_tokenizer(str(path))
    assert "pip install tokenizers" in _one_line_error(excinfo, "data.tokenizer")


def _word_level(tmp_path, vocab, name="tokenizer.json"):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / name
    tok.save(str(path))
    return path


def test_word_level_tokenizer_json_from_a_path(tmp_path):
    path = _word_level(tmp_path, {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3})
    tok = load_tokenizer(str(path))
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id) == (4, 3)
    ids = tok.encode("hello world hello")
    assert ids.tolist() == [1, 2, 1] and ids.dtype == np.uint16
    assert tok.decode([1, 2, 3]) == "hello world"  # eos is a separator, not text
    # A folder holding tokenizer.json works too, and the name fingerprints the file's contents.
    assert load_tokenizer(str(tmp_path)).name == tok.name
    other = _word_level(tmp_path, {"[UNK]": 0, "hello": 1, "world": 2, "planet": 3, "</s>": 4}, "other.json")
    assert load_tokenizer(str(other)).name != tok.name


def test_tokenizer_json_without_eos_gets_an_extra_id(tmp_path):
    path = _word_level(tmp_path, {"[UNK]": 0, "a": 1})
    tok = load_tokenizer(str(path))
    assert (tok.vocab_size, tok.eos_id) == (3, 2)
    assert tok.decode([1, 2, 1]) == "a a"


def test_trained_bpe_round_trip(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "the quick brown fox", "naïve café"] * 20,
                            trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert loaded.eos_id == 0 and loaded.name.startswith("hf:tokenizer.json:")
    text = "def g(y):\n    return 'naïve' # 数据"
    ids = loaded.encode(text)
    assert ids.max() < loaded.vocab_size and loaded.eos_id not in ids.tolist()
    assert loaded.decode(ids) == text


def test_malformed_tokenizer_json_is_a_one_line_error(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConfigError) as excinfo:
        load_tokenizer(str(path))
    assert "not a readable tokenizer.json" in _one_line_error(excinfo, "data.tokenizer")


def test_check_model_vocab():
    check_model_vocab(ByteTokenizer(), 257)
    check_model_vocab(ByteTokenizer(), 320)
    with pytest.raises(ConfigError) as excinfo:
        check_model_vocab(ByteTokenizer(), 256)
    assert "model.vocab_size=257" in _one_line_error(excinfo, "model.vocab_size")

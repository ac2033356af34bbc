"""Tokenizers: text <-> token ids, each with an end-of-document id and a stable name.

`load_tokenizer('bytes')` gives the built-in byte tokenizer (UTF-8 bytes 0..255 plus an
end-of-document id 256); any other spec is a local path to a Hugging Face `tokenizer.json`
(or a folder holding one), read with the optional `tokenizers` package.

`name` is a fingerprint: prepared token caches are keyed by it, so a file tokenizer's name
includes a hash of the file's contents (editing the file re-tokenizes the corpus).
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Protocol, runtime_checkable

import numpy as np

from orchestrator.errors import ConfigError

# The byte tokenizer's vocabulary: 256 byte values plus one end-of-document token. Defined here, not
# in orchestrator/config.py, so that preparation workers import neither the config nor torch.
BYTE_VOCAB_SIZE = 257

# Tried in this order as the end-of-document token of a tokenizer.json (first one present wins).
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<EOS>",
                  "<|im_end|>", "<|eot_id|>", "[SEP]")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int  # ids are 0..vocab_size-1, eos included
    eos_id: int  # appended after every document
    name: str  # stable fingerprint used in cache keys

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..vocab_size-1 (uint16 up to 65536 tokens)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end of document 256. No training, no files, never out of vocabulary."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_VOCAB_SIZE - 1
    name = "bytes-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        # eos and ids a padded model vocabulary may sample (>= 256) carry no bytes; drop them.
        data = bytes(i for i in (int(x) for x in _as_list(ids)) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a tokenizer.json."""

    def __init__(self, path: str, tokenizer, digest: str):
        self.path = path
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        base_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is not None:
            self.eos_token, self.eos_id, self.vocab_size = eos, vocab[eos], base_size
        else:
            # No end-of-document token in the file: documents still need a separator, so one id
            # past the file's vocabulary becomes eos (decode drops it, the model sees it).
            self.eos_token, self.eos_id, self.vocab_size = None, base_size, base_size + 1
        self.name = f"hf:{os.path.basename(path)}:{digest[:16]}" + ("" if eos else "+eos")
        self._dtype = token_dtype(self.vocab_size)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=self._dtype)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Several documents at once, on all cores (the library's Rust thread pool)."""
        return [np.asarray(e.ids, dtype=self._dtype) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        limit = self.vocab_size - (0 if self.eos_token else 1)
        keep = [i for i in (int(x) for x in _as_list(ids)) if 0 <= i < limit and i != self.eos_id]
        return self._tok.decode(keep, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos={self.eos_token or self.eos_id})"


def load_tokenizer(spec: str) -> Tokenizer:
    """'bytes' -> ByteTokenizer; otherwise a local tokenizer.json path (or a folder with one)."""
    if spec == "bytes":
        return ByteTokenizer()
    fix_path = "give the local path of a Hugging Face tokenizer.json, or use data.tokenizer=bytes"
    if not spec:
        raise ConfigError("data.tokenizer", spec, "is empty", fix_path)
    path = spec[len("file://"):] if spec.startswith("file://") else spec
    if "://" in path:
        raise ConfigError("data.tokenizer", spec, "remote tokenizer files are not supported",
                          "download the tokenizer.json and give its local path")
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError("data.tokenizer", spec, f"no such file: {path}", fix_path)
    try:
        import tokenizers  # optional dependency: only file tokenizers need it
    except ImportError:
        raise ConfigError("data.tokenizer", spec, "the 'tokenizers' package is not installed",
                          "pip install tokenizers (part of the dev extras), or use data.tokenizer=bytes") from None
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the library raises plain Exception subclasses for malformed files
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError("data.tokenizer", spec, f"not a readable tokenizer.json ({problem})", fix_path) from None
    return HFTokenizer(path, tok, hashlib.sha256(raw).hexdigest())


def check_model_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The model must have an embedding row for every id the tokenizer can produce."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", model_vocab_size,
                          f"is smaller than the tokenizer's {tokenizer.vocab_size} tokens ({tokenizer.name})",
                          f"set model.vocab_size={tokenizer.vocab_size} (or more, e.g. rounded up to a multiple of 64)")


def _as_list(ids) -> list:
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
        ids = ids.tolist()
    return list(ids)

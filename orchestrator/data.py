"""Training and validation batches: deterministic, resumable and independent of the rank layout.

Shapes: B = sequences in a micro-batch, T = data.seq_len. A window is T+1 consecutive tokens;
inputs_BT are its first T, targets_BT its last T (the next token at every position).

Training draws random windows (with replacement) from the train tokens. Global batch b (one
optimizer step) is G = micro_batch_size x grad_accum_steps x dp_size windows whose start
offsets depend on (seed, b) only. Sample i of that batch goes to accumulation micro-step a,
data-parallel rank r and position p where i = a*(dp_size*micro_batch_size) + r*micro_batch_size + p,
so changing dp_size at a fixed global batch regroups the same data, and resuming needs nothing
but b (`batches_consumed` in the state dict).

Validation uses a fixed set of windows (the same at every evaluation, so evaluations compare),
spread over ranks round-robin by batch.

Corpus preparation (sources, tokenizing, caching) lives in orchestrator/corpus.py; its public
names are re-exported here.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from orchestrator.config import DataConfig, TrainerConfig
from orchestrator.corpus import PreparedCorpus, list_source, prepare_corpus  # noqa: F401  (re-exported)
from orchestrator.errors import ConfigError

# Separate random streams for training and validation windows from one seed.
_TRAIN_STREAM, _VAL_STREAM = 0, 1
# Validation windows come from a constant seed by default, so runs with different
# trainer.seed are evaluated on identical data.
DEFAULT_VAL_SEED = 0

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs_BT, targets_BT), torch.long


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    idx = starts[:, None] + np.arange(seq_len + 1)
    window_BW = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return window_BW[:, :-1].contiguous(), window_BW[:, 1:].contiguous()


def _check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    n = len(tokens)
    if n >= seq_len + 1:
        return
    if split == "val":
        fix = "raise data.val_fraction" + (f" or set data.seq_len<={n - 1}" if n - 1 >= 2 else "")
    else:
        fix = "use a larger data.source" + (f" or set data.seq_len<={n - 1}" if n - 1 >= 2 else "")
    raise ConfigError("data.seq_len", seq_len,
                      f"the {split} split holds {n} tokens, fewer than one window of data.seq_len+1", fix)


def _check_seed(seed: int) -> None:
    if seed < 0:  # numpy's SeedSequence takes non-negative integers only
        raise ConfigError("trainer.seed", seed, "must be non-negative", "set trainer.seed to 0 or more")


class TrainBatches:
    """This rank's micro-batches of each optimizer step; `state_dict` holds the position."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, grad_accum_steps: int,
                 dp_rank: int, dp_size: int, seed: int):
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        assert micro_batch_size >= 1 and grad_accum_steps >= 1 and seq_len >= 1
        _check_length(tokens, seq_len, "train")
        _check_seed(seed)
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.batches_consumed = 0  # b: global batches handed out so far (all ranks advance together)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes across all ranks."""
        return self.global_batch_size * self.seq_len

    def global_starts(self, batch: int) -> np.ndarray:
        """Window start offsets of global batch `batch`, all G samples, for every rank alike."""
        rng = np.random.default_rng([self.seed, _TRAIN_STREAM, batch])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch_size)

    def next_step(self) -> list[Batch]:
        """grad_accum_steps (inputs_BT, targets_BT) pairs for this rank; advances one global batch."""
        starts = self.global_starts(self.batches_consumed)
        per_micro_step = self.dp_size * self.micro_batch_size
        out = []
        for a in range(self.grad_accum_steps):
            first = a * per_micro_step + self.dp_rank * self.micro_batch_size
            out.append(_windows(self.tokens, starts[first:first + self.micro_batch_size], self.seq_len))
        self.batches_consumed += 1
        return out

    def state_dict(self) -> dict:
        # Only batches_consumed is needed to resume; the rest documents what it counted.
        return {"batches_consumed": self.batches_consumed, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        # A resume under another dp_size at the same global batch continues with the same data; a
        # changed global batch, seq_len or corpus is allowed but draws different windows from b on.
        self.batches_consumed = int(state["batches_consumed"])


class ValBatches:
    """A fixed list of validation batches; this rank iterates over batches r, r+dp_size, ..."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int,
                 dp_rank: int, dp_size: int, seed: int = DEFAULT_VAL_SEED):
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        assert batch_size >= 1 and num_batches >= 1 and seq_len >= 1
        _check_length(tokens, seq_len, "val")
        _check_seed(seed)
        self.tokens, self.seq_len = tokens, seq_len
        rng = np.random.default_rng([seed, _VAL_STREAM])
        all_starts = rng.integers(0, len(tokens) - seq_len, size=(num_batches, batch_size))
        self.batch_indices = list(range(dp_rank, num_batches, dp_size))  # may be empty if num_batches < dp_size
        self._starts = all_starts[self.batch_indices]

    def __len__(self) -> int:
        return len(self.batch_indices)

    def __iter__(self) -> Iterator[Batch]:
        for starts in self._starts:
            yield _windows(self.tokens, starts, self.seq_len)


def make_batches(corpus: PreparedCorpus, data: DataConfig, trainer: TrainerConfig,
                 dp_rank: int, dp_size: int) -> tuple[TrainBatches, ValBatches]:
    """The train and val batches of one data-parallel rank as the config asks for them."""
    train = TrainBatches(corpus.load("train"), data.seq_len, trainer.micro_batch_size, trainer.grad_accum_steps,
                         dp_rank, dp_size, trainer.seed)
    val = ValBatches(corpus.load("val"), data.seq_len, trainer.micro_batch_size, trainer.eval_batches,
                     dp_rank, dp_size)
    return train, val

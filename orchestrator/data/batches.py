"""Training and validation batches: deterministic, resumable and independent of the rank layout.

Shapes: B = sequences in a micro-batch, T = data.seq_len. A window is T+1 consecutive tokens;
inputs_BT are its first T, targets_BT its last T (the next token at every position).

Training draws random windows (with replacement) from the train tokens. Global batch b (one
optimizer step) is G = micro_batch_size x grad_accum_steps x dp_size windows whose start
offsets depend on (seed, b) only. Sample i of that batch goes to accumulation micro-step a,
data-parallel rank r and position p where i = a*(dp_size*micro_batch_size) + r*micro_batch_size + p,
so changing dp_size at a fixed global batch regroups the same data, and resuming needs nothing
but b (`batches_consumed` in the state dict).

A mixture (data.mixture) keeps the one rule: the same generator of (seed, b) first draws each
sample's source by weight, then its start in that source's train tokens, so the mixture of every
step, and its resumption under any layout, are fixed by (seed, b) alone.

Validation uses a fixed set of windows (the same at every evaluation, so evaluations compare),
spread over ranks round-robin by batch; a mixture has one such set per source (`ValSets`).

Corpus preparation (sources, tokenizing, caching) lives in orchestrator/data/prepare.py.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from orchestrator.config import DataConfig, TrainerConfig
from orchestrator.data.mixture import mixture_sources
from orchestrator.data.prepare import PreparedCorpus
from orchestrator.errors import ConfigError

# Separate random streams for training and validation windows from one seed.
_TRAIN_STREAM, _VAL_STREAM = 0, 1
# Validation windows come from a constant seed by default, so runs with different
# trainer.seed are evaluated on identical data.
DEFAULT_VAL_SEED = 0

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs_BT, targets_BT), torch.long


def _windows(tokens, starts: np.ndarray, seq_len: int) -> Batch:
    idx = starts[:, None] + np.arange(seq_len + 1)
    window_BW = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return window_BW[:, :-1].contiguous(), window_BW[:, 1:].contiguous()


def _mixed_windows(sources: list, source_B: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    window_BW = np.empty((len(starts), seq_len + 1), dtype=np.int64)
    offsets = np.arange(seq_len + 1)
    for s in np.unique(source_B):
        rows = np.flatnonzero(source_B == s)
        window_BW[rows] = sources[s][starts[rows][:, None] + offsets]
    window_BW = torch.from_numpy(window_BW)
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

    def __init__(self, tokens, seq_len: int, micro_batch_size: int, grad_accum_steps: int,
                 dp_rank: int, dp_size: int, seed: int, weights: list[float] | None = None):
        """tokens: one source's train tokens, or (with weights) a list of them, one per mixture source."""
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        assert micro_batch_size >= 1 and grad_accum_steps >= 1 and seq_len >= 1
        self.sources = list(tokens) if weights is not None else [tokens]
        self.weights = np.asarray(weights if weights is not None else [1.0], dtype=np.float64)
        assert len(self.weights) == len(self.sources) and abs(self.weights.sum() - 1.0) < 1e-9, self.weights
        for t in self.sources:
            _check_length(t, seq_len, "train")
        _check_seed(seed)
        self.tokens, self.seq_len, self.seed = self.sources[0], seq_len, seed
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
        return self.global_draw(batch)[1]

    def global_draw(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, start offset) of every sample of global batch `batch`, from (seed, batch) only."""
        rng = np.random.default_rng([self.seed, _TRAIN_STREAM, batch])
        g = self.global_batch_size
        if len(self.sources) == 1:  # one source: the draw of every release before mixtures
            return np.zeros(g, dtype=np.int64), rng.integers(0, len(self.tokens) - self.seq_len, size=g)
        source_G = rng.choice(len(self.sources), size=g, p=self.weights)
        limits = np.array([len(t) - self.seq_len for t in self.sources], dtype=np.int64)
        starts = np.minimum((rng.random(g) * limits[source_G]).astype(np.int64), limits[source_G] - 1)
        return source_G, starts

    def next_step(self) -> list[Batch]:
        """grad_accum_steps (inputs_BT, targets_BT) pairs for this rank; advances one global batch."""
        source_G, starts = self.global_draw(self.batches_consumed)
        per_micro_step = self.dp_size * self.micro_batch_size
        out = []
        for a in range(self.grad_accum_steps):
            first = a * per_micro_step + self.dp_rank * self.micro_batch_size
            mine = slice(first, first + self.micro_batch_size)
            if len(self.sources) == 1:
                out.append(_windows(self.tokens, starts[mine], self.seq_len))
            else:
                out.append(_mixed_windows(self.sources, source_G[mine], starts[mine], self.seq_len))
        self.batches_consumed += 1
        return out

    def state_dict(self) -> dict:
        # Only batches_consumed is needed to resume; the rest documents what it counted.
        return {"batches_consumed": self.batches_consumed, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                "num_tokens": len(self.tokens), "num_tokens_by_source": [len(t) for t in self.sources],
                "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        # A resume under another dp_size at the same global batch continues with the same data; a
        # changed global batch, seq_len or corpus is allowed but draws different windows from b on.
        self.batches_consumed = int(state["batches_consumed"])


class ValBatches:
    """A fixed list of validation batches; this rank iterates over batches r, r+dp_size, ..."""

    def __init__(self, tokens, seq_len: int, batch_size: int, num_batches: int,
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


class ValSets:
    """The validation batches of every source, by name ('' for a single data.source). Iterating
    gives all of them (the overall val loss); `items()` gives each source's own."""

    def __init__(self, sets: dict[str, ValBatches]):
        self.sets = sets

    def items(self):
        return self.sets.items()

    def __len__(self) -> int:
        return sum(len(v) for v in self.sets.values())

    def __iter__(self) -> Iterator[Batch]:
        for batches in self.sets.values():
            yield from batches

    @property
    def is_mixture(self) -> bool:
        return list(self.sets) != [""]


def val_loss_by_source(val_sets: ValSets, batch_loss, device, all_reduce=None) -> tuple[float, dict[str, float]]:
    """The mean validation loss over all batches and per source. batch_loss(inputs_BT, targets_BT)
    -> float; all_reduce(tensor) sums over the data-parallel ranks (each holds some of the batches)."""
    names = list(val_sets.sets)
    sums = torch.zeros(len(names), 2, dtype=torch.float64)
    for i, name in enumerate(names):
        for inputs, targets in val_sets.sets[name]:
            sums[i] += torch.tensor([float(batch_loss(inputs, targets)), 1.0], dtype=torch.float64)
    sums = sums.to(device)
    if all_reduce is not None:
        all_reduce(sums)
    total = sums.sum(0)
    overall = float(total[0] / total[1])
    per_source = {n: float(sums[i, 0] / sums[i, 1]) for i, n in enumerate(names)} if val_sets.is_mixture else {}
    return overall, per_source


def prepare_sources(data: DataConfig, tokenizer, progress: bool = False) -> dict[str, PreparedCorpus]:
    """Every source of the run (data.mixture, or data.source alone under the name ''), prepared or cached."""
    from orchestrator.data.prepare import prepare_corpus

    return {m.name: prepare_corpus(data, tokenizer, source=m.source, key=m.key, text_field=m.text_field,
                                   progress=progress)
            for m in mixture_sources(data)}


def make_batches(corpus, data: DataConfig, trainer: TrainerConfig,
                 dp_rank: int, dp_size: int) -> tuple[TrainBatches, ValSets]:
    """The train and val batches of one data-parallel rank as the config asks for them; corpus is
    one PreparedCorpus or the dict of prepare_sources."""
    corpora = corpus if isinstance(corpus, dict) else {"": corpus}
    weights = {m.name: m.weight for m in mixture_sources(data)} if len(corpora) > 1 else {n: 1.0 for n in corpora}
    names = list(corpora)
    if len(names) == 1:
        train = TrainBatches(corpora[names[0]].load("train"), data.seq_len, trainer.micro_batch_size,
                             trainer.grad_accum_steps, dp_rank, dp_size, trainer.seed)
    else:
        train = TrainBatches([corpora[n].load("train") for n in names], data.seq_len, trainer.micro_batch_size,
                             trainer.grad_accum_steps, dp_rank, dp_size, trainer.seed,
                             weights=[weights[n] for n in names])
    # The validation windows do not depend on trainer.seed, so runs with different seeds are
    # evaluated on the same text.
    val = ValSets({n: ValBatches(corpora[n].load("val"), data.seq_len, trainer.micro_batch_size,
                                 trainer.eval_batches, dp_rank, dp_size) for n in names})
    return train, val

"""Pipeline parallelism: a built TransformerLM cut into pp stages for DeepSpeed's pipeline engine.

`to_pipeline(model, dims)` turns the model every rank has built from the same seed into a
`LMPipelineModule` (a DeepSpeed PipelineModule) that keeps only this rank's stage, so initial
weights equal the single-process model's by construction. The layer sequence is

    0            EmbeddingPipe          tokens_BT -> (x_BTD, aux)
    1 .. L       BlockPipe (block i-1)  (x, aux) -> (x', aux + the block's MoE aux loss)
    L + 1        FinalNormPipe          (x, aux) -> (norm(x), aux)
    L + 2        head                   (x, aux) -> (logits_BTV, aux)
    loss         LMPipelineLoss         ((logits, aux), targets) -> lm_loss + aux (training)

Stage s holds the blocks of `block_ranges(L, pp)[s]` (contiguous, counts differ by at most one,
earlier stages take the extra ones), the first stage also the embedding, the last the final norm
and the head. With tied embeddings the head is a TiedLayerSpec of the embedding: the last stage
holds a copy of the embedding table, DeepSpeed sums the two copies' gradients before every
optimizer step (ReduceTiedGrads) and counts the copy once in the gradient norm
(`ds_pipe_replicated`), so both stay equal to the single tied table of the one-process model.

The auxiliary loss travels with the activations as a 0-dim tensor, so MoE load-balancing losses of
any stage reach the loss on the last stage and their gradients flow back through the stages.
DeepSpeed runs backward on every floating tensor a stage sends, so the first stage starts it as a
leaf that requires grad (it receives a gradient nobody reads).

PEER expert tables of the layers that another stage holds are never built: build the model under
`model.peer.defer_expert_tables()` and `to_pipeline` materialises the local layers' tables (ep = 1;
with ep > 1 parallelize() builds this rank's columns instead).

Micro-batches (parallel.pp_microbatches = m): each trainer micro-batch of micro_batch_size sequences
is split into m pipeline micro-batches of micro_batch_size / m sequences, so DeepSpeed runs
grad_accum_steps x m micro-batches per step and the global batch is unchanged
(`split_micro_batches`, `pipeline_deepspeed_config`).

Legend (shape suffixes): B batch, T tokens per sequence, D d_model, V vocab.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from torch import nn

from model.lm import Block, RMSNorm, TransformerLM
from model.moe import MoEFeedForward
from model.peer import PEER
from model.pkm import PKM
from compat import synchronize_tied_weights
from orchestrator.parallel.dims import ParallelDims
from orchestrator.parallel.shards import declare_child_names

TIED_KEY = "embed"


# ----------------------------------------------------------------------------- partition


def block_ranges(num_layers: int, pp: int) -> list[range]:
    """The blocks of each stage: contiguous, as even as possible (DeepSpeed's partition_uniform:
    the first num_layers % pp stages take one block more)."""
    assert 1 <= pp <= num_layers, (pp, num_layers)
    size, extra = divmod(num_layers, pp)
    bounds = [0]
    for stage in range(pp):
        bounds.append(bounds[-1] + size + (1 if stage < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def layer_parts(num_layers: int, pp: int) -> list[int]:
    """Stage boundaries over the layer sequence (embedding, L blocks, final norm, head): stage s
    holds layers [parts[s], parts[s + 1])."""
    ranges = block_ranges(num_layers, pp)
    parts = [0] + [r.stop + 1 for r in ranges]  # block i is layer i + 1; the embedding goes first
    parts[-1] = num_layers + 3  # the last stage also holds the final norm and the head
    return parts


def describe_stages(num_layers: int, pp: int, tied: bool) -> str:
    """One line: which blocks each stage holds (printed at start)."""
    parts = []
    for stage, blocks in enumerate(block_ranges(num_layers, pp)):
        held = [f"blocks {blocks.start}-{blocks.stop - 1}" if len(blocks) > 1 else f"block {blocks.start}"]
        if stage == 0:
            held.insert(0, "embedding")
        if stage == pp - 1:
            held.append("final norm + head" + (" (tied to the embedding)" if tied else ""))
        parts.append(f"stage {stage}: {' + '.join(held)}")
    return "pipeline: " + "; ".join(parts)


# ----------------------------------------------------------------------------- layers


class EmbeddingPipe(nn.Module):
    """tokens_BT -> (x_BTD, aux). Wraps the built model's embedding (the tied module when tied)."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, tokens_BT: torch.Tensor):
        x_BTD = self.embed(tokens_BT)
        aux = torch.zeros((), dtype=torch.float32, device=x_BTD.device, requires_grad=torch.is_grad_enabled())
        return x_BTD, aux


class BlockPipe(nn.Module):
    """One transformer block of the built model; adds its MoE aux loss to the carried one."""

    def __init__(self, block: Block, index: int) -> None:
        super().__init__()
        self.block = block
        self.index = index  # the block's index in the whole model
        declare_child_names(self, {"block": f"blocks.{index}"})  # checkpoints: the model's name

    def forward(self, inputs):
        x_BTD, aux = inputs
        x_BTD, block_aux = self.block(x_BTD)
        if block_aux is not None:
            aux = aux + block_aux
        return x_BTD, aux


class FinalNormPipe(nn.Module):
    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.norm = norm
        declare_child_names(self, {"norm": "final_norm"})

    def forward(self, inputs):
        x_BTD, aux = inputs
        return self.norm(x_BTD), aux


class HeadPipe(nn.Module):
    """The untied output projection."""

    def __init__(self, lm_head: nn.Linear) -> None:
        super().__init__()
        self.lm_head = lm_head

    def forward(self, inputs):
        x_BTD, aux = inputs
        return self.lm_head(x_BTD), aux


def tied_head(module: EmbeddingPipe, inputs):
    """The tied output projection: logits with the (last stage's copy of the) embedding table."""
    x_BTD, aux = inputs
    return F.linear(x_BTD, module.embed.weight), aux


class LMPipelineLoss(nn.Module):
    """The last stage's loss: mean cross-entropy (-100 = ignore) plus the carried aux loss in
    training, as TransformerLM's `loss`; in eval mode the LM loss alone, as TransformerLM's
    `lm_loss` (what the validation loss reports)."""

    def forward(self, outputs, targets_BT: torch.Tensor) -> torch.Tensor:
        logits_BTV, aux = outputs
        lm_loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100)
        return lm_loss + aux if self.training else lm_loss


# ----------------------------------------------------------------------------- the module


def _deepspeed_pipeline_module():
    from deepspeed.runtime.pipe.module import PipelineModule

    return PipelineModule


class _LocalOnly:
    """Stands in for a layer held by another stage once this stage is built (so that the built
    model's other layers can be freed)."""

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __repr__(self) -> str:
        return f"<{self.__name__} on another stage>"


def _make_module_class():
    PipelineModule = _deepspeed_pipeline_module()

    class LMPipelineModule(PipelineModule):
        """This rank's stage of the LM. Partition: `layer_parts` (blocks, not parameters)."""

        def __init__(self, layers, dims: ParallelDims, num_blocks: int, loss_fn: nn.Module) -> None:
            self._num_blocks = num_blocks
            self._constructing = True
            with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints the partition on rank 0
                super().__init__(layers=layers, topology=dims.topology(), loss_fn=loss_fn,
                                 partition_method="blocks")
            self._constructing = False
            for i, spec in enumerate(self._layer_specs):
                if not self._local_start <= i < self._local_stop:
                    self._layer_specs[i] = _LocalOnly(type(spec).__name__)
            # Checkpoints: a stage's layer i and the tied embedding hold tensors under the model's
            # own names (EmbeddingPipe.embed, BlockPipe -> blocks.<index>, FinalNormPipe -> final_norm).
            declare_child_names(self, {name: "" for name in self._modules})
            declare_child_names(self.tied_modules, {key: "" for key in self.tied_modules})

        def to(self, *args, **kwargs):
            # PipelineModule.__init__ moves the stage to the accelerator; with ep > 1 the PEER
            # tables are still deferred (meta) then, and parallelize() has yet to build them. The
            # caller moves the finished stage (and DeepSpeed's engine does too).
            if getattr(self, "_constructing", False):
                return self
            return super().to(*args, **kwargs)

        def _synchronize_tied_weights(self):  # overrides DeepSpeed's private method (tests/unit/test_compat.py)
            if getattr(self, "_loading", False):
                return
            # DeepSpeed broadcasts the tied table from the first stage in place; outside no_grad
            # autograd records that on the parameter (and warns at every backward).
            with torch.no_grad():
                synchronize_tied_weights(super())

        def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
            # DeepSpeed loads a stage with MoE layers from its model-states file, any other stage
            # from its layer files, and only the latter broadcasts the tied table afterwards: with
            # MoE on some stages only, the broadcast would wait for a stage that never joins. The
            # trainer calls synchronize_tied_weights() on every rank after loading instead.
            self._loading = True
            try:
                super().load_state_dir(load_dir, checkpoint_engine, strict=strict)
            finally:
                self._loading = False

        def synchronize_tied_weights(self) -> None:
            """Copy the first stage's tied embedding to the last stage's copy (collective: every
            rank calls it). The last stage does not save its copy when it has no MoE layer."""
            synchronize_tied_weights(self)

        def _partition_layers(self, method="blocks"):
            self.parts = layer_parts(self._num_blocks, self.num_stages)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

        def local_blocks(self) -> list[BlockPipe]:
            return [f for f in self.forward_funcs if isinstance(f, BlockPipe)]

        def usage_layers_by_block(self) -> list[tuple[int, nn.Module]]:
            """(block index in the whole model, layer) of this stage's sparse layers whose expert
            usage the trainer measures (PEER, PKM and MoE, as TransformerLM.usage_layers)."""
            kinds = (PEER, PKM, MoEFeedForward)
            return [(b.index, m) for b in self.local_blocks() for m in b.modules() if isinstance(m, kinds)]

        def usage_layers(self):
            return (layer for _, layer in self.usage_layers_by_block())

        def peer_layers(self):
            return (m for m in self.modules() if isinstance(m, PEER))

        def moe_layers(self):
            return (m for m in self.modules() if isinstance(m, MoEFeedForward))

    return LMPipelineModule


_MODULE_CLASS = None


def pipeline_module_class():
    global _MODULE_CLASS
    if _MODULE_CLASS is None:
        _MODULE_CLASS = _make_module_class()
    return _MODULE_CLASS


def to_pipeline(model: TransformerLM, dims: ParallelDims) -> nn.Module:
    """This rank's stage of `model` as a PipelineModule (collective: every rank calls it).

    Tables of local PEER layers that were deferred (meta) are materialised when ep = tp = 1; with
    ep > 1 or tp > 1 they stay deferred for parallelize() to build this rank's columns.
    """
    from deepspeed.runtime.pipe.module import TiedLayerSpec

    cfg = model.cfg
    layers: list = []
    if model.lm_head is None:
        layers.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, model.embed, tied_weight_attr=["embed.weight"]))
    else:
        layers.append(EmbeddingPipe(model.embed))
    layers += [BlockPipe(block, i) for i, block in enumerate(model.blocks)]
    layers.append(FinalNormPipe(model.final_norm))
    if model.lm_head is None:
        layers.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, model.embed, forward_fn=tied_head,
                                    tied_weight_attr=["embed.weight"]))
    else:
        layers.append(HeadPipe(model.lm_head))
    if dims.ep == 1 and dims.tp == 1:
        stage = dims.coords(torch.distributed.get_rank()).pp
        for i in block_ranges(cfg.num_layers, dims.pp)[stage]:
            for module in model.blocks[i].modules():
                if isinstance(module, PEER):
                    _materialise_expert_tables(module)
    return pipeline_module_class()(layers, dims, cfg.num_layers, LMPipelineLoss())


@torch.no_grad()
def _materialise_expert_tables(peer: PEER) -> None:
    for name in ("expert_down", "expert_up"):
        table = getattr(peer, name)
        if table.weight.is_meta:
            table.weight = nn.Parameter(peer.init_expert_table(name, dtype=table.weight.dtype))


# ----------------------------------------------------------------------------- batches


def split_micro_batches(micro_batches, pp_microbatches: int) -> list:
    """Each (inputs_BT, targets_BT) micro-batch as pp_microbatches consecutive pieces of
    B / pp_microbatches sequences, in order: the pipeline's micro-batches of one step."""
    pieces = []
    for inputs_BT, targets_BT in micro_batches:
        pieces += list(zip(inputs_BT.chunk(pp_microbatches), targets_BT.chunk(pp_microbatches)))
    return pieces

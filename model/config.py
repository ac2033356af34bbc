"""Plain dataclasses that describe a model. No defaults: values live in conf/model/*.yaml.

The orchestrator's schema (orchestrator/config.py) nests these, so one definition serves the
YAML validation, the model builder and the FLOP counter. Every field carries a one-line doc
in its metadata; `orchestrator.config.describe()` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def doc(text: str):
    """A required dataclass field with a one-line description."""
    return field(metadata={"doc": text})


FFN_KINDS = ("dense", "peer", "moe", "pkm")
ACTIVATIONS = ("relu", "gelu")
PEER_IMPLS = ("reference", "fused", "auto")


@dataclass
class PeerConfig:
    """PEER layer (He 2024): N single-neuron experts retrieved by product keys."""

    num_experts: int = doc("N, the number of single-neuron experts; a perfect square (sqrt(N) sub-keys per half)")
    num_heads: int = doc("h, retrieval heads; each has its own query net and retrieves top_k experts")
    top_k: int = doc("k, experts retrieved per head (also the k of each sub-key top-k); at most sqrt(N)")
    d_key: int = doc("query/key width; even, split into two halves for the product keys")
    query_batchnorm: bool = doc("BatchNorm on the query (the paper's default, raises expert usage)")
    activation: str = doc("expert non-linearity: relu or gelu")
    impl: str = doc("expert compute: reference (readable PyTorch), fused (Triton on CUDA, chunked torch ops on CPU; model/kernels/), or auto (the fastest correct one for the device: fused today)")


@dataclass
class PKMConfig:
    """Product-key memory (Lample et al. 2019): PEER's retrieval over a table of value rows only."""

    num_values: int = doc("N, memory slots (value rows of width d_model); a perfect square (sqrt(N) sub-keys per half)")
    num_heads: int = doc("h, memory heads; each has its own query net and its own product keys, all share the value table")
    top_k: int = doc("k, slots retrieved per head (also the k of each sub-key top-k); at most sqrt(N)")
    d_key: int = doc("query/key width; even, split into two halves for the product keys")
    query_batchnorm: bool = doc("BatchNorm on the query (Lample et al.'s default, raises slot usage)")
    impl: str = doc("retrieval and value gather: reference (readable PyTorch) or fused/auto (chunked torch ops on CPU, model/kernels/)")


@dataclass
class MoEConfig:
    """Top-k mixture of experts through deepspeed.moe.layer.MoE."""

    num_experts: int = doc("number of MLP experts")
    top_k: int = doc("experts per token: 1 or 2 (DeepSpeed's gating supports these)")
    d_ff: int = doc("hidden width of each expert MLP")
    capacity_factor: float = doc("training capacity factor of each expert")
    eval_capacity_factor: float = doc("capacity factor at evaluation")
    min_capacity: int = doc("minimum tokens an expert accepts per batch")
    aux_loss_coef: float = doc("weight of the load-balancing auxiliary loss added to the LM loss")
    second_expert_sampling: bool = doc("top-2: pick the second expert with Gumbel noise (DeepSpeed's default) rather than by argmax; random, so runs stop being comparable across layouts")
    random_token_selection: bool = doc("top-1: DeepSpeed's random token selection when an expert overflows (random, as above)")


@dataclass
class ModelConfig:
    """Decoder-only LM: RMSNorm, rotary causal attention, FFN per block chosen by `ffn`."""

    vocab_size: int = doc("vocabulary size; at least the tokenizer's (bytes: 257 = 256 bytes + end of document)")
    d_model: int = doc("residual stream width d")
    num_layers: int = doc("number of transformer blocks")
    num_attention_heads: int = doc("attention heads; must divide d_model")
    max_seq_len: int = doc("longest sequence the rotary tables cover; at least data.seq_len")
    d_ff: int = doc("hidden width of the dense MLP blocks")
    ffn: str = doc("feed-forward of the sparse blocks: dense, peer, moe or pkm")
    sparse_layers: list = doc("block indices that get the `ffn` layer; [] means the middle block (the paper's choice)")
    tie_embeddings: bool = doc("share the input embedding and the output projection")
    rope_theta: float = doc("rotary base frequency")
    norm_eps: float = doc("RMSNorm epsilon")
    init_std: float = doc("std of the normal init of linear and embedding weights")
    peer: PeerConfig = doc("PEER settings, used where ffn=peer")
    moe: MoEConfig = doc("MoE settings, used where ffn=moe")
    # Last and optional so that models built in code without a memory need not name it; the
    # YAML schema still requires the key (conf/model/dense.yaml carries a block every model inherits).
    pkm: Optional[PKMConfig] = field(default=None, metadata={
        "doc": "PKM settings, used where ffn=pkm (the YAML always carries the block; null only for other ffn kinds)"})

    def sparse_layer_indices(self) -> list[int]:
        """Blocks that hold the `ffn` layer; every other block has a dense MLP."""
        if self.ffn == "dense":
            return []
        if not self.sparse_layers:
            return [self.num_layers // 2]
        return sorted(int(i) for i in self.sparse_layers)

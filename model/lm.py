"""Decoder-only language model: pre-norm blocks of rotary causal attention and an FFN.

Every block's FFN is a dense MLP, except the blocks in `cfg.sparse_layer_indices()`, which get
the `cfg.ffn` layer (PEER, DeepSpeed MoE, a PKM memory, or dense). Architecture only: parallelism is applied
to a built model from outside (orchestrator/parallel).

Legend (shape suffixes):
    B  batch
    T  sequence length (tokens per sequence)
    D  d_model
    H  attention heads
    C  head dim, D / H (C2 = C / 2, rotary frequency pairs)
    L  max_seq_len, positions the rotary tables cover
    V  vocab size
    S  positions held in a KV cache (the cached prefix plus this call's tokens)

Inference: `forward(tokens, cache=KVCache(...))` appends the tokens' keys and values to the cache
and attends over everything cached so far (prefill, then one token per decode step). Without a
cache the forward is the training path, unchanged. Every FFN kind (dense, PEER, PKM, MoE) works
token by token, so its decode path is its ordinary forward on [B, 1, D] (in eval mode: PEER's and
PKM's query BatchNorm then use their running statistics).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpointing import CHECKPOINT_MODES, checkpointed
from model.config import FFN_KINDS, ModelConfig
from model.mlp import DenseMLP
from model.moe import MoEFeedForward
from model.peer import PEER
from model.pkm import PKM


class LMOutput(NamedTuple):
    """loss = lm_loss + aux_loss (None without targets); aux_loss is 0 without MoE blocks."""

    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    logits: torch.Tensor  # [B, T, V]


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares loses precision in bf16.
        x_fp32 = x_D.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x_D.dtype) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, C2] for rotating pairs (i, i + C/2) of each head's dims by position * freq_i."""
    inv_freq_C2 = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles_LC2 = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq_C2)
    return angles_LC2.cos().float(), angles_LC2.sin().float()


def apply_rotary(x_BHTC: torch.Tensor, cos_TC2: torch.Tensor, sin_TC2: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) pairs of the head dim (GPT-NeoX layout)."""
    x1_BHTC2, x2_BHTC2 = x_BHTC.chunk(2, dim=-1)
    cos_TC2 = cos_TC2.to(x_BHTC.dtype)
    sin_TC2 = sin_TC2.to(x_BHTC.dtype)
    return torch.cat((x1_BHTC2 * cos_TC2 - x2_BHTC2 * sin_TC2, x1_BHTC2 * sin_TC2 + x2_BHTC2 * cos_TC2), dim=-1)


class KVCache:
    """Keys and values of every block for a batch of sequences being generated.

    k[layer], v[layer]: [B, H, L, C] buffers; positions 0 .. length-1 are filled. The model
    advances `length` after all blocks have appended a call's tokens.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, max_len: int | None = None) -> None:
        self.max_len = cfg.max_seq_len if max_len is None else min(max_len, cfg.max_seq_len)
        head_dim = cfg.d_model // cfg.num_attention_heads
        shape = (batch_size, cfg.num_attention_heads, self.max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0

    def append(self, layer: int, k_BHTC: torch.Tensor, v_BHTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's keys and values at positions length .. length+T-1; return [B, H, S, C] views."""
        end = self.length + k_BHTC.shape[2]
        self.k[layer][:, :, self.length:end] = k_BHTC
        self.v[layer][:, :, self.length:end] = v_BHTC
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, output_init_std: float) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.d_model // cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        nn.init.normal_(self.qkv.weight, mean=0.0, std=cfg.init_std)
        nn.init.normal_(self.out.weight, mean=0.0, std=output_init_std)
        cos_LC2, sin_LC2 = rotary_tables(self.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Non-persistent: recomputed from the config, so they stay out of checkpoints.
        self.register_buffer("rope_cos", cos_LC2, persistent=False)
        self.register_buffer("rope_sin", sin_LC2, persistent=False)

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, seq_len, d_model = x_BTD.shape
        qkv_BT3HC = self.qkv(x_BTD).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        q_BHTC, k_BHTC, v_BHTC = qkv_BT3HC.permute(2, 0, 3, 1, 4).unbind(0)
        start = 0 if cache is None else cache.length
        cos_TC2, sin_TC2 = self.rope_cos[start:start + seq_len], self.rope_sin[start:start + seq_len]
        q_BHTC = apply_rotary(q_BHTC, cos_TC2, sin_TC2)
        k_BHTC = apply_rotary(k_BHTC, cos_TC2, sin_TC2)
        if cache is None or start == 0:
            if cache is not None:
                cache.append(layer, k_BHTC, v_BHTC)
            att_BHTC = F.scaled_dot_product_attention(q_BHTC, k_BHTC, v_BHTC, is_causal=True)
        else:
            k_BHSC, v_BHSC = cache.append(layer, k_BHTC, v_BHTC)
            # Query i sits at position start + i and sees keys 0 .. start + i. One new token sees
            # every cached key, so decoding needs no mask at all.
            mask_TS = None
            if seq_len > 1:
                positions_S = torch.arange(start + seq_len, device=x_BTD.device)
                mask_TS = positions_S[None, :] <= (start + torch.arange(seq_len, device=x_BTD.device))[:, None]
            att_BHTC = F.scaled_dot_product_attention(q_BHTC, k_BHSC, v_BHSC, attn_mask=mask_TS)
        return self.out(att_BHTC.transpose(1, 2).reshape(batch, seq_len, d_model))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)). Returns (x, aux_loss)."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module, output_init_std: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, output_init_std)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn
        # What this block recomputes in the backward (model/checkpointing.py): "none", "block"
        # (the whole block) or "ffn" (its FFN only); set by TransformerLM.set_activation_checkpointing.
        self.recompute = "none"

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.recompute == "block" and cache is None:  # inference (a cache) keeps nothing for backward
            return checkpointed(self._forward, self, x_BTD)
        return self._forward(x_BTD, cache, layer)

    def _forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None,
                 layer: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Without a cache the call is the training one (a tensor-parallel attention takes x only).
        attn_in_BTD = self.attn_norm(x_BTD)
        x_BTD = x_BTD + (self.attn(attn_in_BTD) if cache is None else self.attn(attn_in_BTD, cache, layer))
        recompute_ffn = self.recompute == "ffn" and cache is None
        ffn = (lambda h: checkpointed(self._ffn, self.ffn, h)) if recompute_ffn else self._ffn
        ffn_BTD, aux_loss = ffn(self.ffn_norm(x_BTD))
        return x_BTD + ffn_BTD, aux_loss

    def _ffn(self, h_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(self.ffn, MoEFeedForward):
            return self.ffn(h_BTD)
        return self.ffn(h_BTD), None


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_parallel_size: int = 1) -> None:
        super().__init__()
        validate_model_shapes(cfg)
        self.cfg = cfg
        # Each block adds two residual branches (attention, FFN) to the stream. With 2L
        # independent additions the stream's variance at init grows like 2L * std^2; scaling
        # the branch output projections by 1/sqrt(2L) keeps it independent of depth (GPT-2).
        output_init_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        sparse_layers = set(cfg.sparse_layer_indices())

        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, mean=0.0, std=cfg.init_std)
        blocks = []
        for layer in range(cfg.num_layers):
            kind = cfg.ffn if layer in sparse_layers else "dense"
            blocks.append(Block(cfg, _build_ffn(cfg, kind, output_init_std, expert_parallel_size), output_init_std))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.tie_embeddings:
            self.lm_head = None  # logits use self.embed.weight
        else:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)

    def set_activation_checkpointing(self, mode: str) -> None:
        """none, blocks (recompute every block in the backward, keeping only its input) or sparse
        (recompute only the PEER/PKM/MoE FFNs, the layers with the widest activations)."""
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"activation checkpointing must be one of {CHECKPOINT_MODES}, got {mode!r}")
        for block in self.blocks:
            sparse = not isinstance(block.ffn, DenseMLP)
            block.recompute = {"none": "none", "blocks": "block", "sparse": "ffn" if sparse else "none"}[mode]

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None) -> LMOutput:
        """Next-token logits; with targets [B, T] (-100 = ignore), the mean cross-entropy too.

        With a cache, tokens_BT continue the cached sequences (positions cache.length onwards).
        """
        seq_len = tokens_BT.shape[1]
        end = seq_len + (0 if cache is None else cache.length)
        limit = self.cfg.max_seq_len if cache is None else cache.max_len
        if end > limit:
            raise ValueError(f"sequence length {end} exceeds model.max_seq_len={limit}")
        x_BTD = self.embed(tokens_BT)
        aux_losses = []
        for layer, block in enumerate(self.blocks):
            x_BTD, aux_loss = block(x_BTD, cache, layer)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        if cache is not None:
            cache.length = end
        logits_BTV = F.linear(self.final_norm(x_BTD), self.output_weight())
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else logits_BTV.new_zeros((), dtype=torch.float32)
        if targets_BT is None:
            return LMOutput(loss=None, lm_loss=None, aux_loss=aux_loss, logits=logits_BTV)
        lm_loss = F.cross_entropy(
            logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100
        )
        return LMOutput(loss=lm_loss + aux_loss, lm_loss=lm_loss, aux_loss=aux_loss, logits=logits_BTV)

    def peer_layers(self) -> Iterator[PEER]:
        for module in self.modules():
            if isinstance(module, PEER):
                yield module

    def usage_layers(self) -> Iterator[PEER | PKM | MoEFeedForward]:
        """The sparse layers whose expert usage the trainer measures at evaluation: PEER layers,
        PKM memories and MoE layers (same interface: track_usage, reset_usage, usage_counts,
        num_experts), so all report usage and KL-to-uniform through one path."""
        for module in self.modules():
            if isinstance(module, (PEER, PKM, MoEFeedForward)):
                yield module

    def moe_layers(self) -> Iterator[MoEFeedForward]:
        for module in self.modules():
            if isinstance(module, MoEFeedForward):
                yield module


def validate_model_shapes(cfg: ModelConfig) -> None:
    """Internal guards (ValueError); the orchestrator validates user configs first."""
    if cfg.ffn not in FFN_KINDS:
        raise ValueError(f"ffn must be one of {FFN_KINDS}, got {cfg.ffn!r}")
    for name in ("vocab_size", "d_model", "num_layers", "num_attention_heads", "max_seq_len", "d_ff"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.num_attention_heads:
        raise ValueError(f"num_attention_heads ({cfg.num_attention_heads}) must divide d_model ({cfg.d_model})")
    if (cfg.d_model // cfg.num_attention_heads) % 2:
        raise ValueError(f"head dim d_model / num_attention_heads must be even for rotary, got "
                         f"{cfg.d_model // cfg.num_attention_heads}")
    bad = [i for i in cfg.sparse_layer_indices() if not 0 <= i < cfg.num_layers]
    if bad:
        raise ValueError(f"sparse_layers {bad} out of range for num_layers={cfg.num_layers}")


def _build_ffn(cfg: ModelConfig, kind: str, output_init_std: float, expert_parallel_size: int) -> nn.Module:
    if kind == "dense":
        return DenseMLP(cfg.d_model, cfg.d_ff, cfg.init_std, output_init_std)
    if kind == "peer":
        return PEER(cfg.d_model, cfg.peer, cfg.init_std, output_init_std=output_init_std)
    if kind == "moe":
        return MoEFeedForward(cfg.d_model, cfg.moe, cfg.init_std, expert_parallel_size, output_init_std)
    if kind == "pkm":
        if cfg.pkm is None:
            raise ValueError("ffn='pkm' needs cfg.pkm (a PKMConfig)")
        return PKM(cfg.d_model, cfg.pkm, cfg.init_std, output_init_std=output_init_std)
    raise ValueError(f"unknown ffn kind {kind!r}")


def build_model(cfg: ModelConfig, expert_parallel_size: int = 1) -> TransformerLM:
    """The LM described by cfg; expert_parallel_size is DeepSpeed MoE's ep_size (MoE blocks only).

    PEER tables are built whole here; sharding them is parallelize()'s job.
    """
    return TransformerLM(cfg, expert_parallel_size)

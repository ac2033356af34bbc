"""KV-cache decoding against full recomputation, sampling filters, prompt checks.

Equality is exact for tokens (greedy argmax over the same logits) and within 1e-5 for logits:
the cached path computes the same attention over the same keys, but sums in another order
(one query against S keys instead of a causal S x S product), so float32 rounding may differ.
"""

from __future__ import annotations

import pytest
import torch

from model.config import PKMConfig
from model.lm import KVCache, build_model
from orchestrator.errors import ConfigError
from orchestrator.generate import TextStream, encode_prompt, generate, sample_next
from orchestrator.tokenizer import ByteTokenizer
from tests.unit.test_model_lm import gloo_world, tiny_config  # noqa: F401  (fixture)

PKM_TINY = PKMConfig(num_values=64, num_heads=2, top_k=4, d_key=8, query_batchnorm=True, impl="reference")


def _model(ffn: str, **overrides):
    import dataclasses

    # Untied and a large init: a tied, small-init model just repeats its last token.
    cfg = tiny_config(ffn, max_seq_len=32, tie_embeddings=False, init_std=0.3, **overrides)
    if ffn == "pkm":
        cfg = dataclasses.replace(cfg, pkm=PKM_TINY)
    if ffn == "moe":
        # As orchestrator/model_io.build_loaded_model does for generation: no capacity drops.
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, eval_capacity_factor=float(cfg.moe.num_experts)))
    torch.manual_seed(0)
    model = build_model(cfg)
    if ffn == "moe":
        from model.moe import init_moe_process_groups

        init_moe_process_groups(model)
    # Non-trivial BatchNorm statistics, as after training, so eval mode is exercised for real.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _check_cache_equals_recomputation(model):
    prompt = [3, 17, 5, 9, 42]
    with_cache = generate(model, prompt, 20, eos_id=-1)
    without = generate(model, prompt, 20, eos_id=-1, use_cache=False)
    assert with_cache == without
    assert len(set(with_cache)) > 1, "a constant output would not test much"
    # Logits of every position: prefill 5, then one token at a time, against one full forward.
    seq = torch.tensor([prompt + with_cache])
    full = model(seq).logits[0]
    cache = KVCache(model.cfg, 1, "cpu")
    pieces = [model(seq[:, :5], cache=cache).logits[0]]
    pieces += [model(seq[:, t:t + 1], cache=cache).logits[0] for t in range(5, seq.shape[1])]
    torch.testing.assert_close(torch.cat(pieces), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ffn", ["dense", "peer", "pkm"])
def test_greedy_with_kv_cache_equals_full_recomputation(ffn):
    _check_cache_equals_recomputation(_model(ffn, sparse_layers=[0, 2]))


def test_greedy_with_kv_cache_equals_full_recomputation_moe(gloo_world):  # noqa: F811
    _check_cache_equals_recomputation(_model("moe", sparse_layers=[1]))


def test_chunked_prefill_matches_one_forward():
    """A cache filled in pieces of several tokens (a mask offset by the cached length)."""
    model = _model("peer")
    seq = torch.randint(0, model.cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.cfg, 3, "cpu")
    pieces = [model(seq[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(seq).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        model(seq[:, :13], cache=cache)  # 20 cached + 13 > max_seq_len 32


def test_generation_stops_at_end_of_document():
    model = _model("dense")
    free_run = generate(model, [1, 2, 3], 10, eos_id=-1)
    stop_at = free_run[4]
    stopped = generate(model, [1, 2, 3], 10, eos_id=stop_at)
    assert stopped == free_run[:free_run.index(stop_at) + 1]


def test_sampling_filters_and_seed():
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0, -1.0])
    assert sample_next(logits, 0.0, 0, 1.0, None, None) == 1
    assert sample_next(logits, 1.0, 0, 1.0, 1, torch.Generator().manual_seed(0)) == 0  # vocab_limit
    top1 = {sample_next(logits, 5.0, 1, 1.0, None, torch.Generator().manual_seed(s)) for s in range(20)}
    assert top1 == {1}
    top2 = {sample_next(logits, 5.0, 2, 1.0, None, torch.Generator().manual_seed(s)) for s in range(50)}
    assert top2 == {1, 2}
    # softmax([0,3,2,1,-1]): p(1) = 0.64, p(2) = 0.24; top_p 0.7 keeps exactly {1, 2}.
    nucleus = {sample_next(logits, 1.0, 0, 0.7, None, torch.Generator().manual_seed(s)) for s in range(100)}
    assert nucleus == {1, 2}
    a = [sample_next(logits, 1.0, 0, 1.0, None, g) for g in [torch.Generator().manual_seed(7)] * 10]
    b = [sample_next(logits, 1.0, 0, 1.0, None, g) for g in [torch.Generator().manual_seed(7)] * 10]
    assert a == b


def test_prompt_encoding_and_streaming(capsys):
    tok = ByteTokenizer()
    assert encode_prompt(tok, "hi", 257) == [256, 104, 105]
    assert encode_prompt(tok, "", 257) == [256]
    with pytest.raises(ConfigError, match="cannot be encoded"):
        encode_prompt(tok, "bad \udcff", 257)  # a lone surrogate (what argv gives for invalid bytes)
    with pytest.raises(ConfigError, match="beyond the model's vocabulary"):
        encode_prompt(tok, "hi", 100)

    import io

    out = io.StringIO()
    stream = TextStream(tok, out)
    for b in "é!".encode("utf-8"):  # the first byte of é alone is held back, not printed as U+FFFD
        stream(b)
        assert "\ufffd" not in out.getvalue()
    stream(256)
    stream.finish()
    assert out.getvalue() == "é!"

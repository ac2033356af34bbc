"""Sample text from a trained model, streamed to stdout, with a KV cache.

    python -m orchestrator.generate <run dir | checkpoint dir | step dir | export | URL> \\
        --prompt "def main(" --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 0

One process, whatever layout trained the model (orchestrator/model_io.py reads it whole); CPU or
CUDA (--device). Every sample starts with the tokenizer's end-of-document token, so the prompt is
read as the start of a document (training data separates documents with it), and stops when the
model emits end-of-document or after --max-new-tokens. The prompt and the new tokens must fit the
model's context (model.max_seq_len): a longer request is refused, not slid, because rotary
positions are absolute and sliding would recompute the whole window at every step (no cache).

Sampling: logits / temperature (0 = greedy, argmax), then top-k, then top-p (nucleus) filtering,
from one torch.Generator seeded by --seed, so a seed gives the same samples on the same device.
MoE layers route every token (no capacity drops; orchestrator/model_io.build_loaded_model), so the
text does not depend on how the tokens are grouped into calls: with or without the cache, greedy
decoding gives the same tokens (tests/unit/test_generate.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Optional

import torch

from orchestrator.errors import USER_ERROR_EXIT_CODE, ConfigError


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, *, eos_id: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, vocab_limit: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             on_token: Optional[Callable[[int], None]] = None) -> list[int]:
    """New token ids after prompt_ids (one sequence), stopping after eos_id (included) or
    max_new_tokens. use_cache=False recomputes the whole sequence at every step (the reference the
    cache is tested against). vocab_limit: ids at or above it (a padded model vocabulary) are never
    sampled."""
    from model.lm import KVCache

    device = next(model.parameters()).device
    tokens = list(prompt_ids)
    new: list[int] = []
    cache = KVCache(model.cfg, 1, device, dtype=model.output_weight().dtype,
                    max_len=len(tokens) + max_new_tokens) if use_cache else None
    step_input = torch.tensor([tokens], device=device)
    for _ in range(max_new_tokens):
        if use_cache:
            logits_V = model(step_input, cache=cache).logits[0, -1]
        else:
            logits_V = model(torch.tensor([tokens], device=device)).logits[0, -1]
        token = sample_next(logits_V, temperature, top_k, top_p, vocab_limit, generator)
        tokens.append(token)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id:
            break
        step_input = torch.tensor([[token]], device=device)
    return new


def sample_next(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float,
                vocab_limit: Optional[int], generator: Optional[torch.Generator]) -> int:
    """One token id from next-token logits [V]."""
    logits_V = logits_V.float()
    if vocab_limit is not None and vocab_limit < logits_V.numel():
        logits_V = logits_V.clone()
        logits_V[vocab_limit:] = float("-inf")
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if top_k > 0 and top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs_V, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs_V = torch.zeros_like(probs_V).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs_V.cpu(), 1, generator=generator))


class TextStream:
    """Prints decoded text as tokens arrive; holds back an incomplete UTF-8 character (its bytes
    decode to U+FFFD until the rest arrives)."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        self._emit(final=False)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self) -> None:
        self._emit(final=True)


def encode_prompt(tokenizer, text: str, model_vocab_size: int) -> list[int]:
    """[eos] + the prompt's ids; ConfigError when the tokenizer cannot encode it."""
    try:
        ids = [int(i) for i in tokenizer.encode(text)]
    except UnicodeError as exc:
        raise ConfigError("--prompt", text, f"cannot be encoded ({exc.reason} at position {exc.start})",
                          "give valid UTF-8 text") from None
    if text and not ids:
        raise ConfigError("--prompt", text, "the tokenizer encodes it to no tokens", "give other text")
    if any(i >= model_vocab_size for i in ids):
        raise ConfigError("--prompt", text, f"encodes to ids beyond the model's vocabulary of {model_vocab_size}",
                          "use the tokenizer the model was trained with")
    return [tokenizer.eos_id] + ids


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="run dir, checkpoint dir, step dir, export folder, or an fsspec URL of one")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default="", help="text the samples continue (default: empty, a new document)")
    g.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set of mass >= p; 1 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow; a check)")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    checks = [("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "give 1 or more"),
              ("--temperature", args.temperature, args.temperature >= 0, "give 0 (greedy) or more"),
              ("--top-k", args.top_k, args.top_k >= 0, "give 0 (off) or more"),
              ("--top-p", args.top_p, 0 < args.top_p <= 1, "give a number in (0, 1]"),
              ("--num-samples", args.num_samples, args.num_samples >= 1, "give 1 or more"),
              ("--seed", args.seed, args.seed >= 0, "give 0 or more")]
    for key, value, ok, fix in checks:
        if not ok:
            raise ConfigError(key, value, "out of range", fix)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        _check_args(args)
        return _run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE


def _run(args: argparse.Namespace) -> int:
    from orchestrator.model_io import build_loaded_model, read_model_state, resolve_device, tokenizer_spec
    from orchestrator.tokenizer import load_tokenizer

    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as exc:
            raise ConfigError("--prompt-file", args.prompt_file, exc.strerror or str(exc), "give a readable file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError("--prompt-file", args.prompt_file, f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                              "save the prompt as UTF-8") from None
    else:
        prompt = args.prompt
    device = resolve_device(args.device)
    state = read_model_state(args.source)
    tokenizer = load_tokenizer(tokenizer_spec(state))
    vocab_size = state.config["model"]["vocab_size"]
    prompt_ids = encode_prompt(tokenizer, prompt, vocab_size)
    context = state.config["model"]["max_seq_len"]
    if len(prompt_ids) + args.max_new_tokens > context:
        room = context - len(prompt_ids)
        fix = f"use --max-new-tokens<={room}" if room >= 1 else "shorten the prompt"
        raise ConfigError("--max-new-tokens", args.max_new_tokens,
                          f"the prompt ({len(prompt_ids)} tokens with the leading end-of-document) plus the new "
                          f"tokens exceed the model's context of {context} tokens (model.max_seq_len; refused, "
                          "not slid)", fix)
    # stdout carries only the samples: DeepSpeed prints its set-up lines (MoE groups, op builds).
    with contextlib.redirect_stdout(sys.stderr):
        model = build_loaded_model(state, device, route_every_token=True)
    print(f"# {state.kind} {state.source} step {state.step}; {state.config['model']['ffn']} model on {device.type}",
          file=sys.stderr, flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n# sample {i + 1}/{args.num_samples}", file=sys.stderr, flush=True)
        sys.stdout.write(prompt)
        stream = TextStream(tokenizer)
        new = generate(model, prompt_ids, args.max_new_tokens, eos_id=tokenizer.eos_id, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, vocab_limit=tokenizer.vocab_size, generator=generator,
                       use_cache=not args.no_cache, on_token=stream)
        stream.finish()
        sys.stdout.write("\n")
        sys.stdout.flush()
        stop = "end of document" if new and new[-1] == tokenizer.eos_id else f"--max-new-tokens={args.max_new_tokens}"
        print(f"# {len(new)} new tokens; stopped by {stop}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

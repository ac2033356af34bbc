"""Parts of orchestrator/engine/ that need no process group: the LR schedule and its continuation
on resume, the gradient norm in one process, StepResult and Evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.config import OptimConfig
from orchestrator.engine import Evaluation, LRSchedule, StepResult, StopVote, continue_schedule, lr_lambda
from orchestrator.engine.grad_norm import clip_gradients, global_grad_norm


def _optim(**kw) -> OptimConfig:
    values = dict(lr=3e-3, min_lr_ratio=0.1, warmup_steps=2, decay_steps=None, weight_decay=0.1, beta1=0.9,
                  beta2=0.95, eps=1e-8, grad_clip=1.0)
    values.update(kw)
    return OptimConfig(**values)


def test_schedule_is_warmup_then_cosine_then_flat():
    s = lr_lambda(_optim(), max_steps=12)  # decays over 10 steps after 2 of warmup
    assert (s.warmup_steps, s.decay_steps) == (2, 10)
    assert [s(0), s(1)] == [0.5, 1.0]
    assert s(2) == 1.0 and s(7) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(12) == s(100) == pytest.approx(0.1)


def test_scheduler_state_carries_the_decay_horizon():
    param = torch.nn.Parameter(torch.zeros(1))
    make = lambda horizon: torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([param], lr=1.0), LRSchedule(2, horizon, 0.1))
    saved = make(6).state_dict()
    other = make(50)
    other.load_state_dict(saved)
    assert other.lr_lambdas[0].decay_steps == 6


def test_extending_a_run_keeps_the_checkpoints_horizon():
    schedule = lr_lambda(_optim(), max_steps=20)
    line = continue_schedule(schedule, _optim(), 20, 8, saved_decay_steps=6, saved_config={})
    assert schedule.decay_steps == 6
    assert line.startswith("extending run: LR schedule continues from step 8 with the checkpoint's decay horizon")
    # A checkpoint from before the horizon was recorded: derived from its config.
    schedule = lr_lambda(_optim(), max_steps=20)
    saved_config = {"trainer": {"max_steps": 8}, "optim": {"decay_steps": None, "warmup_steps": 2}}
    assert continue_schedule(schedule, _optim(), 20, 8, None, saved_config) is not None
    assert schedule.decay_steps == 6


def test_same_length_says_nothing_and_an_explicit_horizon_wins():
    schedule = lr_lambda(_optim(), max_steps=8)
    assert continue_schedule(schedule, _optim(), 8, 4, saved_decay_steps=6, saved_config={}) is None
    assert schedule.decay_steps == 6
    schedule = lr_lambda(_optim(decay_steps=30), max_steps=8)
    line = continue_schedule(schedule, _optim(decay_steps=30), 8, 4, saved_decay_steps=6, saved_config={})
    assert schedule.decay_steps == 30 and "optim.decay_steps=30 replaces the checkpoint's decay horizon of 6" in line


def test_global_grad_norm_in_one_process_is_the_norm_of_all_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model(torch.randn(5, 8)).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    expected = torch.nn.utils.get_total_norm(grads).double()
    norm = global_grad_norm(model.parameters(), device=torch.device("cpu"))
    assert norm.dtype == torch.float64 and float(norm) == pytest.approx(float(expected), rel=1e-6)
    # The last stage's copy of a tied embedding is not counted twice.
    model[2].weight.ds_pipe_replicated = True
    without = global_grad_norm(model.parameters(), device=torch.device("cpu"))
    assert float(without) ** 2 == pytest.approx(float(expected) ** 2 - float(model[2].weight.grad.norm()) ** 2, rel=1e-5)


def test_clipping_scales_by_min_one_clip_over_norm():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    norm = global_grad_norm([p], device=torch.device("cpu"))
    clip_gradients([p], 1.0, norm)
    assert torch.allclose(p.grad, torch.tensor([3.0, 4.0, 0.0]) / (5.0 + 1e-6))
    clip_gradients([p], 10.0, norm)  # coef capped at 1
    assert torch.allclose(p.grad, torch.tensor([3.0, 4.0, 0.0]) / (5.0 + 1e-6))


def test_step_result_and_evaluation_values():
    assert StepResult(torch.zeros(()), torch.tensor(2.5, dtype=torch.float64), False).grad_norm_value() == 2.5
    assert StepResult(torch.zeros(()), 1.5, False).grad_norm_value() == 1.5
    assert math.isnan(StepResult(torch.zeros(()), None, False).grad_norm_value())
    ev = Evaluation(2.0, [0.5, 0.25], [1.0, 3.0])
    m = ev.metrics()
    assert m["val_perplexity"] == pytest.approx(math.exp(2.0)) and m["expert_usage"] == 0.375
    assert m["expert_kl_uniform_1"] == 3.0 and "expert usage 37.5%" in ev.summary()
    assert Evaluation(1.0).metrics().keys() == {"val_loss", "val_perplexity"}


def test_stop_vote_without_a_process_group_is_the_local_flag():
    vote = StopVote()
    assert vote.cast(True)() is True and vote.cast(False)() is False

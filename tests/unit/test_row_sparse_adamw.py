"""orchestrator/row_sparse_adamw.py: lazy AdamW on the PEER tables' retrieved rows, AdamW elsewhere.

- against a float64 lazy AdamW written out here (per-row step counts, decoupled decay), on a small
  PEER layer trained for several steps of two accumulated micro-batches each: the rows come from
  the layer's own retrieval, the reference computes them from a copy of the layer;
- rows not retrieved in a step: weights, both moments and the row step count bitwise unchanged;
- every row retrieved every step: torch AdamW, the fused path and the single-tensor one;
- the parameters that are not tables: bitwise the AdamW that orchestrator/optim.py builds;
- state_dict round trip keeps the per-row counts int64 (torch would cast them to float32), and the
  tables follow the learning rate of the loaded param groups.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model.config import PeerConfig
from model.peer import PEER
from orchestrator.config import OptimConfig
from orchestrator.optim import build_optimizer
from orchestrator.row_sparse_adamw import RowSparseAdamW

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1


def _optim_config(**kw) -> OptimConfig:
    values = dict(lr=LR, min_lr_ratio=0.1, warmup_steps=0, decay_steps=None, weight_decay=WD, beta1=BETAS[0],
                  beta2=BETAS[1], eps=EPS, grad_clip=1.0, expert_tables="row_sparse")
    values.update(kw)
    return OptimConfig(**values)


def _peer(num_experts=64, d=16) -> PEER:
    torch.manual_seed(0)
    cfg = PeerConfig(num_experts=num_experts, num_heads=2, top_k=2, d_key=8, query_batchnorm=True, activation="gelu",
                     impl="reference")
    return PEER(d, cfg, init_std=0.2, output_init_std=0.2)


def _groups(layer: PEER, table_decay: float) -> list[dict]:
    """Tables with their own weight decay (0 in training's param_groups; non-zero here so that the
    decay of retrieved rows is checked too)."""
    tables = [layer.expert_down.weight, layer.expert_up.weight]
    others = [p for p in layer.parameters() if all(p is not t for t in tables)]
    return [{"params": tables, "weight_decay": table_decay}, {"params": others, "weight_decay": WD}]


class LazyAdamW64:
    """The reference: float64, per-row step counts, rows given by the caller."""

    def __init__(self, table: torch.Tensor, weight_decay: float):
        self.p = table.detach().double().clone()
        self.m = torch.zeros_like(self.p)
        self.v = torch.zeros_like(self.p)
        self.t = torch.zeros(table.shape[0], dtype=torch.int64)
        self.wd = weight_decay

    def step(self, grad: torch.Tensor, rows: set[int]) -> None:
        b1, b2 = BETAS
        g = grad.double()
        for i in sorted(rows):
            self.t[i] += 1
            t = int(self.t[i])
            self.p[i] *= 1 - LR * self.wd
            self.m[i] = b1 * self.m[i] + (1 - b1) * g[i]
            self.v[i] = b2 * self.v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = self.m[i] / (1 - b1 ** t), self.v[i] / (1 - b2 ** t)
            self.p[i] -= LR * m_hat / (v_hat.sqrt() + EPS)


def test_matches_float64_lazy_adamw_and_leaves_unretrieved_rows_bitwise():
    layer = _peer()
    opt = build_optimizer(_groups(layer, table_decay=0.05), _optim_config(), model=layer)
    assert isinstance(opt, RowSparseAdamW)
    tables = {"U": layer.expert_down.weight, "V": layer.expert_up.weight}
    refs = {name: LazyAdamW64(t, 0.05) for name, t in tables.items()}
    gen = torch.Generator().manual_seed(1)
    seen_rows: set[int] = set()
    for step in range(4):
        rows: set[int] = set()
        for _micro in range(2):  # gradient accumulation: the rows of both micro-batches
            x = torch.randn(12, 16, generator=gen)
            _, idx = copy.deepcopy(layer).route(x)  # the reference's own view of the retrieval
            rows |= set(idx.flatten().tolist())
            (layer(x) * torch.randn(12, 16, generator=gen)).sum().backward()
        assert rows and len(rows) < 64, "the test needs retrieved and unretrieved rows in every step"
        before = {n: (t.detach().clone(), {k: v.clone() for k, v in opt.state[t].items()} if t in opt.state else None)
                  for n, t in tables.items()}
        for name, t in tables.items():
            refs[name].step(t.grad, rows)
        opt.step()
        opt.zero_grad()
        seen_rows |= rows
        untouched = torch.tensor([i not in rows for i in range(64)])
        for name, t in tables.items():
            # Float32 against float64: the same update, rounded to float32 once per operation;
            # a few ulp of values of order 0.2-1 after 4 steps.
            torch.testing.assert_close(t.detach().double(), refs[name].p, rtol=0, atol=2e-6)
            state = opt.state[t]
            # The moments: float32 rounding of terms of the gradients' size (|g| up to about 1, ulp
            # 6e-8); where b1 m and (1 - b1) g cancel, that absolute error remains.
            torch.testing.assert_close(state["exp_avg"].double(), refs[name].m, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(state["exp_avg_sq"].double(), refs[name].v, rtol=1e-5, atol=1e-9)
            assert torch.equal(state["row_step"], refs[name].t)
            assert state["row_step"].dtype == torch.int64 and float(state["step"]) == step + 1
            old_weight, old_state = before[name]
            assert torch.equal(t.detach()[untouched], old_weight[untouched]), f"{name}: an unretrieved row moved"
            for key in ("exp_avg", "exp_avg_sq", "row_step"):
                old = old_state[key][untouched] if old_state else torch.zeros_like(state[key][untouched])
                assert torch.equal(state[key][untouched], old), f"{name}.{key}: an unretrieved row changed"
        assert not layer.retrieved_rows.any(), "the step clears the record"
    never = torch.tensor([i not in seen_rows for i in range(64)])
    assert never.any() and torch.equal(opt.state[tables["U"]]["exp_avg"][never], torch.zeros(int(never.sum()), 16))


def test_evaluation_forwards_mark_no_rows():
    layer = _peer()
    build_optimizer(_groups(layer, 0.0), _optim_config(), model=layer)
    with torch.no_grad():
        layer(torch.randn(8, 16))
    layer.eval()
    with torch.enable_grad():
        layer(torch.randn(8, 16))
    assert not layer.retrieved_rows.any()


@pytest.mark.parametrize("fused", [True, False])
def test_every_row_retrieved_every_step_is_adamw(fused):
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(32, 8))
    dense = torch.nn.Parameter(torch.randn(8, 8))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in (table, dense)]
    mask = torch.zeros(32, dtype=torch.bool)
    kwargs = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **({"fused": True} if fused else {"foreach": False}))
    opt = RowSparseAdamW([{"params": [table]}, {"params": [dense], "weight_decay": 0.0}], [(mask, [table])], **kwargs)
    ref_opt = torch.optim.AdamW([{"params": ref[:1]}, {"params": ref[1:], "weight_decay": 0.0}], **kwargs)
    for _ in range(6):
        grads = [torch.randn(32, 8), torch.randn(8, 8)]
        for ps, o in (((table, dense), opt), (ref, ref_opt)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        mask.fill_(True)
        opt.step()
        ref_opt.step()
    # The dense parameter takes torch's own step: bitwise.
    assert torch.equal(dense, ref[1]) and torch.equal(opt.state[dense]["exp_avg"], ref_opt.state[ref[1]]["exp_avg"])
    # The table: the same arithmetic as the single-tensor path but with the bias corrections as
    # float32 tensors (per row) instead of Python floats, and, against the fused kernel, another
    # operation order: fp32 rounding, a few ulp per step on values of order 1 (as tests/unit/
    # test_optim.py allows between torch's own two paths). The moments see the same gradients
    # through the same lerp/addcmul: equal to rounding too.
    s, r = opt.state[table], ref_opt.state[ref[0]]
    torch.testing.assert_close(table, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["exp_avg"], r["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"], rtol=1e-6, atol=1e-8)
    assert torch.equal(s["row_step"], torch.full((32,), 6)) and float(s["step"]) == float(r["step"]) == 6


def test_non_table_parameters_take_the_default_adamw_bitwise():
    layer, twin = _peer(), _peer()
    sparse = build_optimizer(_groups(layer, 0.0), _optim_config(), model=layer)
    dense = build_optimizer(_groups(twin, 0.0), _optim_config(expert_tables="adamw"))
    assert type(dense) is torch.optim.AdamW and sparse.defaults["fused"] is dense.defaults["fused"] is True
    x, w = torch.randn(12, 16), torch.randn(12, 16)
    for m, o in ((layer, sparse), (twin, dense)):
        (m(x) * w).sum().backward()
        o.step()
    for (name, a), b in zip(layer.named_parameters(), twin.parameters()):
        if not name.startswith("expert_"):
            assert torch.equal(a, b), name


def test_state_dict_round_trip_keeps_row_counts_integer():
    layer = _peer()
    opt = build_optimizer(_groups(layer, 0.0), _optim_config(), model=layer)
    (layer(torch.randn(12, 16)).sum()).backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other_layer = _peer()
    other = build_optimizer(_groups(other_layer, 0.0), _optim_config(), model=other_layer)
    other.load_state_dict(saved)
    for a, b in zip(layer.parameters(), other_layer.parameters()):
        for key, value in opt.state[a].items():
            assert other.state[b][key].dtype == value.dtype and torch.equal(other.state[b][key], value), key
    assert other.state[other_layer.expert_down.weight]["row_step"].dtype == torch.int64
    # load_state_dict replaces the group dicts; the tables must follow the lr the schedule now
    # writes there (a stale group would keep stepping the tables at the old lr after a resume).
    for group in other.param_groups:
        group["lr"] = 0.0
    before = other_layer.expert_down.weight.detach().clone()
    other_layer(torch.randn(12, 16)).sum().backward()
    other.step()
    assert other_layer.retrieved_rows.sum() == 0 and torch.equal(other_layer.expert_down.weight, before)


def test_a_checkpoint_from_before_the_key_resumes_as_adamw():
    from orchestrator.checkpoint.manager import config_differences

    saved = {"optim": {"lr": LR}}  # a config written before optim.expert_tables existed
    assert config_differences(saved, {"optim": {"lr": LR, "expert_tables": "adamw"}}) == []
    assert config_differences(saved, {"optim": {"lr": LR, "expert_tables": "row_sparse"}}) == [
        "optim.expert_tables (adamw -> row_sparse)"]

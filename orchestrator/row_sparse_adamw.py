"""Row-sparse (lazy) AdamW for the PEER expert tables: `optim.expert_tables=row_sparse`.

A step of a PEER model retrieves a few rows of each expert table (at most tokens x h x k of N;
16 x 128 tokens x 4 heads x 8 = 65,536 of 1024^2 in experiment=peer_1m_cpu), but dense AdamW
passes over all N rows of U, V and both moments every step. This optimizer is torch's AdamW
(orchestrator/optim.py's fused path, unchanged) for every parameter except the U and V tables of
the PEER layers, which it updates only at the rows retrieved in the step, by any token, head or
micro-batch of the accumulation, on any data-parallel rank:

    for each retrieved row i:   t_i += 1                      (a per-row step count)
        u_i  <- u_i (1 - lr wd)                               (the group's weight decay; U and V are in
                                                               the no-decay group today, so wd = 0)
        m_i  <- beta1 m_i + (1 - beta1) g_i
        v_i  <- beta2 v_i + (1 - beta2) g_i^2
        u_i  <- u_i - lr / (1 - beta1^t_i) * m_i / (sqrt(v_i) / sqrt(1 - beta2^t_i) + eps)
    every other row: u_i, m_i, v_i, t_i untouched (bitwise).

How it differs from AdamW on the tables (the lazy Adam of TF's LazyAdam, with decoupled decay):
- a row not retrieved in a step gets no update at all: no weight decay, no decay of its moments,
  and no movement along its old momentum (dense AdamW still moves it by m/(sqrt(v)+eps) while m
  decays, although its gradient is exactly zero);
- bias correction uses the row's own step count t_i (the steps that retrieved it), not the global
  step, so a row's first update after init is a full-size Adam step whatever the global step is;
- "retrieved" means retrieved, not "non-zero gradient": a retrieved row whose gradient happens to
  be zero (a relu expert that did not fire) still takes its step (moment decay, momentum);
- when every row is retrieved every step it is AdamW, to float32 rounding (tests/unit/
  test_row_sparse_adamw.py).

Which rows: each PEER layer records a bool mask [N] of the rows its training forwards retrieved
(model/peer.py `track_retrieved_rows`; O(tokens x h x k) per forward, OR-ed over the micro-batches
of the accumulation), and the optimizer all-reduces it (MAX, N bytes) over the data-parallel group,
because the averaged gradient of a row is non-zero on every replica once any replica retrieved it.
Under expert parallelism each ep rank's shard is touched by the rows of every token of its ep
group (DimShardedPEER records the group's indices), so the mask, and with it the per-row step
counts, are the same on every rank: they are replicated state, like the rows themselves. Why a
mask and not the rows with non-zero gradient: the mask costs a memset of N bytes and a scatter of
tokens x h x k, the gradient scan reads all N x d numbers of both gradients (bench/RESULTS.md,
"A million experts", measured), and it would depend on each ep shard's columns.

It runs where DeepSpeed calls `optimizer.step()` on this object itself: ZeRO 0, fp32, no pipeline
(orchestrator/validation.py refuses the rest); gradient clipping happens before, as for AdamW.

State per table: AdamW's `exp_avg`, `exp_avg_sq` ([N, d] like the table) and `step` (the global
count of optimizer steps, a float32 scalar as torch keeps it) plus `row_step` (int64 [N], t_i).
Checkpoints carry `row_step` in the layout-free state (portable.py: declared as the table's rows,
the same on every rank holding a column slice), so a resume is exact in the same layout and in
another.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

ROW_STATE_KEYS = ("row_step",)


class RowSparseAdamW(torch.optim.AdamW):
    """torch AdamW (any of its kwargs) whose `tables` parameters get the lazy row update above.

    tables: (mask, [parameters]) pairs: the parameters are [N, c] tables whose rows the bool mask
    [N] says were retrieved (a PEER layer's U and V with its `track_retrieved_rows()` mask). The
    masks are cleared by `step`. dp_group / dp_size: the data-parallel group the masks are OR-ed
    over (None: the default group; dp_size 1: none)."""

    def __init__(self, params, tables: Iterable[tuple[torch.Tensor, list[torch.nn.Parameter]]],
                 dp_group=None, dp_size: int = 1, **adamw_kwargs):
        super().__init__(params, **adamw_kwargs)
        if self.defaults.get("amsgrad") or self.defaults.get("maximize") or self.defaults.get("capturable"):
            raise ValueError("RowSparseAdamW supports plain AdamW only (no amsgrad, maximize or capturable)")
        self._tables = [(mask, list(ps)) for mask, ps in tables]
        self._table_ids = {id(p) for _, ps in self._tables for p in ps}
        in_groups = {id(p) for g in self.param_groups for p in g["params"]}
        missing = self._table_ids - in_groups
        if missing:
            raise ValueError(f"{len(missing)} expert table(s) are in no parameter group of the optimizer")
        self.dp_group, self.dp_size = dp_group, dp_size

    def per_row_state_keys(self, param) -> tuple[str, ...]:
        """State keys of `param` that hold one value per row ([N]): read by the checkpoint's
        layout-free state (orchestrator/checkpoint/portable.py)."""
        return ROW_STATE_KEYS if id(param) in self._table_ids else ()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The tables' gradients are hidden from AdamW's own step (it skips parameters without a
        # gradient), so everything else takes exactly the fused/foreach update it takes today.
        hidden = []
        for _, ps in self._tables:
            for p in ps:
                hidden.append((p, p.grad))
                p.grad = None
        try:
            super().step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        # Looked up every step: load_state_dict replaces the group dicts (and the LR schedule
        # writes the lr of the current ones).
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for mask, ps in self._tables:
            rows = self._retrieved(mask)
            for p in ps:
                if p.grad is not None:
                    self._update_rows(p, group_of[id(p)], rows)
            mask.zero_()
        return loss

    def _retrieved(self, mask: torch.Tensor) -> torch.Tensor:
        """Sorted indices of the rows any data-parallel rank retrieved (the same on every rank)."""
        if self.dp_size > 1:
            flags = mask.to(torch.uint8)  # gloo reduces no bool tensors
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.dp_group)
            mask = flags.bool()
        return mask.nonzero().squeeze(1)

    def _update_rows(self, p: torch.nn.Parameter, group: dict, rows: torch.Tensor) -> None:
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if group.get("fused") else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
        if "row_step" not in state:
            # Moments from a dense AdamW (a warm start with checkpoint.init_optimizer): every row
            # took `step` steps there, so that count continues its bias correction exactly.
            state["row_step"] = torch.full((p.shape[0],), int(state.get("step", 0)), dtype=torch.int64, device=p.device)
        state["step"] += 1
        if rows.numel() == 0:
            return
        row_step = state["row_step"]
        t = row_step.index_select(0, rows) + 1
        row_step.index_copy_(0, rows, t)
        # Bias corrections per row in float64 (torch's kernels use Python floats), then the
        # table's dtype; [R, 1] so that they broadcast over the row's columns.
        t64 = t.double()
        step_size = (lr / (1.0 - beta1 ** t64)).to(p.dtype).unsqueeze(1)
        bias_correction2_sqrt = (1.0 - beta2 ** t64).sqrt().to(p.dtype).unsqueeze(1)
        for start in range(0, rows.numel(), self.CHUNK_ROWS):
            end = min(start + self.CHUNK_ROWS, rows.numel())
            self._update_chunk(p, state, rows[start:end], step_size[start:end], bias_correction2_sqrt[start:end],
                               lr * wd, beta1, beta2, eps)

    # Rows per pass: the gathered rows live in four reused scratch buffers of CHUNK_ROWS x c
    # (8 MB each at c = 128), because a fresh allocation of that size per step costs more than
    # the arithmetic on it (the allocator maps and faults in new pages every time; measured in
    # bench/RESULTS.md, "A million experts"), and the memory stays bounded whatever the rows.
    CHUNK_ROWS = 16384

    def _scratch(self, p: torch.Tensor, rows: int) -> list[torch.Tensor]:
        shape = (self.CHUNK_ROWS, *p.shape[1:])
        key = (shape, p.dtype, p.device)
        if getattr(self, "_scratch_key", None) != key:
            self._scratch_key = key
            self._scratch_buffers = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in range(4)]
        return [b[:rows] for b in self._scratch_buffers]

    def _update_chunk(self, p, state, rows, step_size, bias_correction2_sqrt, decay, beta1, beta2, eps) -> None:
        """AdamW on the rows `rows` of p (torch's single-tensor order of operations, per row)."""
        g, m, v, w = self._scratch(p, rows.numel())
        torch.index_select(p.grad, 0, rows, out=g)
        torch.index_select(state["exp_avg"], 0, rows, out=m)
        torch.index_select(state["exp_avg_sq"], 0, rows, out=v)
        torch.index_select(p, 0, rows, out=w)
        if decay != 0.0:
            w.mul_(1.0 - decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = torch.sqrt(v, out=g).div_(bias_correction2_sqrt).add_(eps)  # g is no longer needed
        w.sub_(torch.div(m, denom, out=denom).mul_(step_size))
        p.index_copy_(0, rows, w)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, but per-row step counts stay integers: torch casts every floating-point-param's
        state tensor except `step` to the parameter's dtype."""
        saved = {pid: {k: s[k] for k in ROW_STATE_KEYS if k in s} for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        for pid, p in zip(ids, params):
            for key, value in saved.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.int64).clone()


def peer_tables(model: torch.nn.Module) -> list[tuple[torch.Tensor, list[torch.nn.Parameter]]]:
    """(retrieved-rows mask, [U, V]) of every PEER layer of `model`, recording switched on."""
    from model.peer import PEER

    out = []
    for module in model.modules():
        if isinstance(module, PEER):
            tables = [module.expert_down.weight, module.expert_up.weight]
            out.append((module.track_retrieved_rows(), [p for p in tables if p.requires_grad]))
    return out


def build_row_sparse_adamw(param_groups: list[dict], model: torch.nn.Module, dp_group: Optional[object],
                           dp_size: int, **adamw_kwargs) -> RowSparseAdamW:
    return RowSparseAdamW(param_groups, peer_tables(model), dp_group=dp_group, dp_size=dp_size, **adamw_kwargs)

"""Fused PEER expert compute (model/kernels/) against the reference (the paper's Algorithm 1).

Compared: the output y and the gradients of x, U, V and the gates, on random inputs with
non-power-of-two d, k, heads and token counts, duplicate indices within a token, and every token
retrieving one expert (the worst case for row-gradient accumulation).

Tolerances:
- chunked backend (torch ops) in float64 against the float64 reference: the same sums in another
  order, so 1e-10 relative is rounding.
- Triton backend in float32 (what the kernels compute in; the interpreter runs them on CPU, the
  GPU when there is one) against the float64 reference: each output is a sum of at most
  d * H * K ~ 2e3 products of O(1) numbers, float32 rounding is ~6e-8 relative per operation and
  atomics reorder the U/V sums, so 2e-5 relative (plus the same absolute on the scale of the
  tensor) is rounding, while any indexing or formula error is O(1).

The Triton tests run on CPU under TRITON_INTERPRET=1 (set below, before triton is imported: triton
decides at decoration time, docs/platform.md) with large blocks and tiny sizes so they stay fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from model.config import PeerConfig
from model.kernels import BACKENDS, gathered_dot, peer_expert_mix, resolve_impl, weighted_gather_sum
from model.kernels.chunked import gathered_dots, row_index, rows_grad, rows_grad_index_add
from model.peer import PEER

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
triton_peer = None
if HAS_TRITON:
    triton_peer = importlib.import_module("model.kernels.triton_peer")
    if not HAS_CUDA and type(triton_peer._peer_fwd_kernel).__name__ != "InterpretedFunction":
        triton_peer = importlib.reload(triton_peer)  # imported earlier without the interpreter
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[kernels]')")
TRITON_DEVICES = ["cuda"] if HAS_CUDA else ["cpu"]

# (tokens, heads, top_k, d_model, num_experts): non-powers of two in every position.
SHAPES = [
    (1, 1, 1, 1, 4),
    (7, 2, 3, 5, 9),
    (37, 3, 5, 19, 49),
    (64, 4, 4, 32, 64),
    (50, 2, 7, 33, 100),
]


def make_inputs(num_tokens, num_heads, top_k, d_model, num_experts, *, dtype, pattern="random", seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_model, generator=gen, dtype=dtype)
    down = torch.randn(num_experts, d_model, generator=gen, dtype=dtype)
    up = torch.randn(num_experts, d_model, generator=gen, dtype=dtype)
    gates = torch.softmax(torch.randn(num_tokens, num_heads, top_k, generator=gen, dtype=dtype), dim=-1)
    idx = torch.randint(0, num_experts, (num_tokens, num_heads, top_k), generator=gen)
    if pattern == "duplicates":  # repeats within a head and across the heads of one token
        idx[:, :, ::2] = idx[:, :1, :1].clone()
    elif pattern == "one_expert":
        idx.fill_(num_experts - 1)
    grad_y = torch.randn(num_tokens, d_model, generator=gen, dtype=dtype)
    tensors = [t.to(device) for t in (x, down, up, gates)]
    return tensors, idx.to(device), grad_y.to(device)


def forward_backward(impl, activation, tensors, idx, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    x, down, up, gates = leaves
    y = peer_expert_mix(x, down, up, gates, idx, activation, impl)
    y.backward(grad_y)
    return [y.detach()] + [t.grad for t in leaves]


NAMES = ("y", "grad x", "grad U", "grad V", "grad gates")


def assert_all_close(got, want, rtol, atol_scale):
    for name, g, w in zip(NAMES, got, want):
        assert g is not None, name
        w = w.to(g.dtype).to(g.device)
        atol = atol_scale * max(w.abs().max().item(), 1e-30)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-H{}-K{}-D{}-N{}".format(*s))
@pytest.mark.parametrize("pattern", ["random", "duplicates", "one_expert"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_chunked_matches_reference_float64(shape, pattern, activation, monkeypatch):
    # A tiny scratch budget forces several chunks and a ragged last chunk at these sizes.
    monkeypatch.setattr("model.kernels.chunked.SCRATCH_BYTES", 3 * shape[1] * shape[2] * shape[3] * 8)
    tensors, idx, grad_y = make_inputs(*shape, dtype=torch.float64, pattern=pattern, seed=sum(shape))
    want = forward_backward("reference", activation, tensors, idx, grad_y)
    got = forward_backward("chunked", activation, tensors, idx, grad_y)
    assert_all_close(got, want, rtol=1e-10, atol_scale=1e-12)
    # Every expert that no token retrieved has an exactly zero gradient row, like nn.Embedding.
    unused = torch.ones(shape[4], dtype=torch.bool)
    unused[idx.flatten()] = False
    assert got[2][unused].abs().sum() == 0 and got[3][unused].abs().sum() == 0


def test_chunked_gradcheck():
    tensors, idx, _ = make_inputs(5, 2, 3, 7, 16, dtype=torch.float64, pattern="duplicates", seed=3)
    leaves = [t.clone().requires_grad_() for t in tensors]
    for activation in ("relu", "gelu"):
        assert torch.autograd.gradcheck(
            lambda x, d, u, g: peer_expert_mix(x, d, u, g, idx, activation, "chunked"), leaves
        )


def test_chunked_partial_grads():
    """Only the requested gradients are computed (x alone, weights alone)."""
    tensors, idx, grad_y = make_inputs(9, 2, 3, 6, 25, dtype=torch.float64, seed=5)
    want = forward_backward("reference", "gelu", tensors, idx, grad_y)
    x, down, up, gates = (t.clone() for t in tensors)
    x.requires_grad_()
    peer_expert_mix(x, down, up, gates, idx, "gelu", "chunked").backward(grad_y)
    torch.testing.assert_close(x.grad, want[1], rtol=1e-10, atol=1e-12)
    up.requires_grad_()
    (grad_up,) = torch.autograd.grad(peer_expert_mix(x.detach(), down, up, gates, idx, "gelu", "chunked"), up, grad_y)
    torch.testing.assert_close(grad_up, want[3], rtol=1e-10, atol=1e-12)


def test_rows_grad_and_gathered_dots():
    gen = torch.Generator().manual_seed(1)
    grad_TD = torch.randn(13, 11, generator=gen, dtype=torch.float64)
    idx_TM = torch.randint(0, 7, (13, 6), generator=gen)
    weights_TM = torch.randn(13, 6, generator=gen, dtype=torch.float64)
    dense = torch.zeros(7, 11, dtype=torch.float64).index_add_(
        0, idx_TM.flatten(), (weights_TM[:, :, None] * grad_TD[:, None, :]).reshape(-1, 11)
    )
    torch.testing.assert_close(rows_grad(grad_TD, idx_TM, weights_TM, 7), dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows_grad_index_add(grad_TD, idx_TM, weights_TM, 7), dense, rtol=1e-12, atol=1e-12)
    weight_ND = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(gathered_dots(weight_ND, idx_TM, grad_TD), (weight_ND[idx_TM] * grad_TD[:, None]).sum(-1))


def test_rows_grad_paths_agree(monkeypatch):
    """The CPU sparse x dense product, embedding_bag's dense backward and index_add_ give the same
    table gradient (float64: 1e-12 is rounding), with a shared row index, rows nobody retrieved
    and one row retrieved by every entry; in float32 the product is bitwise the same run after run
    and for any column slice (what expert-parallel shards of U and V rely on)."""
    gen = torch.Generator().manual_seed(2)
    num_rows = 50
    idx_TM = torch.randint(0, num_rows // 2, (33, 5), generator=gen)  # rows 25..49 never retrieved
    idx_TM[:, 0] = 3
    weights_TM = torch.randn(33, 5, generator=gen, dtype=torch.float64)
    grad_TD = torch.randn(33, 9, generator=gen, dtype=torch.float64)
    want = torch.zeros(num_rows, 9, dtype=torch.float64).index_add_(
        0, idx_TM.flatten(), (weights_TM[:, :, None] * grad_TD[:, None, :]).reshape(-1, 9))
    shared = row_index(idx_TM, num_rows)
    sparse = rows_grad(grad_TD, idx_TM, weights_TM, num_rows, shared)
    torch.testing.assert_close(sparse, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows_grad(grad_TD * 2, idx_TM, weights_TM, num_rows, shared), want * 2,
                               rtol=1e-12, atol=1e-12)
    monkeypatch.setattr("model.kernels.chunked._sparse_matmul_applies", lambda grad: False)
    torch.testing.assert_close(rows_grad(grad_TD, idx_TM, weights_TM, num_rows), want, rtol=1e-12, atol=1e-12)
    monkeypatch.undo()
    x32, w32 = grad_TD.float(), weights_TM.float()
    first = rows_grad(x32, idx_TM, w32, num_rows)
    assert all(torch.equal(rows_grad(x32, idx_TM, w32, num_rows), first) for _ in range(5))
    assert torch.equal(rows_grad(x32[:, 2:7].contiguous(), idx_TM, w32, num_rows), first[:, 2:7])


@pytest.fixture
def compiled_gathered_dots(monkeypatch):
    """Every CPU gathered dot goes through the torch.compile'd loop (normally large calls only)."""
    import model.kernels.chunked as chunked

    monkeypatch.setattr(chunked, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(chunked, "_compiled_gathered_dots", None)
    return chunked


@pytest.mark.slow  # compiling costs ~30 s with a cold inductor cache
def test_chunked_with_compiled_gathered_dots_matches_reference(compiled_gathered_dots):
    # Same tolerance as the eager chunked backend: float64 sums in another order.
    for shape, pattern in ((SHAPES[2], "duplicates"), (SHAPES[4], "one_expert"), (SHAPES[3], "random")):
        tensors, idx, grad_y = make_inputs(*shape, dtype=torch.float64, pattern=pattern, seed=sum(shape))
        want = forward_backward("reference", "gelu", tensors, idx, grad_y)
        got = forward_backward("chunked", "gelu", tensors, idx, grad_y)
        assert_all_close(got, want, rtol=1e-10, atol_scale=1e-12)
    assert compiled_gathered_dots._compiled_gathered_dots, "the compiled path was not taken"


def test_gathered_dots_falls_back_when_compiling_fails(compiled_gathered_dots, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    gen = torch.Generator().manual_seed(2)
    weight_ND = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    idx_TM = torch.randint(0, 9, (4, 3), generator=gen)
    x_TD = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
        got = gathered_dots(weight_ND, idx_TM, x_TD)
    torch.testing.assert_close(got, (weight_ND[idx_TM] * x_TD[:, None]).sum(-1))
    assert compiled_gathered_dots._compiled_gathered_dots is False  # not retried on every call


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    "shape, pattern, activation",
    [
        (SHAPES[1], "random", "gelu"),
        (SHAPES[2], "random", "relu"),
        (SHAPES[2], "duplicates", "gelu"),
        (SHAPES[3], "one_expert", "relu"),
        (SHAPES[4], "duplicates", "relu"),
        (SHAPES[0], "random", "gelu"),
    ],
    ids=lambda v: "T{}-H{}-K{}-D{}-N{}".format(*v) if isinstance(v, tuple) else str(v),
)
def test_triton_matches_reference(device, shape, pattern, activation):
    tensors, idx, grad_y = make_inputs(*shape, dtype=torch.float64, pattern=pattern, seed=sum(shape))
    want = forward_backward("reference", activation, tensors, idx, grad_y)
    got = forward_backward(
        "triton", activation, [t.float().to(device) for t in tensors], idx.to(device), grad_y.float().to(device)
    )
    assert_all_close([g.cpu() for g in got], want, rtol=2e-5, atol_scale=2e-5)


@needs_triton
def test_triton_long_d_loop_and_many_blocks():
    """d beyond one BLOCK_D slice (the loops over d) and tokens over several programs."""
    shape = (150, 2, 3, 300, 36)
    tensors, idx, grad_y = make_inputs(*shape, dtype=torch.float64, pattern="duplicates", seed=11)
    want = forward_backward("reference", "gelu", tensors, idx, grad_y)
    device = TRITON_DEVICES[0]
    got = forward_backward("triton", "gelu", [t.float().to(device) for t in tensors], idx.to(device),
                           grad_y.float().to(device))
    assert_all_close([g.cpu() for g in got], want, rtol=2e-5, atol_scale=2e-5)


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_triton_bf16_on_gpu():
    """bf16 inputs (the GPU training dtype), fp32 accumulation inside the kernels: within bf16
    rounding (2^-8 relative) of the float64 reference of the same bf16 values."""
    tensors, idx, grad_y = make_inputs(256, 8, 16, 96, 4096, dtype=torch.float64, seed=2)
    tensors = [t.to(torch.bfloat16).double() for t in tensors]
    want = forward_backward("reference", "relu", tensors, idx, grad_y)
    got = forward_backward("triton", "relu", [t.to("cuda", torch.bfloat16) for t in tensors], idx.cuda(),
                           grad_y.to("cuda", torch.bfloat16))
    assert_all_close([g.float().cpu() for g in got], want, rtol=2e-2, atol_scale=2e-2)


def test_resolve_impl():
    assert resolve_impl("reference", "cpu") == "reference"
    assert resolve_impl("fused", "cpu") == "chunked"
    assert resolve_impl("auto", "cpu") == "chunked"
    for backend in BACKENDS:
        assert resolve_impl(backend, "cpu") == backend
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("fast", "cpu")


def test_model_imports_without_triton():
    """model/ never imports triton unless a CUDA tensor asks for the Triton backend."""
    import subprocess
    import sys

    code = (
        "import sys, torch; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "from model.kernels import peer_expert_mix, triton_available\n"
        "from model.peer import PEER\n"
        "assert not triton_available()\n"
        "x = torch.randn(3, 4); w = torch.randn(9, 4)\n"
        "y = peer_expert_mix(x, w, w, torch.ones(3, 1, 2), torch.zeros(3, 1, 2, dtype=torch.long), 'relu', 'auto')\n"
        "print(y.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    assert "torch.Size([3, 4])" in out.stdout


@pytest.mark.parametrize("impl", ["fused", "auto"])
def test_peer_layer_fused_equals_reference(impl):
    """The whole layer (retrieval, gates, expert compute) with impl=fused/auto against
    impl=reference: same parameters, float64, outputs and every parameter's gradient."""
    cfg = dict(num_experts=81, num_heads=3, top_k=5, d_key=10, query_batchnorm=True, activation="gelu")
    torch.manual_seed(0)
    ref = PEER(23, PeerConfig(impl="reference", **cfg), init_std=0.1).double()
    fused = PEER(23, PeerConfig(impl=impl, **cfg), init_std=0.1).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, 9, 23, dtype=torch.float64)
    grad_y = torch.randn(4, 9, 23, dtype=torch.float64)
    outs = []
    for layer in (ref, fused):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(grad_y)
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-10, atol=1e-12)
    for name, grad in outs[0][2].items():
        torch.testing.assert_close(outs[1][2][name], grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------- the two halves
# gathered_dot and weighted_gather_sum (the per-rank compute of the expert-parallel layer) against
# their reference, with the same tolerances and shapes policy as above.

# (tokens, rows per token M, d, table rows N): non-powers of two in every position.
HALF_SHAPES = [(1, 1, 1, 4), (7, 6, 5, 9), (37, 15, 19, 49), (50, 14, 33, 100)]


def make_half_inputs(num_tokens, num_rows, d_model, num_experts, *, dtype, pattern="random", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_model, generator=gen, dtype=dtype)
    w = torch.randn(num_tokens, num_rows, generator=gen, dtype=dtype)
    table = torch.randn(num_experts, d_model, generator=gen, dtype=dtype)
    idx = torch.randint(0, num_experts, (num_tokens, num_rows), generator=gen)
    if pattern == "duplicates":  # repeats within a token and across tokens
        idx[:, ::2] = idx[:1, :1].clone()
    elif pattern == "one_row":  # every token retrieves the same row M times
        idx.fill_(num_experts - 1)
    grad_s = torch.randn(num_tokens, num_rows, generator=gen, dtype=dtype)
    grad_y = torch.randn(num_tokens, d_model, generator=gen, dtype=dtype)
    return x, w, table, idx, grad_s, grad_y


def half_forward_backward(op, impl, dense, table, idx, grad_out, device="cpu", dtype=None):
    dense, table = (t.detach().clone().to(device, dtype or t.dtype).requires_grad_() for t in (dense, table))
    out = op(dense, table, idx.to(device), impl)
    out.backward(grad_out.to(device, dtype or grad_out.dtype))
    return [out.detach().cpu(), dense.grad.cpu(), table.grad.cpu()]


def assert_halves_close(got, want, rtol, atol_scale, names=("out", "grad dense", "grad table")):
    for name, g, w in zip(names, got, want):
        assert g is not None and g.shape == w.shape, name
        atol = atol_scale * max(w.abs().max().item(), 1e-30)
        torch.testing.assert_close(g, w.to(g.dtype), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", HALF_SHAPES, ids=lambda s: "T{}-M{}-D{}-N{}".format(*s))
@pytest.mark.parametrize("pattern", ["random", "duplicates", "one_row"])
def test_chunked_halves_match_reference_float64(shape, pattern, monkeypatch):
    monkeypatch.setattr("model.kernels.chunked.SCRATCH_BYTES", 3 * shape[1] * shape[2] * 8)  # several chunks
    x, w, table, idx, grad_s, grad_y = make_half_inputs(*shape, dtype=torch.float64, pattern=pattern, seed=sum(shape))
    for op, dense, grad_out in ((gathered_dot, x, grad_s), (weighted_gather_sum, w, grad_y)):
        want = half_forward_backward(op, "reference", dense, table, idx, grad_out)
        got = half_forward_backward(op, "chunked", dense, table, idx, grad_out)
        assert_halves_close(got, want, rtol=1e-10, atol_scale=1e-12)
        unused = torch.ones(shape[3], dtype=torch.bool)
        unused[idx.flatten()] = False
        assert got[2][unused].abs().sum() == 0  # rows no token retrieved: exactly zero, like nn.Embedding
    # The explicit formulas of the brief, independent of the reference's einsums.
    rows = table[idx]
    torch.testing.assert_close(gathered_dot(x, table, idx, "chunked"), (rows * x[:, None]).sum(-1))
    torch.testing.assert_close(weighted_gather_sum(w, table, idx, "chunked"), (w[:, :, None] * rows).sum(1))


def test_chunked_halves_gradcheck_and_partial_grads():
    x, w, table, idx, grad_s, grad_y = make_half_inputs(5, 6, 7, 16, dtype=torch.float64, pattern="duplicates", seed=4)
    for op, dense in ((gathered_dot, x), (weighted_gather_sum, w)):
        leaves = [dense.clone().requires_grad_(), table.clone().requires_grad_()]
        assert torch.autograd.gradcheck(lambda a, b, op=op: op(a, b, idx, "chunked"), leaves)
    # Table alone and dense input alone.
    for op, dense, grad_out in ((gathered_dot, x, grad_s), (weighted_gather_sum, w, grad_y)):
        want = half_forward_backward(op, "reference", dense, table, idx, grad_out)
        tab = table.clone().requires_grad_()
        (g_tab,) = torch.autograd.grad(op(dense, tab, idx, "chunked"), tab, grad_out)
        torch.testing.assert_close(g_tab, want[2], rtol=1e-10, atol=1e-12)
        d = dense.clone().requires_grad_()
        (g_d,) = torch.autograd.grad(op(d, table, idx, "chunked"), d, grad_out)
        torch.testing.assert_close(g_d, want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_halves_compose_to_peer_expert_mix(impl):
    """gathered_dot -> gates * act -> weighted_gather_sum is peer_expert_mix (values and grads),
    the composition the expert-parallel layer runs with a cross-rank sum in the middle."""
    tensors, idx, grad_y = make_inputs(11, 3, 5, 13, 36, dtype=torch.float64, pattern="duplicates", seed=9)
    want = forward_backward("reference", "gelu", tensors, idx, grad_y)
    x, down, up, gates = (t.detach().clone().requires_grad_() for t in tensors)
    idx_TM = idx.reshape(11, 15)
    pre = gathered_dot(x, down, idx_TM, impl)
    y = weighted_gather_sum(gates.reshape(11, 15) * torch.nn.functional.gelu(pre), up, idx_TM, impl)
    y.backward(grad_y)
    assert_all_close([y.detach(), x.grad, down.grad, up.grad, gates.grad], want, rtol=1e-10, atol_scale=1e-12)


def test_halves_validate_shapes():
    x, w, table, idx, _, _ = make_half_inputs(4, 3, 5, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="gathered_dot"):
        gathered_dot(x[:, :4], table, idx)
    with pytest.raises(ValueError, match="weighted_gather_sum"):
        weighted_gather_sum(w[:, :2], table, idx)


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    "shape, pattern",
    [(HALF_SHAPES[0], "random"), (HALF_SHAPES[1], "duplicates"), (HALF_SHAPES[2], "one_row"),
     (HALF_SHAPES[3], "random"), ((150, 6, 300, 36), "duplicates")],  # last: d over BLOCK_D, several programs
    ids=lambda v: "T{}-M{}-D{}-N{}".format(*v) if isinstance(v, tuple) else str(v),
)
def test_triton_halves_match_reference(device, shape, pattern):
    x, w, table, idx, grad_s, grad_y = make_half_inputs(*shape, dtype=torch.float64, pattern=pattern, seed=sum(shape))
    for op, dense, grad_out in ((gathered_dot, x, grad_s), (weighted_gather_sum, w, grad_y)):
        want = half_forward_backward(op, "reference", dense, table, idx, grad_out)
        got = half_forward_backward(op, "triton", dense, table, idx, grad_out, device=device, dtype=torch.float32)
        assert_halves_close(got, want, rtol=2e-5, atol_scale=2e-5)

"""iRPE buckets, the key term and attention with iRPE, checked against DESIGN.md's formulas
computed independently here (Python loops, the math module)."""
import math

import pytest
import torch
from torch.func import functional_call

from lomar_fast.models.irpe import ContextualKeyRPE, bucket_ids, num_buckets, piecewise_offset
from lomar_fast.models.vit import Attention
from lomar_fast.ops.irpe import irpe_key_bias


def g_ref(x: int, ratio: float) -> int:
    """DESIGN.md's per-axis map g(x), written with the math module."""
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    if abs(x) <= alpha:
        return int(x)
    y = round(alpha + math.log(abs(x) / alpha) / math.log(gamma / alpha) * (beta - alpha))
    return int(math.copysign(min(beta, y), x))


def buckets_ref(h: int, w: int, ratio: float, cls_token: bool) -> list[list[int]]:
    """Bucket of every (query, key) pair, one pair at a time."""
    b = int(2 * ratio)
    s = 2 * b + 1
    extra = 1 if cls_token else 0
    n = h * w + extra
    out = [[s * s] * n for _ in range(n)]
    for qi in range(h * w):
        for ki in range(h * w):
            dr = qi // w - ki // w
            dc = qi % w - ki % w
            out[qi + extra][ki + extra] = (g_ref(dr, ratio) + b) * s + g_ref(dc, ratio) + b
    return out


# --------------------------------------------------------------------------- buckets


def test_offsets_ratio_1_9():
    x = torch.arange(0, 14)
    expected = [0, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]
    assert piecewise_offset(x, 1.9).tolist() == expected
    assert piecewise_offset(-x, 1.9).tolist() == [-e for e in expected]
    assert [g_ref(int(v), 1.9) for v in x] == expected  # the test's own formula agrees with DESIGN.md's list
    assert piecewise_offset(x, 1.9).dtype == torch.long


@pytest.mark.parametrize("ratio", [1.0, 1.5, 1.9, 2.5, 3.2])
def test_offsets_match_formula(ratio):
    x = torch.arange(-40, 41)
    assert piecewise_offset(x, ratio).tolist() == [g_ref(int(v), ratio) for v in x]


def test_7x7_window_uses_all_49_buckets_and_cls_bucket_49():
    ids = bucket_ids(7, 7, 1.9, cls_token=True)
    assert ids.shape == (50, 50) and ids.dtype == torch.long
    assert num_buckets(1.9) == 50
    assert ids[0].tolist() == [49] * 50
    assert ids[:, 0].tolist() == [49] * 50
    inner = ids[1:, 1:]
    assert sorted(inner.unique().tolist()) == list(range(49))
    assert int(inner.max()) < 49
    # same offset -> centre bucket (g(0) + 3) * 7 + g(0) + 3 = 24
    assert inner.diagonal().tolist() == [24] * 49
    no_cls = bucket_ids(7, 7, 1.9, cls_token=False)
    assert torch.equal(no_cls, inner)
    assert num_buckets(1.9, cls_token=False) == 49


@pytest.mark.parametrize("grid", [7, 14, 24])
def test_bucket_ids_match_brute_force(grid):
    ids = bucket_ids(grid, grid, 1.9, cls_token=True)
    assert ids.tolist() == buckets_ref(grid, grid, 1.9, True)


def test_bucket_ids_non_square_grid():
    assert bucket_ids(3, 9, 1.9, cls_token=False).tolist() == buckets_ref(3, 9, 1.9, False)


@pytest.mark.parametrize("ratio,grid,count", [(1.0, 6, 25), (1.9, 10, 49), (2.5, 16, 121), (3.2, 24, 169)])
def test_other_ratios_bucket_count(ratio, grid, count):
    assert count == (2 * int(2 * ratio) + 1) ** 2
    assert num_buckets(ratio, cls_token=False) == count
    assert num_buckets(ratio, cls_token=True) == count + 1
    ids = bucket_ids(grid, grid, ratio, cls_token=True)
    inner = ids[1:, 1:]
    assert sorted(inner.unique().tolist()) == list(range(count))
    assert ids[0].eq(count).all() and ids[:, 0].eq(count).all()
    assert ids.tolist() == buckets_ref(grid, grid, ratio, True)


def test_bucket_ids_rejects_bad_grid():
    with pytest.raises(ValueError, match="grid"):
        bucket_ids(0, 7)
    with pytest.raises(ValueError, match="ratio"):
        bucket_ids(7, 7, ratio=0.0)


# --------------------------------------------------------------------------- key term


def test_irpe_term_matches_loop(seed):
    n, h, side, d = 2, 3, 3, 5
    l = side * side + 1
    q = torch.randn(n, h, l, d, dtype=torch.float64)
    table = torch.randn(d, num_buckets(1.9), dtype=torch.float64)
    ref_b = buckets_ref(side, side, 1.9, True)
    out = irpe_key_bias(q, table, bucket_ids(side, side, 1.9, True))
    assert out.shape == (n, h, l, l)
    ref = torch.empty(n, h, l, l, dtype=torch.float64)
    for a in range(n):
        for hh in range(h):
            for i in range(l):
                for j in range(l):
                    ref[a, hh, i, j] = sum(float(q[a, hh, i, c]) * float(table[c, ref_b[i][j]]) for c in range(d))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_rpe_module_table_shape_and_zero_init():
    m = ContextualKeyRPE(head_dim=16)
    assert m.lookup_table_weight.shape == (1, 16, 50)
    assert torch.count_nonzero(m.lookup_table_weight) == 0


def _hand_attention(attn: Attention, x: torch.Tensor, buckets: list[list[int]], scaled_query: bool) -> torch.Tensor:
    """softmax((q k^T) d^-0.5 + (q' T)[bucket]) v, then proj; q' = q d^-0.5 if scaled_query else q."""
    n, l, dim = x.shape
    hd = attn.head_dim
    nh = dim // hd
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (n, l, 3*dim), columns [q heads | k heads | v heads]
    table = attn.rpe_k.lookup_table_weight[0]  # (hd, NB)
    out = torch.zeros(n, l, dim, dtype=x.dtype)
    for a in range(n):
        for hh in range(nh):
            q = qkv[a, :, hh * hd:(hh + 1) * hd]
            k = qkv[a, :, dim + hh * hd:dim + (hh + 1) * hd]
            v = qkv[a, :, 2 * dim + hh * hd:2 * dim + (hh + 1) * hd]
            qr = q * hd**-0.5 if scaled_query else q
            logits = torch.empty(l, l, dtype=x.dtype)
            for i in range(l):
                for j in range(l):
                    logits[i, j] = (q[i] @ k[j]) * hd**-0.5 + qr[i] @ table[:, buckets[i][j]]
            out[a, :, hh * hd:(hh + 1) * hd] = torch.softmax(logits, dim=-1) @ v
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("scaled_query", [False, True])
def test_attention_matches_hand_softmax(seed, scaled_query):
    dim, heads, side = 12, 3, 3
    attn = Attention(dim, heads, rpe=True, scaled_query=scaled_query).double()
    with torch.no_grad():
        attn.rpe_k.lookup_table_weight.normal_(0, 0.5)
    x = torch.randn(2, side * side + 1, dim, dtype=torch.float64)
    out = attn(x, bucket_ids(side, side, 1.9, True))
    ref = _hand_attention(attn, x, buckets_ref(side, side, 1.9, True), scaled_query)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # the other convention gives a different output (the option is not a no-op)
    other = _hand_attention(attn, x, buckets_ref(side, side, 1.9, True), not scaled_query)
    assert (out - other).abs().max() > 1e-3


def test_published_default_is_unscaled_query():
    assert Attention(8, 2, rpe=True).rpe_k.scaled_query is False


def test_attention_without_buckets_raises():
    attn = Attention(8, 2, rpe=True)
    with pytest.raises(ValueError, match="bucket"):
        attn(torch.randn(1, 10, 8))


def test_attention_gradcheck(seed):
    dim, heads, side = 8, 2, 2
    attn = Attention(dim, heads, rpe=True).double()
    params = {k: v.detach() for k, v in attn.named_parameters()}
    buckets = bucket_ids(side, side, 1.9, True)
    x = torch.randn(2, side * side + 1, dim, dtype=torch.float64, requires_grad=True)
    table = (0.3 * torch.randn(1, dim // heads, 50, dtype=torch.float64)).requires_grad_()

    def f(x, table):
        return functional_call(attn, {**params, "rpe_k.lookup_table_weight": table}, (x, buckets))

    assert torch.autograd.gradcheck(f, (x, table), eps=1e-6, atol=1e-5)
    # the table gradient reaches only the buckets this layout uses
    f(x, table).sum().backward()
    used = set(buckets.unique().tolist())
    unused = [i for i in range(50) if i not in used]
    assert table.grad[..., sorted(used)].abs().sum() > 0
    assert table.grad[..., unused].abs().sum() == 0


def test_irpe_bias_rejects_bad_buckets():
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="buckets"):
        irpe_key_bias(q, torch.zeros(4, 50), torch.zeros(10, 10, dtype=torch.int32))
    with pytest.raises(ValueError, match="table"):
        irpe_key_bias(q, torch.zeros(5, 50), torch.zeros(10, 10, dtype=torch.long))


def test_bucket_cache_ignores_ambient_default_device():
    """The bucket table is cached; building it under another default device must not poison the cache."""
    from lomar_fast.models.irpe import _bucket_ids_cpu

    _bucket_ids_cpu.cache_clear()  # built first under the meta device, whatever ran before
    with torch.device("meta"):
        first = bucket_ids(5, 6, 1.9, cls_token=True)
    assert first.device.type == "cpu"
    again = bucket_ids(5, 6, 1.9, cls_token=True)
    assert again.device.type == "cpu"
    assert again.tolist() == buckets_ref(5, 6, 1.9, True)


# ------------------------------------------------------------------ batched-matmul formulation
@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("grid,heads,head_dim", [((5, 5), 3, 16), ((3, 7), 2, 8), ((7, 7), 1, 32)])
def test_bmm_path_equals_reference_values_and_grads(grid, heads, head_dim, align):
    """Both forms of the batched-matmul path (plain; into SDPA's aligned bias layout) against the gather."""
    from lomar_fast.ops.irpe import irpe_key_bias_bmm, irpe_key_bias_reference

    gen = torch.Generator().manual_seed(3)
    buckets = bucket_ids(*grid)
    L = buckets.shape[0]
    q = torch.randn(3, heads, L, head_dim, dtype=torch.float64, generator=gen)
    # non-contiguous queries, as they come out of the qkv split
    q = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    table = torch.randn(head_dim, 50, dtype=torch.float64, generator=gen, requires_grad=True)
    ref = irpe_key_bias_reference(q, table, buckets)
    out = irpe_key_bias_bmm(q, table, buckets, align=align)
    assert out.shape == ref.shape and out.stride(-1) == 1
    # every stride but the last a multiple of align (L = 25, 21, 49: never aligned by itself)
    assert all(st % align == 0 for st in out.stride()[:-1]) and (align == 1 or L % align != 0), out.stride()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(ref, (q, table), g), torch.autograd.grad(out, (q, table), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # fast mode: the Jacobian checked through random projections (the full one takes ~30 s at L = 50)
    assert torch.autograd.gradcheck(lambda qq, tt: irpe_key_bias_bmm(qq, tt, buckets, align=align), (q, table),
                                    fast_mode=True)


def test_aligned_bmm_path_feeds_sdpa_and_compiles_whole():
    """The aligned form as the model uses it: SDPA's bias under bf16 autocast (the result equals the plain
    form's, the gradients too), compiled without a graph break; a bad align is a ValueError naming it."""
    from lomar_fast.ops.irpe import SDPA_BIAS_ALIGN, irpe_key_bias_bmm

    gen = torch.Generator().manual_seed(5)
    buckets = bucket_ids(7, 7, cls_token=True)  # L = 50, as in the pretraining windows
    L = buckets.shape[0]
    q, k, v = (torch.randn(2, 3, L, 16, generator=gen, requires_grad=True) for _ in range(3))
    table = torch.randn(16, int(buckets.max()) + 1, generator=gen, requires_grad=True)

    def attend(align):
        bias = irpe_key_bias_bmm(q, table, buckets, align=align)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    g = torch.randn(2, 3, L, 16, generator=gen)
    want = attend(1)
    grads = torch.autograd.grad(want, (q, k, v, table), g)
    got = attend(SDPA_BIAS_ALIGN)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (q, k, v, table), g), grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda qq, tt: irpe_key_bias_bmm(qq, tt, buckets, align=SDPA_BIAS_ALIGN),
                             fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(q.bfloat16(), table)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, L, L)
    ref = irpe_key_bias_bmm(q.bfloat16().float(), table.bfloat16().float(), buckets).detach()
    assert (out.float() - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 products of the same inputs
    with pytest.raises(ValueError, match="align"):
        irpe_key_bias_bmm(q, table, buckets, align=0)


def test_irpe_path_switch(monkeypatch):
    import lomar_fast.ops.irpe as ops_irpe

    calls = []
    monkeypatch.setattr(ops_irpe, "irpe_key_bias_bmm",
                        lambda q, t, b, align=1: calls.append(("bmm", align)) or ops_irpe.irpe_key_bias_reference(q, t, b))
    q, t, b = torch.randn(1, 1, 10, 4), torch.randn(4, 50), bucket_ids(3, 3)
    monkeypatch.setenv("LOMAR_IRPE_PATH", "bmm")
    ops_irpe.irpe_key_bias(q, t, b)
    monkeypatch.setenv("LOMAR_IRPE_PATH", "reference")
    ops_irpe.irpe_key_bias(q, t, b)
    assert calls == [("bmm", 1)]
    monkeypatch.setenv("LOMAR_IRPE_PATH", "bmm_aligned")
    ops_irpe.irpe_key_bias(q, t, b)
    assert calls == [("bmm", 1), ("bmm", 8)]
    monkeypatch.setenv("LOMAR_IRPE_PATH", "fast")
    with pytest.raises(ValueError, match="LOMAR_IRPE_PATH"):
        ops_irpe.irpe_key_bias(q, t, b)

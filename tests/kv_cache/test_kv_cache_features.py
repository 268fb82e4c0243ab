"""The decode step's FlashAttention surface (issue 27): left padding (cache_leftpad), a batch
index into a larger cache (cache_batch_idx), paged caches (block_table over a pool of pages, any
page size, pages in any order), rotary embedding of the new rows (interleaved and half-split,
partial rotary dims), soft-capping, ALiBi and sinks, each alone and all together, on the
split-KV kernels against the float64 reference; the caches written as the reference writes them;
FlashAttention's documented semantics; bad indices refused by name. Triton runs through the
interpreter on CPU."""
import pytest
import torch

import fastseq
from fastseq.ops import attention_with_kv_cache
from fastseq.reference import kv_cache as reference

from test_kv_cache import skip_unavailable

pytestmark = pytest.mark.usefixtures("on_triton_test_device")

B, HQ, HK, E, EV, S = 3, 4, 2, 32, 16, 70


def step_inputs(new=2, queries=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = new if queries is None else queries
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    lengths = torch.tensor([10, 40, S - max(new, queries) - 1], dtype=torch.int32)
    return (randn(B, HQ, queries, E), randn(B, HK, new, E) if new else None,
            randn(B, HK, new, EV) if new else None, lengths)


def contiguous_cache(rows=B, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, HK, S, E, generator=g, dtype=dtype),
            torch.randn(rows, HK, S, EV, generator=g, dtype=dtype))


def paged_cache(page_size, rows=B, seed=2):
    """A pool with spare pages, each row's pages shuffled through it."""
    g = torch.Generator().manual_seed(seed)
    per_row = -(-S // page_size)
    pool = rows * per_row + 3
    table = torch.randperm(pool, generator=g)[:rows * per_row].view(rows, per_row).int()
    return (torch.randn(pool, HK, page_size, E, generator=g, dtype=torch.float64),
            torch.randn(pool, HK, page_size, EV, generator=g, dtype=torch.float64), table)


def rotary_tables(rotary_dim=16, positions=S + 4, seed=3):
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(positions, rotary_dim // 2, generator=g, dtype=torch.float64) * 6.28
    return angle.cos(), angle.sin()


def options(name):
    g = torch.Generator().manual_seed(4)
    cos, sin = rotary_tables()
    everything = {"cache_leftpad": torch.tensor([3, 0, 7], dtype=torch.int32),
                  "rotary_cos": cos, "rotary_sin": sin, "softcap": 2.5,
                  "alibi_slopes": torch.rand(B, HQ, generator=g, dtype=torch.float64),
                  "sinks": torch.randn(HQ, generator=g, dtype=torch.float64), "window": 25}
    return {"leftpad": {"cache_leftpad": everything["cache_leftpad"]},
            "rotary-half": {"rotary_cos": cos, "rotary_sin": sin},
            "rotary-interleaved": {"rotary_cos": cos, "rotary_sin": sin,
                                   "rotary_interleaved": True},
            "rotary-full-dim": dict(zip(("rotary_cos", "rotary_sin"), rotary_tables(E))),
            "softcap": {"softcap": 1.5},
            "alibi-heads": {"alibi_slopes": everything["alibi_slopes"][0]},
            "alibi-batch-heads": {"alibi_slopes": everything["alibi_slopes"]},
            "sinks": {"sinks": everything["sinks"]},
            "everything": everything}[name]


def run_both(caches, extra, new=2, queries=None, is_causal=True):
    """(triton's, the reference's) (out, lse, k cache, v cache) of one step on copies."""
    q, k, v, lengths = step_inputs(new, queries)
    results = []
    for backend in ("triton", "reference"):
        k_cache, v_cache = (c.clone() for c in caches[:2])
        out, lse = attention_with_kv_cache(q, k_cache, v_cache, lengths, k, v,
                                           is_causal=is_causal, return_lse=True,
                                           backend=backend, **extra)
        results.append((out, lse, k_cache, v_cache))
    return results


def assert_same(fast, ref):
    out, lse, k_cache, v_cache = fast
    torch.testing.assert_close(out, ref[0], atol=1e-12, rtol=1e-12)
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref[1][finite], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(k_cache, ref[2], atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(v_cache, ref[3], atol=0, rtol=0)


FEATURES = ["leftpad", "rotary-half", "rotary-interleaved", "rotary-full-dim", "softcap",
            "alibi-heads", "alibi-batch-heads", "sinks", "everything"]


@pytest.mark.parametrize("layout", ["contiguous", "paged-8", "batch-index"])
@pytest.mark.parametrize("feature", FEATURES)
def test_step_features_equal_the_reference(feature, layout):
    skip_unavailable("triton")
    extra = dict(options(feature))
    if layout == "contiguous":
        caches = contiguous_cache()
    elif layout == "batch-index":  # five cache rows, the batch uses three of them
        caches = contiguous_cache(rows=5)
        extra["cache_batch_idx"] = torch.tensor([4, 0, 2], dtype=torch.int32)
    else:
        k_pool, v_pool, table = paged_cache(8)
        caches = (k_pool, v_pool)
        extra["block_table"] = table
    assert_same(*run_both(caches, extra))


@pytest.mark.parametrize("page_size", [1, 5, 16, 128])
def test_paged_cache_any_page_size_equals_the_same_cache_contiguous(page_size):
    """Pages in shuffled order and any size (1, one not dividing S, a whole row in one page):
    the step equals it on the contiguous cache holding the same rows, new rows land in the
    right pages."""
    skip_unavailable("triton")
    k_pool, v_pool, table = paged_cache(page_size)
    per_row = table.shape[1] * page_size
    contiguous = [pool[table.long()].transpose(1, 2).reshape(B, HK, per_row, -1).clone()
                  for pool in (k_pool, v_pool)]
    q, k, v, lengths = step_inputs(3)
    out_paged = attention_with_kv_cache(q, k_pool, v_pool, lengths, k, v, block_table=table,
                                        backend="triton")
    out_flat = attention_with_kv_cache(q, *contiguous, lengths, k, v, backend="triton")
    torch.testing.assert_close(out_paged, out_flat, atol=1e-12, rtol=1e-12)
    for pool, flat in zip((k_pool, v_pool), contiguous):
        torch.testing.assert_close(pool[table.long()].transpose(1, 2).reshape(flat.shape), flat)


def test_rotary_follows_flash_attentions_layouts():
    """rotary_interleaved=False rotates dims (d, d + R/2) (GPT-NeoX), True rotates (2k, 2k+1)
    (GPT-J), each pair (a, b) -> (a cos - b sin, b cos + a sin) at the row's position; dims past
    R are unchanged. Checked on the key written into the cache, by hand."""
    skip_unavailable("triton")
    cos, sin = rotary_tables(rotary_dim=8)
    q, k, v, lengths = step_inputs(1)
    for interleaved in (False, True):
        k_cache, v_cache = contiguous_cache()
        attention_with_kv_cache(q, k_cache, v_cache, lengths, k, v, rotary_cos=cos,
                                rotary_sin=sin, rotary_interleaved=interleaved,
                                backend="triton")
        for b in range(B):
            pos = int(lengths[b])
            x = k[b, :, 0]
            c, s = cos[pos], sin[pos]
            if interleaved:
                a, bb = x[:, 0:8:2], x[:, 1:8:2]
                rot = torch.stack([a * c - bb * s, bb * c + a * s], -1).flatten(1)
            else:
                a, bb = x[:, :4], x[:, 4:8]
                rot = torch.cat([a * c - bb * s, bb * c + a * s], -1)
            expected = torch.cat([rot, x[:, 8:]], -1)
            torch.testing.assert_close(k_cache[b, :, pos], expected, atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("is_causal", [True, False])
def test_rotary_query_positions_follow_flash_attention(is_causal):
    """Causal (or windowed) query rows are rotated at cache_seqlens + i, otherwise all at
    cache_seqlens (flash_attn_with_kvcache's rule)."""
    skip_unavailable("triton")
    cos, sin = rotary_tables()
    fast, ref = run_both(contiguous_cache(), {"rotary_cos": cos, "rotary_sin": sin}, new=3,
                         is_causal=is_causal)
    assert_same(fast, ref)
    q, _, _, lengths = step_inputs(3)
    steps = torch.arange(3) * is_causal
    rotated = reference.rotate(q[0], cos, sin, int(lengths[0]) + steps)
    assert not torch.allclose(rotated[:, 1], reference.rotate(q[0], cos, sin,
                                                              int(lengths[0]) + steps * 0)[:, 1]) \
        or not is_causal


def test_leftpad_hides_the_rows_first_keys_as_a_mask_would():
    """cache_leftpad[b]: the keys before it are padding: changing them changes nothing, and the
    step equals torch's backend, which masks them."""
    skip_unavailable("triton")
    q, k, v, lengths = step_inputs(1)
    pad = torch.tensor([3, 0, 7], dtype=torch.int32)
    k_cache, v_cache = contiguous_cache()
    got = attention_with_kv_cache(q, k_cache.clone(), v_cache.clone(), lengths, k, v,
                                  cache_leftpad=pad, backend="triton")
    expected = attention_with_kv_cache(q, k_cache.clone(), v_cache.clone(), lengths, k, v,
                                       cache_leftpad=pad, backend="torch")
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for b, n in enumerate(pad.tolist()):
        k_cache[b, :, :n] = 1e3
        v_cache[b, :, :n] = -1e3
    again = attention_with_kv_cache(q, k_cache, v_cache, lengths, k, v, cache_leftpad=pad,
                                    backend="triton")
    torch.testing.assert_close(again, got, atol=1e-12, rtol=1e-12)


def test_a_step_with_padding_window_rotary_and_pages_stays_on_split_kv():
    """The issue's test: padding, a window, rotary and a paged cache together run the split-KV
    kernels (explain names them)."""
    skip_unavailable("triton")
    k_pool, v_pool, table = paged_cache(16)
    q, k, v, lengths = step_inputs(1)
    cos, sin = rotary_tables()
    report = fastseq.explain(attention_with_kv_cache, q, k_pool, v_pool, lengths, k, v,
                             window=32, cache_leftpad=torch.tensor([1, 0, 4], dtype=torch.int32),
                             block_table=table, rotary_cos=cos, rotary_sin=sin,
                             backend="triton")
    assert "runs triton (split-KV decode" in str(report), report


def test_torch_backend_refuses_what_it_cannot_express_by_name():
    q, k, v, lengths = step_inputs(1)
    k_cache, v_cache = contiguous_cache()
    cos, sin = rotary_tables()
    with pytest.raises(fastseq.BackendError, match="rotary_cos, softcap"):
        attention_with_kv_cache(q, k_cache, v_cache, lengths, k, v, rotary_cos=cos,
                                rotary_sin=sin, softcap=1.0, backend="torch")


def bad_steps():
    q, k, v, lengths = step_inputs(1)
    k_cache, v_cache = contiguous_cache()
    k_pool, v_pool, table = paged_cache(8)
    cos, sin = rotary_tables()
    call = lambda **kw: lambda: attention_with_kv_cache(  # noqa: E731
        q, kw.pop("k_cache", k_cache), kw.pop("v_cache", v_cache), lengths, k, v, **kw)
    return {
        "table-out-of-range": (call(k_cache=k_pool, v_cache=v_pool,
                                    block_table=table * 0 + 99), "block_table entries must lie"),
        "table-dtype": (call(k_cache=k_pool, v_cache=v_pool, block_table=table.float()),
                        "block_table must be an int32 or int64 tensor"),
        "table-ndim": (call(k_cache=k_pool, v_cache=v_pool, block_table=table[0]),
                       "block_table must be 2-D"),
        "table-rows": (call(k_cache=k_pool, v_cache=v_pool, block_table=table[:2]),
                       "block_table has 2 rows but query has 3"),
        "batch-index-range": (call(cache_batch_idx=torch.tensor([0, 1, 3])),
                              "cache_batch_idx must lie in \\[0, 3\\)"),
        "batch-index-shape": (call(cache_batch_idx=torch.tensor([0, 1])),
                              "cache_batch_idx must be an int32 or int64 tensor of shape \\[3\\]"),
        "leftpad-past-length": (call(cache_leftpad=torch.tensor([0, 0, 99])),
                                "cache_leftpad must lie in \\[0, cache_seqlens"),
        "rotary-alone": (call(rotary_cos=cos), "rotary_cos and rotary_sin go together"),
        "rotary-shapes": (call(rotary_cos=cos, rotary_sin=sin[:, :4]),
                          "rotary_cos and rotary_sin must both be"),
        "rotary-too-wide": (call(rotary_cos=torch.ones(S + 4, E), rotary_sin=torch.ones(S + 4, E)),
                            "rotary_dim <= the head dim"),
        "rotary-positions": (call(rotary_cos=cos[:20], rotary_sin=sin[:20]),
                             "rotary positions"),
        "rotary-without-rows": (lambda: attention_with_kv_cache(
            q, k_cache, v_cache, lengths, rotary_cos=cos, rotary_sin=sin),
            "pass key and value"),
        "rows-without-index": (call(k_cache=torch.zeros(5, HK, S, E, dtype=torch.float64),
                                    v_cache=torch.zeros(5, HK, S, EV, dtype=torch.float64)),
                               "pass cache_batch_idx"),
        "sinks-shape": (call(sinks=torch.zeros(2)), "sinks must be a float tensor \\[4\\]"),
        "softcap": (call(softcap=-1.0), "softcap must be a number >= 0"),
    }


@pytest.mark.parametrize("case", list(bad_steps()))
def test_bad_step_arguments_are_refused_by_name(case):
    call, message = bad_steps()[case]
    with pytest.raises(fastseq.InputError, match=message):
        call()


def test_opcheck_with_every_extra():
    skip_unavailable("triton")
    k_pool, v_pool, table = (t.float() if t.is_floating_point() else t for t in paged_cache(8))
    q, k, v, lengths = (t.float() if t is not None and t.is_floating_point() else t
                        for t in step_inputs(1))
    cos, sin = (t.float() for t in rotary_tables())
    extras = (torch.tensor([1, 0, 2], dtype=torch.int32), None, table, torch.rand(HQ),
              torch.randn(HQ), lengths, cos, sin, 2.0, True)
    torch.library.opcheck(torch.ops.fastseq.attention_decode_triton,
                          (q, k_pool, v_pool, lengths + 1, True, -1, 9, 0.2, *extras))
    torch.library.opcheck(torch.ops.fastseq.kv_cache_append_triton,
                          (k_pool, v_pool, k, v, lengths, None, table, cos, sin, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_every_extra_in_half_precision_within_the_rule(dtype):
    """Paged, left-padded, rotary, soft-capped, ALiBi and sinks together in half precision:
    output and lse within 2x the error of plain PyTorch in the same dtype (the reference
    computed in that dtype) against the float64 reference; the rotated keys written into the
    pool within it too."""
    skip_unavailable("triton")
    from numerics import assert_within_rule

    extra = dict(options("everything"))
    k_pool, v_pool, table = paged_cache(8)
    extra["block_table"] = table
    q, k, v, lengths = step_inputs(2)

    def step(backend, dt, upcast=True):
        caches = [t.to(dt).clone() for t in (k_pool, v_pool)]
        args = [t.to(dt) for t in (q, k, v)]
        opts = {name: (value.to(dt) if torch.is_tensor(value) and value.is_floating_point()
                       and name in ("alibi_slopes", "sinks") else value)
                for name, value in extra.items()}
        if backend == "reference":
            out, lse = reference.attention_with_kv_cache(
                args[0], *caches, lengths, *args[1:], **opts, upcast=upcast)
        else:
            out, lse = attention_with_kv_cache(args[0], *caches, lengths, *args[1:],
                                               return_lse=True, backend=backend, **opts)
        return out, lse, caches[0]

    truth = step("reference", torch.float64)
    plain = step("reference", dtype, upcast=False)
    fast = step("triton", dtype)
    assert_within_rule("out", fast[0], plain[0], truth[0])
    assert_within_rule("lse", fast[1], plain[1].float(), truth[1])
    assert_within_rule("k cache", fast[2], plain[2], truth[2])


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_paged_step_equals_the_reference(data):
    """Random page sizes, lengths, left padding, new rows, windows, rotary layouts and the
    score modifiers on a shuffled paged pool: the step's output, lse and the written pages
    equal the float64 reference."""
    skip_unavailable("triton")
    page = data.draw(st.integers(1, 40), "page_size")
    new = data.draw(st.integers(1, 3), "new rows")
    capacity = data.draw(st.integers(new + 1, 60), "capacity")
    per_row = -(-capacity // page)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), "seed"))
    pool = B * per_row + data.draw(st.integers(0, 3), "spare pages")
    table = torch.randperm(pool, generator=g)[:B * per_row].view(B, per_row).int()
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, capacity - new), min_size=B,
                                              max_size=B), "lengths"), dtype=torch.int32)
    pads = torch.tensor([data.draw(st.integers(0, int(n)), f"pad{b}")
                         for b, n in enumerate(lengths)], dtype=torch.int32)
    extra = {"block_table": table, "cache_leftpad": pads,
             "window": data.draw(st.sampled_from([None, 1, 7]), "window")}
    if data.draw(st.booleans(), "rotary"):
        angle = torch.rand(per_row * page + new, 8, generator=g, dtype=torch.float64) * 6.28
        extra.update(rotary_cos=angle.cos(), rotary_sin=angle.sin(),
                     rotary_interleaved=data.draw(st.booleans(), "interleaved"))
    if data.draw(st.booleans(), "modifiers"):
        extra.update(softcap=2.0, alibi_slopes=torch.rand(HQ, generator=g, dtype=torch.float64),
                     sinks=torch.randn(HQ, generator=g, dtype=torch.float64))
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = randn(B, HQ, new, E), randn(B, HK, new, E), randn(B, HK, new, EV)
    pools = (randn(pool, HK, page, E), randn(pool, HK, page, EV))
    results = []
    for backend in ("triton", "reference"):
        k_pool, v_pool = (t.clone() for t in pools)
        out, lse = attention_with_kv_cache(q, k_pool, v_pool, lengths, k, v, return_lse=True,
                                           backend=backend, **extra)
        results.append((out, lse, k_pool, v_pool))
    assert_same(*results)

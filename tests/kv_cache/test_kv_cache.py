"""fastseq.ops.attention_with_kv_cache (a decode step against a preallocated cache) on every
backend: equal to full attention's last rows over the filled prefix, for random ragged lengths,
one and several new rows (causal among themselves), GQA/MQA, sliding windows, strided caches;
the in-place append; overflow and shape errors; opcheck and torch.compile. Triton runs through
the interpreter on CPU, with caches long enough to cross several key ranges."""
import pytest
import torch

import fastseq
from fastseq.ops import attention_with_kv_cache
from fastseq.reference import attention as reference_attention

from conftest import TRITON_TEST_DEVICE
from numerics import assert_within_rule

pytestmark = pytest.mark.usefixtures("on_triton_test_device")

BACKENDS = ["triton", "torch", "reference"]
# (B, Hq, Hk, Lq, S_max, E, EV, window): one-token steps, a 4-row step, MQA, a window.
CASES = {
    "step-gqa": (3, 4, 2, 1, 70, 24, 24, 0),
    "rows-d40": (2, 2, 2, 4, 45, 40, 16, 0),
    "mqa-window": (2, 6, 1, 3, 77, 16, 16, 9),
    "single-row": (1, 3, 3, 1, 33, 8, 8, 0),
}


def skip_unavailable(backend):
    if backend == "triton" and fastseq.backend.triton_unavailable(TRITON_TEST_DEVICE):
        pytest.skip("the Triton interpreter is off (a GPU run tests Triton on CUDA instead)")


def make_step(case, dtype, new_rows=True):
    """(query, caches filled at random ragged lengths, lengths, new key/value rows)."""
    B, HQ, HK, LQ, S, E, EV, _ = case
    new = LQ if new_rows else 0
    lengths = torch.randint(0, S - new + 1, (B,), dtype=torch.int32)
    lengths[0] = 0 if B > 1 else lengths[0]  # one row starts empty
    q = torch.randn(B, HQ, LQ, E, dtype=dtype)
    k_cache = torch.randn(B, HK, S, E, dtype=dtype)
    v_cache = torch.randn(B, HK, S, EV, dtype=dtype)
    key = torch.randn(B, HK, new, E, dtype=dtype) if new_rows else None
    value = torch.randn(B, HK, new, EV, dtype=dtype) if new_rows else None
    return q, k_cache, v_cache, lengths, key, value


def full_attention_rows(q, k_cache, v_cache, lengths, key, value, window, causal=True):
    """The same step as plain attention over each row's concatenated context: keys [:length]
    then the new rows, bottom-right causal, window as a mask."""
    outs = []
    for b, n in enumerate(lengths.tolist()):
        keys, values = k_cache[b, :, :n], v_cache[b, :, :n]
        if key is not None:
            keys, values = torch.cat([keys, key[b]], 1), torch.cat([values, value[b]], 1)
        L, S = q.shape[2], keys.shape[1]
        last = S - L + torch.arange(L)[:, None]
        cols = torch.arange(S)[None, :]
        seen = cols <= last if causal else torch.ones(L, S, dtype=torch.bool)
        if window:
            seen = seen & (cols > last - window)
        outs.append(reference_attention.scaled_dot_product_attention(
            q[b], keys, values, seen, enable_gqa=True))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_step_equals_full_attention_over_the_context(case, backend, dtype):
    skip_unavailable(backend)
    q, k_cache, v_cache, lengths, key, value = make_step(case, torch.float64)
    window = case[-1]
    expected = full_attention_rows(q, k_cache, v_cache, lengths, key, value, window)
    plain = full_attention_rows(*[t.to(dtype) if t.is_floating_point() else t
                                  for t in (q, k_cache, v_cache, lengths, key, value)], window)
    caches = [k_cache.to(dtype), v_cache.to(dtype)]
    filled = [c.clone() for c in caches]
    out = attention_with_kv_cache(q.to(dtype), *caches, lengths, key.to(dtype), value.to(dtype),
                                  window=window or None, backend=backend)
    assert out.dtype == dtype
    assert_within_rule("out", out, plain, expected)
    # The new rows landed at each row's length, and nothing else in the caches moved.
    for b, n in enumerate(lengths.tolist()):
        filled[0][b, :, n:n + key.shape[2]] = key[b].to(dtype)
        filled[1][b, :, n:n + key.shape[2]] = value[b].to(dtype)
    assert torch.equal(caches[0], filled[0]) and torch.equal(caches[1], filled[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_new_rows_and_not_causal(backend):
    """Query rows against the filled prefix alone, causal (bottom-right) and not."""
    skip_unavailable(backend)
    case = CASES["rows-d40"]
    q, k_cache, v_cache, lengths, _, _ = make_step(case, torch.float64, new_rows=False)
    lengths = lengths.clamp(min=case[3])
    for causal in (True, False):
        expected = full_attention_rows(q, k_cache, v_cache, lengths, None, None, 0, causal)
        got = attention_with_kv_cache(q, k_cache, v_cache, lengths, is_causal=causal,
                                      backend=backend)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_log_sum_exp_and_empty_rows(backend):
    """A row with an empty cache and no new rows sees nothing: zeros and lse -inf."""
    skip_unavailable(backend)
    q, k_cache, v_cache, _, _, _ = make_step(CASES["step-gqa"], torch.float64, new_rows=False)
    lengths = torch.tensor([0, 5, 70], dtype=torch.int32)
    out, lse = attention_with_kv_cache(q, k_cache, v_cache, lengths, return_lse=True,
                                       backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and (lse[0] == float("-inf")).all()
    scores = (q[1:] @ k_cache.repeat_interleave(2, 1)[1:].transpose(-1, -2)) / 24 ** 0.5
    visible = torch.arange(70)[None, None, None, :] < lengths[1:, None, None, None]
    expected = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse[1:], expected, atol=1e-12, rtol=1e-12)


def test_a_generation_loop_equals_the_whole_sequence():
    """Ten one-token steps, each appending its key/value, give full causal attention's rows."""
    skip_unavailable("triton")
    B, H, S, E, T = 2, 2, 40, 16, 10
    q, k, v = (torch.randn(B, H, T, E, dtype=torch.float64) for _ in range(3))
    k_cache, v_cache = torch.zeros(B, H, S, E, dtype=torch.float64), torch.zeros(
        B, H, S, E, dtype=torch.float64)
    lengths = torch.zeros(B, dtype=torch.int32)
    steps = []
    for t in range(T):
        steps.append(attention_with_kv_cache(q[:, :, t:t + 1], k_cache, v_cache, lengths,
                                             k[:, :, t:t + 1], v[:, :, t:t + 1],
                                             backend="triton"))
        lengths += 1
    expected = reference_attention.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(torch.cat(steps, 2), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_caches_and_int64_lengths(backend):
    """A cache that is a slice of a bigger buffer (as a model's per-layer view) and int64
    lengths on the device."""
    skip_unavailable(backend)
    case = CASES["step-gqa"]
    q, k_cache, v_cache, lengths, key, value = make_step(case, torch.float64)
    big_k = torch.zeros(3, 2, 80, 2, 24, dtype=torch.float64)
    big_v = torch.zeros(3, 2, 80, 2, 24, dtype=torch.float64)
    k_view, v_view = big_k[:, :, :70, 1], big_v[:, :, :70, 1]
    k_view.copy_(k_cache), v_view.copy_(v_cache)
    expected = full_attention_rows(q, k_cache, v_cache, lengths, key, value, 0)
    got = attention_with_kv_cache(q, k_view, v_view, lengths.long(), key, value,
                                  backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    assert torch.equal(big_k[:, :, :, 0], torch.zeros_like(big_k[:, :, :, 0]))


def test_auto_on_cpu_is_torch():
    decision = fastseq.explain(attention_with_kv_cache, *make_step(CASES["single-row"],
                                                                   torch.float32)[:4]).decisions
    assert decision[0].chosen == ("triton" if TRITON_TEST_DEVICE.type == "cuda" else "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_is_refused_before_anything_is_written(backend):
    skip_unavailable(backend)
    q, k_cache, v_cache, lengths, key, value = make_step(CASES["rows-d40"], torch.float32)
    lengths[1] = 45 - 3  # 4 new rows do not fit in the 3 free positions
    before = k_cache.clone()
    if TRITON_TEST_DEVICE.type == "cuda":  # a device-side assert would end the CUDA context
        pytest.skip("CUDA lengths are checked by a device-side assert")
    with pytest.raises(fastseq.InputError, match="cache overflow.*4 new positions"):
        attention_with_kv_cache(q, k_cache, v_cache, lengths, key, value, backend=backend)
    assert torch.equal(k_cache, before)
    with pytest.raises(fastseq.InputError, match="cache overflow"):
        attention_with_kv_cache(q, k_cache, v_cache, -1, backend=backend)


@pytest.mark.parametrize("bad, message", [
    (lambda a: a.update(query=a["query"][0]), "query must be 4-D"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :, :, :5]), "k_cache must be"),
    (lambda a: a.update(v_cache=a["v_cache"][:1]), "v_cache must be"),
    (lambda a: a.update(query=a["query"][:, :1]), "multiple of the caches'"),
    (lambda a: a.update(value=None), "key and value go together"),
    (lambda a: a.update(key=a["key"][:, :1]), "key must be"),
    (lambda a: a.update(value=a["value"][..., :3]), "value must be"),
    (lambda a: a.update(k_cache=a["k_cache"].double()), "k_cache.*dtype"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), "cache_seqlens must be"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].float()), "cache_seqlens must be"),
    (lambda a: a.update(window=-2), "window must be"),
    (lambda a: a.update(query=a["query"].requires_grad_()), "forward only"),
])
def test_errors_name_the_argument(bad, message):
    q, k_cache, v_cache, lengths, key, value = make_step(CASES["rows-d40"], torch.float32)
    args = dict(query=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lengths, key=key,
                value=value)
    bad(args)
    with pytest.raises(fastseq.InputError, match=message):
        attention_with_kv_cache(**args)


def test_opcheck():
    skip_unavailable("triton")
    q, k_cache, v_cache, lengths, key, value = make_step(CASES["step-gqa"], torch.float32)
    lengths = lengths.to(q.device)
    torch.library.opcheck(torch.ops.fastseq.attention_decode_triton,
                          (q, k_cache, v_cache, lengths + 1, True, -1, 0, 0.2))
    torch.library.opcheck(torch.ops.fastseq.kv_cache_append_triton,
                          (k_cache, v_cache, key, value, lengths))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_fullgraph(backend):
    """A step compiles whole (no graph break on the lengths or the overflow check) and writes
    the caches in place like the eager call."""
    skip_unavailable(backend)
    q, k_cache, v_cache, lengths, key, value = make_step(CASES["mqa-window"], torch.float32)

    def step(q, k_cache, v_cache, lengths, key, value):
        return attention_with_kv_cache(q, k_cache, v_cache, lengths, key, value, window=9,
                                       backend=backend)

    caches = [k_cache.clone(), v_cache.clone()]
    eager = step(q, *caches, lengths, key, value)
    torch._dynamo.reset()
    compiled_caches = [k_cache.clone(), v_cache.clone()]
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, *compiled_caches, lengths,
                                                                   key, value)
    torch.testing.assert_close(got, eager)
    assert torch.equal(compiled_caches[0], caches[0]) and torch.equal(compiled_caches[1],
                                                                      caches[1])


@pytest.mark.parametrize("rows, causal, shifted", [(1, False, False), (5, True, False),
                                                   (16, True, True), (3, False, True)])
def test_attention_takes_the_decode_kernels_for_short_queries(rows, causal, shifted):
    """fastseq.ops.attention on Triton: <= 16 query rows against >= 256 keys, no mask, dropout
    or gradient, runs the split-KV kernels (explain says so) and gives the reference's out
    and lse, for torch's top-left causal and the bottom-right CausalBias; with a gradient
    needed it stays on the fused kernel."""
    skip_unavailable("triton")
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(2, 4, rows, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 300, 16, dtype=torch.float64), torch.randn(2, 2, 300, 8,
                                                                       dtype=torch.float64)
    mask = causal_lower_right(rows, 300) if shifted else None
    kwargs = dict(attn_mask=mask, is_causal=causal and not shifted, enable_gqa=True)
    report = fastseq.explain(fastseq.ops.attention, q, k, v, **kwargs, return_lse=True,
                             backend="triton")
    assert "split-KV decode" in report.decisions[0].variant
    out, lse = report.result
    shift = 300 - rows if shifted else 0
    expected = reference_attention.scaled_dot_product_attention(
        q, k, v, None, is_causal=causal or shifted, enable_gqa=True, return_lse=True,
        causal_shift=shift)
    torch.testing.assert_close(out, expected[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, expected[1], atol=1e-12, rtol=1e-12)
    report = fastseq.explain(fastseq.ops.attention, q.requires_grad_(), k, v, **kwargs,
                             backend="triton")
    assert "fused forward" in report.decisions[0].variant


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_module_prefill_ragged_prompts_then_steps(backend):
    """fastseq.nn.KVCache: a right-padded prompt prefilled, the rows' real prompt lengths set,
    then one-token steps: each row equals causal attention over its own prompt and steps."""
    skip_unavailable(backend)
    B, HQ, HK, E, P, T = 3, 4, 2, 16, 7, 5
    prompt_lengths = [7, 3, 5]
    cache = fastseq.nn.KVCache(B, HK, 20, E, dtype=torch.float64)
    assert cache.state_dict() == {}
    q, k, v = torch.randn(B, HQ, P, E), torch.randn(B, HK, P, E), torch.randn(B, HK, P, E)
    q, k, v = q.double(), k.double(), v.double()
    cache(q, k, v, backend=backend)
    cache.reset(prompt_lengths)
    steps = [torch.randn(B, H, T, E, dtype=torch.float64) for H in (HQ, HK, HK)]
    outs = [cache(*[s[:, :, t:t + 1] for s in steps], backend=backend) for t in range(T)]
    assert cache.lengths.tolist() == [n + T for n in prompt_lengths]
    for b, n in enumerate(prompt_lengths):
        keys = torch.cat([k[b, :, :n], steps[1][b]], 1)
        values = torch.cat([v[b, :, :n], steps[2][b]], 1)
        expected = reference_attention.scaled_dot_product_attention(
            steps[0][b], keys, values, None, is_causal=True, enable_gqa=True,
            causal_shift=n)
        torch.testing.assert_close(torch.cat([o[b] for o in outs], 1), expected, atol=1e-12,
                                   rtol=1e-12)


def test_kv_cache_module_refuses_overflow_and_bad_lengths_on_the_host():
    cache = fastseq.nn.KVCache(2, 1, 6, 8)
    q, k = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8)
    cache(q, k, k)
    with pytest.raises(fastseq.InputError, match="cache overflow.*up to 4 of 6"):
        cache(q, k, k)
    assert cache.lengths.tolist() == [4, 4]
    with pytest.raises(fastseq.InputError, match=r"lengths must lie in \[0, 6\]"):
        cache.reset([1, 7])
    with pytest.raises(fastseq.InputError, match="one per row"):
        cache.reset([1, 2, 3])
    with pytest.raises(fastseq.InputError, match="capacity must be a positive int"):
        fastseq.nn.KVCache(2, 1, 0, 8)
    cache.reset()
    assert cache.max_length == 0 and cache.lengths.tolist() == [0, 0]

"""Decoding against a key/value cache: one step (Lq = 1) of fastseq.ops.attention_with_kv_cache
(split-KV Triton kernels) against torch's scaled_dot_product_attention at Lq = 1 (each backend
named: default dispatch, flash, memory-efficient, cuDNN, math) and the plain formulation
(q k^T, softmax, @ v), over cache lengths 1k-64k, batch 1-64, head dims 64/128, GQA 32 query
heads on 8 key/value heads (Llama's ratio).

A step's floor is reading K and V once: 2 B Hk S D x 2 bytes (bf16). The table reports GB/s of
that traffic and its fraction of the measured copy bandwidth (the issue's goal on an H100/H200:
>= 70% at 8k keys and above); microseconds per step; tokens/s = B / step time. The fastseq
step also appends the step's key and value to the cache (the peers are handed the filled
cache), so its figure includes that write.

A second grid finds the crossover of fastseq.ops.attention's rule (split-KV for <= 16 query
rows against >= 256 keys): the split-KV kernels and the fused forward kernel, each called
directly, at Lq = 1..64.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastseq

from .conftest import DEVICE, GPU_CASES, HEADLINE, PRESET, record_error, run_timed

HQ, HK = 32, 8
if GPU_CASES:
    CACHE_LENGTHS = [1024, 4096, 8192, 16384, 65536]
    BATCHES = [1, 16, 64]
    HEAD_DIMS = [64, 128]
    PROVIDERS = ["fastseq-triton", "torch-sdpa", "torch-sdpa-flash", "torch-sdpa-efficient",
                 "torch-sdpa-cudnn", "torch-sdpa-math", "plain"]
    CROSSOVER_ROWS, CROSSOVER_KEYS = [1, 4, 16, 32, 64], [1024, 8192]
    if PRESET != "full":  # the corners and the middle: 64k at batch 64 is 34 GB of cache
        CACHE_LENGTHS, BATCHES = [1024, 8192, 65536], [1, 16, 64]
    if HEADLINE:  # the GPU script's stage 5: the goal's cases (>= 8k keys), a few minutes
        CACHE_LENGTHS, BATCHES, HEAD_DIMS = [8192, 65536], [1, 16], [128]
        PROVIDERS = ["fastseq-triton", "torch-sdpa", "torch-sdpa-flash", "plain"]
        CROSSOVER_ROWS, CROSSOVER_KEYS = [1, 16, 64], [8192]
else:
    # A 2-core CPU: one small step (the fastseq call is torch's own kernels there).
    CACHE_LENGTHS, BATCHES, HEAD_DIMS = [2048], [2], [64]
    PROVIDERS = ["fastseq", "torch-sdpa", "plain"]
    CROSSOVER_ROWS, CROSSOVER_KEYS = [], []
SDPA_BACKENDS = {"torch-sdpa-flash": "FLASH_ATTENTION", "torch-sdpa-cudnn": "CUDNN_ATTENTION",
                 "torch-sdpa-efficient": "EFFICIENT_ATTENTION", "torch-sdpa-math": "MATH"}
DTYPE = torch.bfloat16 if GPU_CASES else torch.float32


def sdpa_context(provider):
    if provider not in SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[provider]))


def plain_step(q, k, v):
    """The formulation without a fused kernel: the KV heads repeated for GQA, scores, softmax."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.float(), -1).to(v.dtype) @ v


def step_call(provider, q, k_cache, v_cache, new_k, new_v, capacity):
    """f() running one decode step for the provider. fastseq's writes the step's row at
    position capacity - 1 of a cache filled to capacity - 1 (the same position every call);
    the peers attend the full cache."""
    if provider.startswith("fastseq"):
        backend = "triton" if provider == "fastseq-triton" else None
        lengths = torch.full((q.shape[0],), capacity - 1, dtype=torch.int32, device=DEVICE)
        return lambda: fastseq.ops.attention_with_kv_cache(q, k_cache, v_cache, lengths, new_k,
                                                           new_v, backend=backend)
    if provider == "plain":
        return lambda: plain_step(q, k_cache, v_cache)
    return lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)


@pytest.mark.parametrize("capacity", CACHE_LENGTHS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_decode_step(benchmark, provider, dim, batch, capacity):
    if provider == "torch-sdpa-math" and batch * capacity > 16 * 8192:
        pytest.skip("the math backend materialises the scores: only the smaller caches")
    if provider == "plain" and batch * capacity > 64 * 8192:
        pytest.skip("the plain formulation repeats the GQA heads: 4x the cache in memory")
    q = torch.randn(batch, HQ, 1, dim, device=DEVICE, dtype=DTYPE)
    k_cache, v_cache = (torch.randn(batch, HK, capacity, dim, device=DEVICE, dtype=DTYPE)
                        for _ in range(2))
    new_k, new_v = k_cache[:, :, -1:].clone(), v_cache[:, :, -1:].clone()
    fn = step_call(provider, q, k_cache, v_cache, new_k, new_v, capacity)
    with sdpa_context(provider), torch.no_grad():
        try:
            got = fn()
        except RuntimeError as error:  # a backend that cannot run this case says so here
            pytest.skip(f"{provider} cannot run this case: {str(error).splitlines()[0][:200]}")
        one = [t[:1, :HQ // HK].double() for t in (q, k_cache[:, :1], v_cache[:, :1])]
        expected = fastseq.reference.scaled_dot_product_attention(*one)
        record_error(benchmark, got[:1, :HQ // HK], expected)
        gbytes = 2 * batch * HK * capacity * dim * k_cache.element_size() / 1e9
        run_timed(benchmark, fn, calls_per_round=20, op="decode", provider=provider,
                  passes="fwd", gbytes=gbytes, tokens_per_call=batch,
                  shape=f"B={batch} Hq={HQ} Hk={HK} S={capacity} D={dim} Lq=1",
                  dtype=str(DTYPE).split(".")[1], length=capacity)


PAGED_LAYOUTS = ["contiguous", "paged-16", "paged-64", "paged-256", "paged-16-rotary-leftpad"]


def paged_step(layout, batch, capacity, dim):
    """(f(), the step's expected output) of one decode step on a contiguous cache or the same
    rows in a shuffled pool of pages (rotary and left padding added in the last layout)."""
    q = torch.randn(batch, HQ, 1, dim, device=DEVICE, dtype=DTYPE)
    k_rows, v_rows = (torch.randn(batch, HK, capacity, dim, device=DEVICE, dtype=DTYPE)
                      for _ in range(2))
    new_k, new_v = k_rows[:, :, -1:].clone(), v_rows[:, :, -1:].clone()
    lengths = torch.full((batch,), capacity - 1, dtype=torch.int32, device=DEVICE)
    extra = {}
    if layout == "contiguous":
        k_cache, v_cache = k_rows, v_rows
    else:
        page = int(layout.split("-")[1])
        per_row = capacity // page
        order = torch.randperm(batch * per_row, device=DEVICE)
        table = order.view(batch, per_row).int()
        k_cache, v_cache = (torch.empty(batch * per_row, HK, page, dim, device=DEVICE,
                                        dtype=DTYPE) for _ in range(2))
        for pool, rows in ((k_cache, k_rows), (v_cache, v_rows)):
            pool[table.long()] = rows.view(batch, HK, per_row, page, dim).transpose(1, 2)
        extra["block_table"] = table
    if layout.endswith("rotary-leftpad"):
        angle = torch.rand(capacity, dim // 4, device=DEVICE) * 6.28
        extra.update(rotary_cos=angle.cos(), rotary_sin=angle.sin(),
                     cache_leftpad=torch.full((batch,), 7, dtype=torch.int32, device=DEVICE))
    fn = lambda: fastseq.ops.attention_with_kv_cache(  # noqa: E731
        q, k_cache, v_cache, lengths, new_k, new_v, **extra)
    return fn, q, k_rows, v_rows, extra


@pytest.mark.parametrize("layout", PAGED_LAYOUTS)
def bench_paged_decode(benchmark, layout):
    """One decode step (Lq = 1) on a paged cache against the same rows contiguous: what the
    page lookups cost (a gathered key row per BLOCK_N keys from a block table read per
    block), and with rotary and left padding on top."""
    if HEADLINE:
        pytest.skip("not a headline case")
    batch, capacity, dim = (16, 8192, 128) if GPU_CASES else (2, 256, 64)
    fn, q, k_rows, v_rows, extra = paged_step(layout, batch, capacity, dim)
    with torch.no_grad():
        got = fn()
        if "rotary_cos" not in extra:  # the plain rows' answer (rotary changes the keys)
            one = [t[:1, :HQ // HK].double() for t in (q, k_rows[:, :1], v_rows[:, :1])]
            record_error(benchmark, got[:1, :HQ // HK],
                         fastseq.reference.scaled_dot_product_attention(*one))
        gbytes = 2 * batch * HK * capacity * dim * k_rows.element_size() / 1e9
        run_timed(benchmark, fn, calls_per_round=20, op="decode_paged", provider=layout,
                  passes="fwd", gbytes=gbytes, tokens_per_call=batch,
                  shape=f"B={batch} Hq={HQ} Hk={HK} S={capacity} D={dim} Lq=1",
                  dtype=str(DTYPE).split(".")[1], length=capacity)


@pytest.mark.parametrize("keys", CROSSOVER_KEYS)
@pytest.mark.parametrize("rows", CROSSOVER_ROWS)
@pytest.mark.parametrize("provider", ["fastseq-split-kv", "fastseq-fused-forward"])
def bench_decode_crossover(benchmark, provider, rows, keys):
    """Where fastseq.ops.attention's rule should switch kernels: both, called directly, at
    batch 4, 32 query heads on 8, head dim 128, bottom-right causal."""
    batch, dim = 4, 128
    q = torch.randn(batch, HQ, rows, dim, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(batch, HK, keys, dim, device=DEVICE, dtype=DTYPE) for _ in range(2))
    scale = dim ** -0.5
    if provider == "fastseq-split-kv":
        lengths = torch.full((batch,), keys, dtype=torch.int32, device=DEVICE)
        fn = lambda: torch.ops.fastseq.attention_decode_triton(  # noqa: E731
            q, k, v, lengths, True, -rows, 0, scale)[0]
    else:
        fn = lambda: torch.ops.fastseq.attention_forward_triton(  # noqa: E731
            q, k, v, None, None, None, None, None, None, None, None, dropout_p=0.0,
            bottom_right=True, window_left=-1, window_right=0, softcap=0.0, max_seqlen_q=0,
            max_seqlen_k=0, scale=scale)[0]
    with torch.no_grad():
        one = [t[:1, :HQ // HK].double() for t in (q, k[:, :1], v[:, :1])]
        expected = fastseq.reference.scaled_dot_product_attention(
            *one, is_causal=True, causal_shift=keys - rows)
        record_error(benchmark, fn()[:1, :HQ // HK], expected)
        gbytes = 2 * batch * HK * keys * dim * k.element_size() / 1e9
        run_timed(benchmark, fn, calls_per_round=20, op="decode_crossover", provider=provider,
                  passes="fwd", gbytes=gbytes,
                  shape=f"B={batch} Hq={HQ} Hk={HK} S={keys} D={dim} Lq={rows}",
                  dtype=str(DTYPE).split(".")[1], length=rows)


REL_KEYS = ([4096] if HEADLINE else [1024, 4096]) if GPU_CASES else []


@pytest.mark.parametrize("keys", REL_KEYS)
@pytest.mark.parametrize("batch", [1, 16] if GPU_CASES else [])
@pytest.mark.parametrize("provider", ["fastseq-split-kv", "fastseq-fused-forward", "reference"])
def bench_rel_decode_step(benchmark, provider, batch, keys):
    """A Transformer-XL generation step's attention: one query row against memory + itself,
    16 heads of 64 (the base model's scale), the position term over every distance: the split-KV
    decode kernel, the fused forward kernel, the reference formulation."""
    H, D = 16, 64
    q = torch.randn(batch, H, 1, D, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(batch, H, keys, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    pos = torch.randn(keys, H, D, device=DEVICE, dtype=DTYPE)
    u, w = (torch.randn(H, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    scale = D ** -0.5
    if provider == "fastseq-split-kv":
        fn = lambda: torch.ops.fastseq.rel_attention_decode_triton(  # noqa: E731
            q + u[:, None], q + w[:, None], k, v, pos, True, None, 0, scale)[0]
    elif provider == "fastseq-fused-forward":
        fn = lambda: torch.ops.fastseq.rel_attention_forward_triton(  # noqa: E731
            q + u[:, None], q + w[:, None], k, v, pos, None, None, 0.0, True, None, 0, scale)[0]
    else:
        fn = lambda: fastseq.reference.relative_attention(q, k, v, pos, u, w)  # noqa: E731
    with torch.no_grad():
        one = [t[:1].double() for t in (q, k, v)]
        expected = fastseq.reference.relative_attention(*one, pos.double(), u.double(),
                                                        w.double())
        record_error(benchmark, fn()[:1], expected)
        gbytes = (2 * batch + 1) * H * keys * D * k.element_size() / 1e9  # K, V and pos
        run_timed(benchmark, fn, calls_per_round=20, op="rel_decode", provider=provider,
                  passes="fwd", gbytes=gbytes, shape=f"B={batch} H={H} Lk={keys} D={D} Lq=1",
                  dtype=str(DTYPE).split(".")[1], length=keys)


def gpu_smoke(out) -> bool:
    """A decode step against a ragged, GQA cache (split-KV kernels, forward only): four new
    rows appended per row, causal among themselves, with and without a window; then the same
    on a shuffled paged pool with left padding, rotary, soft-capping, ALiBi and sinks. The
    caches are leaves 1 and 2: each call appends into its own copy. Plain PyTorch is the
    reference computed in the tested dtype (upcast=False)."""
    from .smoke_checks import DEVICE, DTYPES, ATTENTION, rand, check
    B, H, L, M, D = ATTENTION
    capacity, new = 4 * L, 4
    lengths = torch.tensor([capacity - new, L][:B], dtype=torch.int32, device=DEVICE)
    leaves = [rand(B, H, new, D), rand(B, H // 2, capacity, D), rand(B, H // 2, capacity, D),
              rand(B, H // 2, new, D), rand(B, H // 2, new, D)]
    ok = True
    for window in (None, L // 2):
        def call(backend, t, window=window):
            q, k_cache, v_cache, key, value = t
            if backend in ("plain", "reference"):
                return [fastseq.reference.kv_cache.attention_with_kv_cache(
                    q, k_cache.clone(), v_cache.clone(), lengths, key, value,
                    window=window or 0, upcast=backend == "reference")[0]]
            return [fastseq.ops.attention_with_kv_cache(
                q, k_cache.clone(), v_cache.clone(), lengths, key, value, window=window,
                backend=backend)]
        for dtype in DTYPES:
            ok &= check(out, "kv_cache", f"B={B} Hq={H} Hk={H // 2} S_max={capacity} D={D} "
                        f"Lq={new} window={window}", "triton", dtype, call, leaves, ["out"], 1,
                        forward_only=True, plain="plain")
    return ok & _smoke_paged_step(out, check, rand, DEVICE, DTYPES, ATTENTION)


def _smoke_paged_step(out, check, rand, device, dtypes, sizes) -> bool:
    B, H, L, M, D = sizes
    page, new = 16, 4
    per_row = -(-4 * L // page)
    table = torch.randperm(B * per_row + 5, device=device)[:B * per_row].view(B, per_row).int()
    lengths = torch.tensor([per_row * page - new, L][:B], dtype=torch.int32, device=device)
    angle = torch.rand(per_row * page + new, D // 4, dtype=torch.float64, device=device) * 6.28
    extra = dict(cache_leftpad=torch.tensor([5, 0], dtype=torch.int32, device=device)[:B],
                 block_table=table, rotary_cos=angle.cos(), rotary_sin=angle.sin(),
                 softcap=30.0, alibi_slopes=torch.rand(H, dtype=torch.float64, device=device),
                 sinks=rand(H))
    pool = B * per_row + 5
    leaves = [rand(B, H, new, D), rand(pool, H // 2, page, D), rand(pool, H // 2, page, D),
              rand(B, H // 2, new, D), rand(B, H // 2, new, D)]

    def call(backend, t):
        q, k_pool, v_pool, key, value = t
        if backend in ("plain", "reference"):
            return [fastseq.reference.kv_cache.attention_with_kv_cache(
                q, k_pool.clone(), v_pool.clone(), lengths, key, value, window=L,
                upcast=backend == "reference", **extra)[0]]
        return [fastseq.ops.attention_with_kv_cache(
            q, k_pool.clone(), v_pool.clone(), lengths, key, value, window=L, backend=backend,
            **extra)]
    ok = True
    for dtype in dtypes:
        ok &= check(out, "kv_cache", f"paged({page}) B={B} Hq={H} Hk={H // 2} D={D} Lq={new} "
                    f"leftpad+rotary+softcap+alibi+sinks window={L}", "triton", dtype, call,
                    leaves, ["out"], 1, forward_only=True, plain="plain")
    return ok

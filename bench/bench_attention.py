"""Scaled dot-product attention: fastseq's fused Triton kernel against torch's SDPA (each CUDA
backend named: default dispatch, flash, cuDNN, memory-efficient where it is the one taking
masks), flash-attn when installed, and nn.MultiheadAttention for the layer.

FLOP counts (the issue's convention): forward 4 B H L S D, halved for causal; backward 2.5x the
forward. Lengths run at a fixed number of tokens (B * L = 16k), so every case does the same
work per token pair row and the table reads as TFLOP/s against L.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastseq

from .conftest import DEVICE, GPU_CASES, HEADLINE, PRESET, pass_step, record_error, run_timed

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

if GPU_CASES:
    TOKENS, HEAD_WIDTH = 16384, 2048  # B * L tokens; heads * D = 2048 (16 heads of 128)
    LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
    HEAD_DIMS = [64, 128]
    DTYPES = [torch.bfloat16, torch.float16]
    PROVIDERS = ["fastseq-triton", "torch-sdpa", "torch-sdpa-flash", "torch-sdpa-cudnn"] + \
        (["flash-attn"] if flash_attn_func is not None else [])
    if HEADLINE:  # the target: head dim 128, bf16, 1k-16k
        LENGTHS, HEAD_DIMS, DTYPES = LENGTHS[1:], [128], [torch.bfloat16]
else:
    # A 2-core CPU: one small case per pass (B=2, 4 heads), seconds not minutes.
    TOKENS, HEAD_WIDTH = 512, 256
    LENGTHS, HEAD_DIMS, DTYPES = [256], [64], [torch.float32]
    PROVIDERS = ["fastseq", "torch-sdpa", "reference"]
SDPA_BACKENDS = {"torch-sdpa-flash": "FLASH_ATTENTION", "torch-sdpa-cudnn": "CUDNN_ATTENTION",
                 "torch-sdpa-efficient": "EFFICIENT_ATTENTION"}


def sdpa_context(provider):
    if provider not in SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[provider]))


def attention_call(provider, mask=None, causal=False):
    """f(q, k, v) in [B, H, L, D] for the provider."""
    if provider in ("fastseq-triton", "fastseq"):
        backend = "triton" if provider == "fastseq-triton" else None
        return lambda q, k, v: fastseq.ops.attention(q, k, v, mask, is_causal=causal,
                                                     backend=backend)
    if provider == "reference":
        return lambda q, k, v: fastseq.reference.attention.scaled_dot_product_attention(
            q, k, v, mask, is_causal=causal)
    if provider == "flash-attn":  # [B, L, H, D] layout
        return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), causal=causal).transpose(1, 2)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)


def check_attention(benchmark, fn, q, k, v, mask=None, causal=False):
    """The case's correctness check: batch 0, head 0 of its output against the float64
    reference (the whole [L, S] problem of one head, so the check stays cheap at 16k)."""
    with torch.no_grad():
        got = fn(q, k, v)[:1, :1]
    one = [t[:1, :1].double() for t in (q, k, v)]
    one_mask = None if mask is None else mask[:1]
    expected = fastseq.reference.attention.scaled_dot_product_attention(
        *one, one_mask if one_mask is None or one_mask.dtype == torch.bool else one_mask.double(),
        is_causal=causal)
    record_error(benchmark, got, expected)


def time_attention(benchmark, provider, fn, q, k, v, passes, flop_fwd, **info):
    leaves = [t.requires_grad_(passes != "fwd") for t in (q, k, v)]
    grad = torch.randn_like(q[..., :v.shape[-1]])
    if passes == "fwd":
        def step():
            with torch.no_grad():
                return fn(*leaves)
        flop = flop_fwd
    elif passes == "bwd":  # the backward alone, from one saved forward
        out = fn(*leaves)

        def step():
            torch.autograd.grad(out, leaves, grad, retain_graph=True)
        flop = 2.5 * flop_fwd
    else:
        def step():
            torch.autograd.grad(fn(*leaves), leaves, grad)
        flop = 3.5 * flop_fwd
    with sdpa_context(provider):
        step()  # a provider that cannot run the case fails here, before timing
        run_timed(benchmark, step, calls_per_round=5, op="attention", provider=provider,
                  passes=passes, gflop=flop / 1e9, **info)


def inputs(batch, heads, length, dim, dtype, kv_length=None):
    kv_length = kv_length or length
    q = torch.randn(batch, heads, length, dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, heads, kv_length, dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, heads, kv_length, dim, device=DEVICE, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("passes", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_attention(benchmark, provider, dtype, dim, length, causal, passes):
    if dtype == torch.float16 and length != 4096 and PRESET != "full":
        pytest.skip("fp16 at one length (L=4k) unless --full; bf16 covers the sweep")
    if provider == "torch-sdpa-cudnn" and passes != "fwd" and causal and length > 8192:
        pytest.skip("measured separately if cuDNN's causal backward is wanted at 16k")
    batch, heads = max(TOKENS // length, 1), HEAD_WIDTH // dim
    q, k, v = inputs(batch, heads, length, dim, dtype)
    flop = 4 * batch * heads * length * length * dim / (2 if causal else 1)
    fn = attention_call(provider, causal=causal)
    with sdpa_context(provider):
        check_attention(benchmark, fn, q, k, v, causal=causal)
    time_attention(benchmark, provider, fn, q, k, v, passes, flop,
                   shape=f"B={batch} H={heads} L={length} D={dim}{' causal' if causal else ''}",
                   dtype=str(dtype).split(".")[1], length=length)


MASKED_PROVIDERS = [p for p in PROVIDERS if p not in ("torch-sdpa-flash", "flash-attn")] + \
    (["torch-sdpa-efficient"] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("mask_kind", ["key-padding", "arbitrary"])
@pytest.mark.parametrize("provider", MASKED_PROVIDERS)
def bench_masked_attention(benchmark, provider, mask_kind, passes):
    """Where SDPA leaves its flash path: a padded batch (key_padding_mask [B, 1, 1, S], lengths
    spread over [L/4, L]) and an arbitrary bool mask [B, 1, L, S]."""
    if HEADLINE:
        pytest.skip("not a headline case")
    dtype = torch.bfloat16 if GPU_CASES else torch.float32
    batch, heads, length, dim = (8, 16, 2048, 128) if GPU_CASES else (2, 4, 128, 64)
    q, k, v = inputs(batch, heads, length, dim, dtype)
    if mask_kind == "key-padding":
        lengths = torch.linspace(length, length // 4, batch, device=DEVICE).long()
        mask = (torch.arange(length, device=DEVICE) < lengths[:, None]).view(batch, 1, 1, length)
    else:
        mask = torch.rand(batch, 1, length, length, device=DEVICE) < 0.7
    flop = 4 * batch * heads * length * length * dim
    fn = attention_call(provider, mask=mask)
    with sdpa_context(provider):
        check_attention(benchmark, fn, q, k, v, mask=mask)
    time_attention(benchmark, provider, fn, q, k, v, passes, flop,
                   shape=f"B={batch} H={heads} L={length} D={dim} {mask_kind}",
                   dtype=str(dtype).split(".")[1], length=length)


PACKED_PROVIDERS = ["fastseq-varlen", "fastseq-padded-lengths", "fastseq-padded-mask",
                    "torch-sdpa-padded"]


def packed_lengths():
    """Sequence lengths of a packed batch: spread over [L/4, L], as a padded batch's would be."""
    count, longest = (8, 2048) if GPU_CASES else (3, 96)
    return torch.linspace(longest, longest // 4, count).long().tolist()


def packed_call(provider, lengths, heads, dim, dtype):
    """(f(q, k, v), q, k, v, check) of one provider on the same tokens: packed [T, H, D] for
    varlen, else padded to the longest [B, H, Lmax, D] with the padding as key lengths (a
    description), as a bool mask, or (torch) materialized with the causal rule."""
    B, longest = len(lengths), max(lengths)
    lens = torch.tensor(lengths, device=DEVICE)
    if provider == "fastseq-varlen":
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                          device=DEVICE)
        q, k, v = (torch.randn(sum(lengths), heads, dim, device=DEVICE, dtype=dtype)
                   for _ in range(3))
        fn = lambda q, k, v: fastseq.ops.attention_varlen(  # noqa: E731
            q, k, v, cu, cu, longest, longest, is_causal=True)
        return fn, q, k, v, lambda out, q, k, v: (out[:lengths[0], :1].transpose(0, 1),
                                                  [t[:lengths[0], :1].transpose(0, 1)
                                                   for t in (q, k, v)])
    q, k, v = inputs(B, heads, longest, dim, dtype)
    padding = (torch.arange(longest, device=DEVICE) < lens[:, None]).view(B, 1, 1, longest)
    if provider == "fastseq-padded-lengths":
        mask = fastseq.ops.AttentionMask(causal=True, key_end=lens.to(torch.int32))
        fn = lambda q, k, v: fastseq.ops.attention(q, k, v, mask)  # noqa: E731
    elif provider == "fastseq-padded-mask":
        fn = lambda q, k, v: fastseq.ops.attention(q, k, v, padding, is_causal=True)  # noqa: E731
    else:
        full = padding & torch.ones(longest, longest, dtype=torch.bool, device=DEVICE).tril()
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, full)  # noqa: E731
    return fn, q, k, v, lambda out, q, k, v: (out[0, :1, :lengths[0]],
                                              [t[0, :1, :lengths[0]] for t in (q, k, v)])


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PACKED_PROVIDERS)
def bench_packed_attention(benchmark, provider, passes):
    """Packed variable-length sequences (attention_varlen) against the same tokens padded to
    the longest with the padding as lengths, as a mask, and through torch's SDPA; causal. The
    FLOPs counted are the useful ones (each sequence's own causal square), so TFLOP/s compare
    what each way gets done."""
    if HEADLINE:
        pytest.skip("not a headline case")
    dtype = torch.bfloat16 if GPU_CASES else torch.float32
    heads, dim = (16, 128) if GPU_CASES else (4, 64)
    lengths = packed_lengths()
    fn, q, k, v, first = packed_call(provider, lengths, heads, dim, dtype)
    with torch.no_grad():
        got, one = first(fn(q, k, v), q, k, v)
        expected = fastseq.reference.attention.scaled_dot_product_attention(
            *(t.double() for t in one), is_causal=True)
        record_error(benchmark, got, expected)
    flop = sum(2 * heads * n * n * dim for n in lengths)  # 4 B H L^2 D, halved for causal
    time_attention(benchmark, provider, fn, q, k, v, passes, flop,
                   shape=f"N={len(lengths)} H={heads} L={min(lengths)}..{max(lengths)} D={dim} "
                         f"causal", dtype=str(dtype).split(".")[1], length=max(lengths))


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["fastseq", "torch"])
def bench_multihead_attention(benchmark, provider, passes):
    """The layer (projections included), batch-first self-attention with key padding, in the
    need_weights=False mode Transformer layers use."""
    if HEADLINE:
        pytest.skip("not a headline case")
    dtype = torch.bfloat16 if GPU_CASES else torch.float32
    batch, length, embed, heads = (8, 2048, 1024, 16) if GPU_CASES else (2, 128, 256, 4)
    cls = fastseq.nn.MultiheadAttention if provider == "fastseq" else torch.nn.MultiheadAttention
    layer = cls(embed, heads, batch_first=True, device=DEVICE, dtype=dtype)
    x = torch.randn(batch, length, embed, device=DEVICE, dtype=dtype,
                    requires_grad=passes != "fwd")
    padding = torch.arange(length, device=DEVICE) >= torch.linspace(
        length, length // 2, batch, device=DEVICE).long()[:, None]

    def call():
        return layer(x, x, x, key_padding_mask=padding, need_weights=False)[0]

    # The check: torch's layer in float64 with the same weights.
    twin = torch.nn.MultiheadAttention(embed, heads, batch_first=True, device=DEVICE,
                                       dtype=torch.float64)
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        wide = x.detach().double()
        record_error(benchmark, call(), twin(wide, wide, wide, key_padding_mask=padding,
                                             need_weights=False)[0])

    step = pass_step(passes, call)
    flop = 4 * batch * heads * length * length * (embed // heads) + 8 * batch * length * embed ** 2
    run_timed(benchmark, step, calls_per_round=5, op="multihead_attention", provider=provider,
              passes=passes, gflop=flop * (1 if passes == "fwd" else 3) / 1e9,
              shape=f"B={batch} L={length} E={embed} H={heads} padded",
              dtype=str(dtype).split(".")[1], length=length)


def gpu_smoke(out) -> bool:
    """This family's case in bench/gpu_smoke.py (the GPU run's stage 1): fastseq against
    plain PyTorch and float64 truth under the tolerance rule; True when every quantity keeps it.
    Plain PyTorch is the reference computed in the tested dtype (upcast=False)."""
    from .smoke_checks import DEVICE, DTYPES, ATTENTION, rand, check
    from torch.nn.attention.bias import causal_lower_right

    B, H, L, M, D = ATTENTION
    ok = True
    padding = torch.arange(L, device=DEVICE) < torch.tensor([L, L - L // 3], device=DEVICE)[:B, None]
    # (variant, key length, mask, is_causal); bottom-right causal against M cached keys.
    for variant, S, mask, causal in (("causal", L, None, True),
                                     ("key-padding", L, padding.view(B, 1, 1, L), False),
                                     ("causal-lower-right", L + M, causal_lower_right(L, L + M),
                                      False)):
        leaves = [rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D)]

        def call(backend, t, mask=mask, causal=causal):
            if backend == "plain":
                explicit = mask._materialize(t[0].device) if hasattr(mask, "_materialize") \
                    else mask
                return [fastseq.reference.attention.scaled_dot_product_attention(
                    *t, explicit, is_causal=causal, upcast=False)]
            return [fastseq.ops.attention(*t, mask, is_causal=causal, backend=backend)]
        for dtype in DTYPES:
            ok &= check(out, "attention", f"B={B} H={H} L={L} S={S} D={D} {variant}", "triton",
                        dtype, call, leaves, ["out", "dq", "dk", "dv"], S, plain="plain")
    ok &= _smoke_described(out, check, rand, DEVICE, DTYPES, ATTENTION)
    ok &= _smoke_packed(out, check, rand, DEVICE, DTYPES, ATTENTION)
    ok &= _smoke_sdpa_provider(out, check, rand, DEVICE, DTYPES, ATTENTION)
    return ok


def _smoke_sdpa_provider(out, check, rand, device, dtypes, sizes) -> bool:
    """Unmodified F.scaled_dot_product_attention (its flash backend forced) with fastseq
    activated as torch's flash provider: causal, GQA, forward and backward. The row's variant
    counts the provider's kernel calls, so a run that never reached them shows it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from fastseq import sdpa_provider

    B, H, L, _, D = sizes
    leaves = [rand(B, H, L, D), rand(B, H // 2, L, D), rand(B, H // 2, L, D)]

    def call(backend, t):
        if backend in ("plain", "reference"):
            return [fastseq.reference.attention.scaled_dot_product_attention(
                *t, is_causal=True, enable_gqa=True, upcast=backend == "reference")]
        fastseq.activate_sdpa()
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return [torch.nn.functional.scaled_dot_product_attention(
                    *t, is_causal=True, enable_gqa=True)]
        finally:
            fastseq.restore_sdpa()
    ok = True
    for dtype in dtypes:
        if device.type == "cuda" and dtype == torch.float32:
            continue  # SDPA's flash backend takes half precision only
        ok &= check(out, "attention", f"B={B} H={H} Hk={H // 2} L={L} D={D} causal GQA via "
                    f"F.scaled_dot_product_attention", "triton", dtype, call, leaves,
                    ["out", "dq", "dk", "dv"], L, plain="plain",
                    label="triton (SDPA flash provider)",
                    variant=lambda _: f"provider calls so far {sdpa_provider.CALLS}")
    return ok


def _smoke_described(out, check, rand, device, dtypes, sizes) -> bool:
    """A window, key ranges (bottom-right), soft-capping, ALiBi and learned sinks together:
    forward and backward, the sinks' gradient included."""
    B, H, L, M, D = sizes
    S = L + M
    key_end = torch.tensor([S, S - S // 5], dtype=torch.int32, device=device)[:B]
    key_start = torch.tensor([0, 3], dtype=torch.int32, device=device)[:B]
    slopes = torch.rand(H, device=device) * 0.1
    leaves = [rand(B, H, L, D), rand(B, H, S, D), rand(B, H, S, D), rand(H)]

    def call(backend, t):
        q, k, v, sinks = t
        options = dict(window=(L // 3, None), bottom_right=True, softcap=20.0,
                       alibi_slopes=slopes, sinks=sinks, key_start=key_start, key_end=key_end)
        if backend in ("plain", "reference"):
            return [fastseq.reference.attention.scaled_dot_product_attention(
                q, k, v, is_causal=True, upcast=backend == "reference", **options)]
        mask = fastseq.ops.AttentionMask(causal=True, window=(L // 3, None), align="bottom_right",
                                         key_start=key_start, key_end=key_end)
        return [fastseq.ops.attention(q, k, v, mask, softcap=20.0, alibi_slopes=slopes,
                                      sinks=sinks, backend=backend)]
    ok = True
    for dtype in dtypes:
        ok &= check(out, "attention", f"B={B} H={H} L={L} S={S} D={D} window+ranges+softcap+"
                    f"alibi+sinks", "triton", dtype, call, leaves,
                    ["out", "dq", "dk", "dv", "dsinks"], S, plain="plain")
    return ok


def _smoke_packed(out, check, rand, device, dtypes, sizes) -> bool:
    """Packed variable-length sequences (attention_varlen), causal, GQA, one empty sequence."""
    _, H, L, _, D = sizes
    lengths = [L, 1, 0, L // 2 + 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    T = sum(lengths)
    leaves = [rand(T, H, D), rand(T, H // 2, D), rand(T, H // 2, D)]

    def call(backend, t):
        if backend in ("plain", "reference"):
            return [fastseq.reference.attention.packed_attention(
                *t, cu, cu, is_causal=True, bottom_right=True, upcast=backend == "reference")]
        return [fastseq.ops.attention_varlen(*t, cu, cu, max(lengths), max(lengths),
                                             is_causal=True, backend=backend)]
    ok = True
    for dtype in dtypes:
        ok &= check(out, "attention", f"varlen H={H}/{H // 2} D={D} lengths={lengths} causal",
                    "triton", dtype, call, leaves, ["out", "dq", "dk", "dv"], L, plain="plain")
    return ok

"""fastseq behind torch.nn.functional.scaled_dot_product_attention: PyTorch's flash-attention
provider registry (torch.nn.attention.register_flash_attention_impl, torch >= 2.11).

    fastseq.activate_sdpa()      # F.scaled_dot_product_attention's flash path runs fastseq
    ...                          # unmodified code: F.scaled_dot_product_attention(q, k, v, ...)
    fastseq.restore_sdpa()       # torch's own flash kernel again

Importing fastseq registers the provider under the name "fastseq" (listed by
torch.nn.attention.list_flash_attention_impls()); it is never activated on import, as the
registry asks of providers, so libraries that provide kernels can coexist. Activation overrides
the CUDA kernels of aten::_scaled_dot_product_flash_attention and its backward with fastseq's
fused Triton attention (the forward and the two backward kernels behind fastseq.ops.attention),
through a torch.library.Library whose destruction (restore) removes them again.

What it covers is exactly what SDPA sends to its flash backend: CUDA fp16/bf16 tensors
[B, H, L, E], head dims up to 256 (fastseq's limit too), no attn_mask, is_causal (top-left),
dropout (fastseq's own generator draw, replayed by the backward from the seed it returns in
place of flash's philox state), scale, GQA where SDPA routes it to flash. Everything SDPA sends
elsewhere (a tensor mask, fp32, CPU tensors: its memory-efficient, cuDNN or math backends) is
untouched, so only the calls that would have run torch's flash kernel change. SDPA chooses its
backend before the provider is asked: torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)
makes sure a call takes it. return_debug_mask (a testing aid of torch's) is refused by name.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .backend import triton_unavailable

NAME = "fastseq"
_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward")
# How many forward and backward calls the provider's kernels served (the GPU smoke reports it:
# proof that SDPA reached them).
CALLS = {"forward": 0, "backward": 0}


def _random_state(seed: Optional[Tensor], device) -> tuple[Tensor, Tensor]:
    """flash's (philox seed [2] uint64, offset [] uint64), as torch's meta function shapes them;
    fastseq's dropout seed rides in the first entry."""
    state = torch.zeros(2, dtype=torch.int64, device=device)
    if seed is not None:
        state[:1] = seed
    return state.view(torch.uint64), torch.zeros((), dtype=torch.int64, device=device).view(
        torch.uint64)


def flash_forward(query: Tensor, key: Tensor, value: Tensor, dropout_p: float = 0.0,
                  is_causal: bool = False, return_debug_mask: bool = False, *,
                  scale: Optional[float] = None):
    """aten::_scaled_dot_product_flash_attention on fastseq's kernels: q [B, H, L, E], k/v
    [B, Hk, S, E] -> (out, logsumexp fp32 [B, H, L], None, None, L, S, seed, offset, debug)."""
    if return_debug_mask:
        raise RuntimeError("fastseq's SDPA flash provider does not return flash's debug "
                           "attention mask (return_debug_mask=True): restore_sdpa() first")
    CALLS["forward"] += 1
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=query.device)
    out, lse = torch.ops.fastseq.attention_forward_triton(
        query, key, value, None, seed, None, None, None, None, None, None, float(dropout_p),
        False, -1, 0 if is_causal else -1, 0.0, 0, 0, scale)
    state, offset = _random_state(seed, query.device)
    debug = query.new_empty(0)
    return (_like(query, out), lse.float(), None, None, query.shape[2], key.shape[2], state,
            offset, debug)


def flash_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                   logsumexp: Tensor, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p: float,
                   is_causal: bool, philox_seed: Tensor, philox_offset: Tensor, *,
                   scale: Optional[float] = None):
    """aten::_scaled_dot_product_flash_attention_backward on fastseq's backward kernels."""
    CALLS["backward"] += 1
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    seed = philox_seed.view(torch.int64)[:1] if dropout_p > 0.0 else None
    delta = (grad_out.float() * out.float()).sum(-1)
    dq, dk, dv, _ = torch.ops.fastseq.attention_backward_triton(
        grad_out.contiguous(), query, key, value, logsumexp, delta, None, False, seed, None,
        None, None, None, None, float(dropout_p), False, -1, 0 if is_causal else -1, 0.0, 0, 0,
        scale)
    return _like(query, dq), _like(key, dk), _like(value, dv)


def _like(template: Tensor, result: Tensor) -> Tensor:
    """`result` in `template`'s strides, as torch's meta functions promise (empty_like of the
    inputs): the kernels write contiguous tensors, and a compiled graph reads the outputs with the
    meta strides (attention's inputs are often transposed views of [B, L, H, E])."""
    if result.stride() == template.stride():
        return result
    return torch.empty_like(template).copy_(result)


class _Handle:
    """What activation registered; remove() drops the overrides (torch's restore calls it)."""

    def __init__(self, library: torch.library.Library) -> None:
        self.library: Optional[torch.library.Library] = library

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _register() -> _Handle:
    reason = triton_unavailable(torch.device("cuda"))
    if reason is not None:
        raise RuntimeError(f"fastseq's SDPA flash provider runs fastseq's Triton kernels on "
                           f"CUDA, which cannot run here: {reason}")
    library = torch.library.Library("aten", "IMPL", "CUDA")
    library.impl(_OPS[0], flash_forward, "CUDA")
    library.impl(_OPS[1], flash_backward, "CUDA")
    return _Handle(library)


def _registry():
    try:
        from torch.nn.attention import _registry
    except ImportError:  # a torch without the provider registry
        return None
    return _registry


def activate_sdpa() -> None:
    """Make F.scaled_dot_product_attention's flash backend run fastseq's kernels (module
    docstring: what that covers). Undo with restore_sdpa()."""
    registry = _registry()
    if registry is None:
        raise RuntimeError(f"this torch ({torch.__version__}) has no flash-attention provider "
                           f"registry (torch.nn.attention.activate_flash_attention_impl)")
    registry.activate_flash_attention_impl(NAME)


def restore_sdpa() -> None:
    """torch's own flash kernel again (if fastseq's, or another provider's, was active)."""
    registry = _registry()
    if registry is not None:
        registry.restore_flash_attention_impl(_raise_warn=False)


def sdpa_active() -> bool:
    registry = _registry()
    return registry is not None and registry.current_flash_attention_impl() == NAME


def register_provider() -> None:
    """List fastseq in torch's registry (on import; activation stays the user's call)."""
    registry = _registry()
    if registry is not None:
        registry.register_flash_attention_impl(NAME, register_fn=_register)


register_provider()

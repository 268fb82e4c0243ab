"""What every op family does to register its implementations: Triton launchers as custom ops
on their tensors' device, fakes for the forward and backward op, autograd on the forward op
through the backward op, and contiguous inputs."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor


def on_tensor_device(launcher: Callable) -> Callable:
    """`launcher` run with its first tensor argument's CUDA device current: Triton launches on
    the current device and that device's current stream, so a tensor on cuda:1 while cuda:0 is
    current would be handed to a kernel on the wrong GPU (torch's own ops guard the device the
    same way; the stream stays the caller's current one on that device)."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, Tensor)), None)
        if device is None or device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)
    return guarded


def triton_custom_op(name: str, mutates_args: tuple[str, ...] = ()
                     ) -> Callable[[Callable], Callable]:
    """torch.library.custom_op(name) around a Triton launcher, on its tensors' device (the
    schema comes from the launcher's own signature through functools.wraps); mutates_args names
    the tensors it writes in place."""
    def register(launcher: Callable) -> Callable:
        return torch.library.custom_op(name, mutates_args=mutates_args)(
            on_tensor_device(launcher))
    return register


def contiguous_or_none(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    return [t.contiguous() if t is not None else None for t in tensors]


class DoubleBackwardError(RuntimeError):
    """A gradient of a gradient was asked of a fused backward op that has no formula for it."""


def _refuse_double_backward(backward_name: str) -> Callable:
    """The autograd formula of a fused backward op: a clear error. Without one, a C++ op's
    gradients were silently zero (torch only warned that no autograd kernel was registered),
    and a gradient penalty or a Hessian-vector product came out wrong. First-order gradients
    with create_graph=True still work; only differentiating them again raises."""
    def backward(ctx, *grads):
        raise DoubleBackwardError(
            f"fastseq: double backward (differentiating a gradient again, e.g. a gradient "
            f"penalty or a Hessian-vector product) is not supported through the fused kernel "
            f"{backward_name}; run this computation with backend='reference' (or 'torch', "
            f"where it serves the call), whose gradients are plain PyTorch")
    return backward


def vmap_by_slices(op_name: str) -> Callable:
    """A batching rule for torch.func.vmap (and torch.autograd.functional's vectorized jacobians):
    the op once per slice of the vmapped dims, outputs stacked on dim 0. Correct for every
    fastseq op whatever is batched (inputs, states, weights, masks); it costs one launch per
    slice, as the unvectorized jacobian would. (Folding the vmapped dim into an op's own batch
    dim would be one launch, but only when the weights are not batched.)"""
    op = getattr(torch.ops.fastseq, op_name.split("::")[1])

    def rule(info, in_dims, *args):
        results = [op(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)])
                   for i in range(info.batch_size)]
        if isinstance(results[0], (tuple, list)):
            stacked = tuple(torch.stack([r[j] for r in results]) for j in range(len(results[0])))
            return stacked, (0,) * len(stacked)
        return torch.stack(results), 0
    return rule


def _op(name: str):
    return getattr(torch.ops.fastseq, name.split("::")[1])


def _function_class(class_name: str, op: Callable, setup_context: Callable,
                    backward: Callable) -> type:
    """A torch.autograd.Function (the form torch.func accepts: forward without ctx, a
    setup_context, a vmap rule) running `op`. generate_vmap_rule vmaps forward and backward
    through the ops' own batching rules. A class statement, not type(): Dynamo reads the
    methods' source to trace them."""
    class FusedFunction(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return op(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            return setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    FusedFunction.__name__ = FusedFunction.__qualname__ = class_name
    return FusedFunction


# forward op name -> the autograd.Function the public ops call it through.
_FUNCTIONS: dict[str, type] = {}


def fused(forward_name: str) -> Callable:
    """The registered forward op `forward_name` as the public ops call it: through an
    autograd.Function of fastseq's own. torch's custom-op autograd (register_autograd below,
    which serves direct torch.ops.fastseq calls and opcheck) is an old-style Function that
    torch.func refuses ("must override the setup_context staticmethod"), so grad, vjp, jacrev
    and functional_call through a fused op need this one. Same formulas, same saved tensors.
    Under torch.compile the op itself is called: Dynamo traces custom ops with their registered
    autograd, while tracing this Function failed inside Dynamo (torch 2.14: "'AutogradFunction
    ContextVariable' object has no attribute 'proxy'" on the attention op with dropout)."""
    if torch.compiler.is_compiling():
        return _op(forward_name)
    return _FUNCTIONS[forward_name].apply


# backward op name -> how a forward's formula calls it outside torch.compile (through an
# autograd.Function refusing double backward); each backward op is registered once, also
# where several forward ops share it (the native recurrence's persistent kernel and loop).
_BACKWARD_CALLS: dict[str, Callable] = {}


def _register_backward(backward_name: str, backward_fake: Callable) -> None:
    if backward_name in _BACKWARD_CALLS:
        return
    torch.library.register_fake(backward_name)(backward_fake)
    backward_op = _op(backward_name)
    refuse = _refuse_double_backward(backward_name)
    torch.library.register_autograd(backward_name, refuse, setup_context=_no_context)
    torch.library.register_vmap(backward_name, vmap_by_slices(backward_name))
    backward_function = _function_class(f"{backward_name.split('::')[1]}_function", backward_op,
                                        _no_context, refuse)

    def call_backward(*args):
        # Compiled autograd (which traces backwards with Dynamo) cannot trace one Function's
        # apply inside another's backward: the op itself, whose registered autograd refuses a
        # second derivative alike.
        if torch.compiler.is_compiling():
            return backward_op(*args)
        return backward_function.apply(*args)
    _BACKWARD_CALLS[backward_name] = call_backward


def _no_context(ctx, inputs, output) -> None:
    return None


def register_fakes_and_autograd(forward_name: str, backward_name: str | tuple[str, ...], *,
                                forward_fake: Callable, backward_fake: Callable,
                                setup_context: Callable,
                                make_backward: Callable[[Callable], Callable],
                                pick_backward: Optional[Callable[..., str]] = None) -> None:
    """Register both ops' fakes, and autograd on `forward_name` whose backward calls the op
    `backward_name` (make_backward(backward_op) builds the autograd formula); the backward op's
    own autograd refuses double backward by name; both ops get a vmap batching rule. The same
    formulas also make the autograd.Function that fused(forward_name) returns.

    Where a forward's gradient has several implementations reading the same saved tensors (the
    native recurrence: its persistent kernel and its loop), backward_name is the tuple of their
    ops and pick_backward(*backward_args) names the one each backward runs."""
    names = (backward_name,) if isinstance(backward_name, str) else tuple(backward_name)
    if len(names) > 1 and pick_backward is None:
        raise ValueError(f"{forward_name}: several backward ops {names} need a pick_backward")
    pick = pick_backward if pick_backward is not None else (lambda *args: names[0])
    for name in names:
        _register_backward(name, backward_fake)
    torch.library.register_fake(forward_name)(forward_fake)
    torch.library.register_autograd(forward_name,
                                    make_backward(lambda *args: _op(pick(*args))(*args)),
                                    setup_context=setup_context)
    torch.library.register_vmap(forward_name, vmap_by_slices(forward_name))
    _FUNCTIONS[forward_name] = _function_class(
        f"{forward_name.split('::')[1]}_function", _op(forward_name), setup_context,
        make_backward(lambda *args: _BACKWARD_CALLS[pick(*args)](*args)))

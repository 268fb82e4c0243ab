"""DTensor inputs on fastseq's public ops: each op runs its kernel on every rank's local shard,
with no communication, when its inputs are split along an axis the math keeps apart (the batch,
the heads); any other placement is refused by name.

Each public op carries a rule (`@shards(rule)`): given the call's arguments (DTensors show their
global shapes), the rule says at which dim of each tensor argument each axis sits ({"batch": 0,
"heads": 1} for attention's query) and where the axes sit in each tensor the op returns. Per
mesh dim, the inputs must agree: every DTensor sharded there is sharded along one axis, every
tensor that has that axis is sharded along it, and every tensor without it (weights, biases,
position tables) is replicated. Then:
- DTensors become their local shards (`to_local`); a replicated input that requires grad gets
  its gradient back as Partial on the mesh dims that split the work: each rank's local gradient
  is a part of the sum, as DDP's are;
- plain tensors and int lists along a split axis (lengths, a padding mask) are sliced to the
  rank's part, as DTensor cuts a Shard (torch.chunk's pieces); size-1 (broadcast) dims are kept;
  a plain tensor that requires grad is refused (its gradient would hold one rank's part: torch's
  DTensor ops refuse plain tensors beside DTensors altogether);
- the op runs on the local tensors, on any backend;
- its outputs become DTensors on the same mesh, sharded along the same axes, with the global
  shapes of the inputs' axes (uneven splits included).
Backward runs the same way through the op's own autograd: to_local and from_local carry the
gradients across, again with no communication. Dropout (attention's dropout_p) draws each rank's
mask for its own shard from that rank's generator: the same distribution as one process, not
the same draws.

Why not DTensor's op-strategy API or register_sharding on the registered ops
(torch.ops.fastseq.*)? A public op does work around its kernel (checks, backend choice, masks
built from lengths, the reference backend's plain PyTorch), and each of those would meet
DTensors and plain tensors side by side. One rule at the public entry covers every backend and
both passes; the registered ops themselves refuse DTensors by name (refuse_dtensors below).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable

import torch
from torch import Tensor

from ._checks import InputError

try:  # torch built without distributed support has no DTensor: then nothing here applies.
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - every torch this project supports has it
    DTensor = None

BATCH, HEADS = "batch", "heads"


@dataclasses.dataclass
class Axes:
    """Where one call's axes sit. inputs: {argument path: {axis: dim}} (paths: "query",
    "hx[0]", "attn_mask.key_end"; the op's main input first: the outputs' global sizes are
    read from the first DTensor listed with the axis); outputs: one {axis: dim} per tensor the
    op returns, in order (None outputs skipped); even: (axis, paths, why): the axis must split
    evenly over the mesh for these arguments (GQA's query and key heads); unsplittable:
    {axis: why}: the call cannot run split along that axis."""
    inputs: dict
    outputs: list
    even: tuple = ()
    unsplittable: dict = dataclasses.field(default_factory=dict)


def shards(rule: Callable[[dict], Axes]):
    """Decorate a public op with its sharding rule (module docstring). Outermost decorator: the
    op's own wrappers (autocast) then see local tensors."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # DTensors need an initialised process group: one cheap check keeps every other call
            # from walking its arguments.
            if DTensor is None or not torch.distributed.is_initialized() \
                    or not _any_dtensor(args, kwargs.values()):
                return fn(*args, **kwargs)
            return _run_on_shards(fn, signature, rule, args, kwargs)
        wrapper.sharding_rule = rule
        return wrapper
    return decorate


def refuse(op: str, message: str):
    """Raise the InputError a rule or the mechanism gives for a call it cannot shard."""
    raise InputError(f"fastseq.ops.{op} with DTensor inputs: {message}")


def right_aligned(axes: dict, ndim: int, value: Tensor) -> dict:
    """A broadcasting argument's axes (a mask): `axes` are dims of an ndim-D tensor; `value`
    may have fewer leading dims."""
    shift = ndim - value.dim()
    return {axis: dim - shift for axis, dim in axes.items() if dim - shift >= 0}


def _any_dtensor(*groups) -> bool:
    for group in groups:
        for value in group:
            if isinstance(value, DTensor):
                return True
            if isinstance(value, (tuple, list)) and any(isinstance(v, DTensor) for v in value):
                return True
            if _is_mask_description(value) and any(
                    isinstance(getattr(value, f), DTensor) for f in _MASK_TENSORS):
                return True
    return False


# The tensors an AttentionMask description may hold (fastseq.ops.attention_mask).
_MASK_TENSORS = ("key_start", "key_end", "cu_seqlens_q", "cu_seqlens_k")


def _is_mask_description(value) -> bool:
    return type(value).__name__ == "AttentionMask" and dataclasses.is_dataclass(value)


def _int_list(value) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _leaves(arguments: dict):
    """(path, value) of every tensor among the arguments, one level into tuples and lists and
    into an AttentionMask, and of every int list (lengths)."""
    for name, value in arguments.items():
        if isinstance(value, Tensor):
            yield name, value
        elif _int_list(value):
            yield name, list(value)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if isinstance(v, Tensor):
                    yield f"{name}[{i}]", v
        elif _is_mask_description(value):
            for field in _MASK_TENSORS:
                if isinstance(getattr(value, field), Tensor):
                    yield f"{name}.{field}", getattr(value, field)


def _replace(arguments: dict, path: str, new) -> None:
    if "." in path:
        name, field = path.split(".")
        arguments[name] = dataclasses.replace(arguments[name], **{field: new})
    elif path.endswith("]"):
        name, index = path[:-1].split("[")
        items = list(arguments[name])
        items[int(index)] = new
        arguments[name] = tuple(items) if isinstance(arguments[name], tuple) else items
    else:
        arguments[path] = new


def _axis_names(axes: dict) -> str:
    by_dim = sorted(axes.items(), key=lambda item: item[1])
    return " or ".join(f"the {axis} (dim {dim})" for axis, dim in by_dim) or "nothing"


def _size(value, dim: int) -> int:
    return len(value) if isinstance(value, list) else value.shape[dim]


def _split_axes(op: str, mesh, leaves: list, axes: Axes) -> list:
    """Per mesh dim: the axis the inputs are split along there, or None (all replicated)."""
    split = []
    for m in range(mesh.ndim):
        axis, first = None, None
        for path, value in leaves:
            if not isinstance(value, DTensor):
                continue
            placement = value.placements[m]
            if placement.is_partial():
                refuse(op, f"{path} is Partial on mesh dim {m}; reduce it first "
                           f"(.redistribute(placements=[Replicate()]) or .full_tensor())")
            if placement.is_replicate():
                continue
            if type(placement) is not Shard:
                refuse(op, f"{path} has placement {placement} on mesh dim {m}; fastseq takes "
                           f"Shard and Replicate placements")
            dim = placement.dim % value.dim()
            known = axes.inputs.get(path, {})
            found = [a for a, d in known.items() if d % value.dim() == dim]
            if not found:
                refuse(op, f"{path} {list(value.shape)} is sharded on dim {dim} (mesh dim {m});"
                           f" it can be sharded along {_axis_names(known)}")
            if axis is not None and found[0] != axis:
                refuse(op, f"mesh dim {m} splits {first} along the {axis} but {path} along "
                           f"the {found[0]}; shard every input along one axis per mesh dim")
            axis, first = found[0], path
        if axis is not None:
            if axis in axes.unsplittable:
                refuse(op, f"mesh dim {m} splits {first} along the {axis}, but "
                           f"{axes.unsplittable[axis]}")
            _check_consistent(op, m, axis, first, leaves, axes)
        split.append(axis)
    return split


def _check_consistent(op: str, m: int, axis: str, first: str, leaves: list, axes: Axes) -> None:
    for path, value in leaves:
        dim = axes.inputs.get(path, {}).get(axis)
        if isinstance(value, DTensor):
            placement = value.placements[m]
            if dim is None:
                if not placement.is_replicate():
                    refuse(op, f"{path} must be replicated on mesh dim {m}, which splits "
                               f"{first} along the {axis}; got {placement}")
            elif value.shape[dim] != 1 and not (
                    placement.is_shard() and placement.dim % value.dim() == dim % value.dim()):
                refuse(op, f"mesh dim {m} splits {first} along the {axis}, so {path} "
                           f"{list(value.shape)} must be sharded on dim {dim % value.dim()} "
                           f"too; got {placement}")
        elif isinstance(value, Tensor) and value.requires_grad:
            refuse(op, f"{path} is a plain tensor that requires grad beside DTensor inputs split"
                       f" along the {axis}: its gradient would hold only this rank's part. Make"
                       f" it a DTensor (distribute_tensor(t, mesh, [Replicate()]), or "
                       f"parallelize_module) so its gradient is reduced")
    for even_axis, paths, why in axes.even:
        if even_axis != axis:
            continue
        for path, value in leaves:
            if path in paths and isinstance(value, DTensor):
                size, parts = value.shape[axes.inputs[path][axis]], value.device_mesh.size(m)
                if size % parts:
                    refuse(op, f"{path}'s {axis} ({size}) do not split evenly over the {parts} "
                               f"ranks of mesh dim {m}: {why}")


def _chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """DTensor's Shard split (torch.chunk's): the [start, end) of piece `index`."""
    step = -(-size // parts) if size else 0
    start = min(size, index * step)
    return start, min(size, start + step)


def _local_slice(mesh, split: list, axis: str, size: int) -> tuple[int, int]:
    """This rank's [start, end) of an axis of `size` split over the mesh dims `split` names
    (in mesh-dim order, as DTensor nests Shards of one dim)."""
    start, end = 0, size
    for m, split_axis in enumerate(split):
        if split_axis == axis:
            lo, hi = _chunk(end - start, mesh.size(m), mesh.get_local_rank(m))
            start, end = start + lo, start + hi
    return start, end


def _localize(op: str, mesh, split: list, path: str, value, axes: Axes, extents: dict):
    if isinstance(value, DTensor):
        grad = [Partial() if (p.is_replicate() and split[m] is not None) else p
                for m, p in enumerate(value.placements)]
        return value.to_local(grad_placements=grad)
    local = value
    for axis, dim in axes.inputs.get(path, {}).items():
        if axis not in split or _size(value, dim) == 1:
            continue
        if _size(value, dim) != extents[axis]:
            kind = "list" if isinstance(value, list) else "tensor"
            refuse(op, f"{path} is a plain {kind} whose dim {dim} ({_size(value, dim)}) is "
                       f"neither the global {axis} ({extents[axis]}) nor 1; pass it whole or "
                       f"as a DTensor")
        start, end = _local_slice(mesh, split, axis, extents[axis])
        local = local[start:end] if isinstance(local, list) else local.narrow(dim, start,
                                                                               end - start)
    return local


def _global_stride(local: Tensor, shape: torch.Size) -> tuple:
    """Strides of `shape` laid out in the local tensor's memory order."""
    order = sorted(range(local.dim()), key=lambda d: (-local.stride(d), -d))
    stride, step = [0] * local.dim(), 1
    for d in reversed(order):
        stride[d] = step
        step *= max(shape[d], 1)
    return tuple(stride)


def _flatten(result):
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [leaf for item in result for leaf in _flatten(item)]
    return []


def _rebuild(result, wrapped: list):
    if isinstance(result, Tensor):
        return wrapped.pop(0)
    if isinstance(result, (tuple, list)):
        return type(result)(_rebuild(item, wrapped) for item in result)
    return result


def _extents(split: list, leaves: dict, axes: Axes) -> dict:
    """The global size of each split axis: from the first DTensor the rule lists with it."""
    extents = {}
    for path, path_axes in axes.inputs.items():
        value = leaves.get(path)
        if not isinstance(value, DTensor):
            continue
        for axis, dim in path_axes.items():
            if axis in split and value.shape[dim] != 1:
                extents.setdefault(axis, value.shape[dim])
    return extents


def _run_on_shards(fn, signature, rule, args, kwargs):
    op = fn.__name__
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    leaves = list(_leaves(arguments))
    dtensors = [(p, v) for p, v in leaves if isinstance(v, DTensor)]
    mesh = dtensors[0][1].device_mesh
    for path, value in dtensors:
        if value.device_mesh != mesh:
            refuse(op, f"{path} lives on another device mesh than {dtensors[0][0]}")
    axes = rule(arguments)
    split = _split_axes(op, mesh, leaves, axes)
    extents = _extents(split, dict(leaves), axes)
    for path, value in leaves:
        local = _localize(op, mesh, split, path, value, axes, extents)
        if local is not value:
            _replace(arguments, path, local)
    result = fn(**arguments)
    outputs = _flatten(result)
    if len(outputs) != len(axes.outputs):
        raise AssertionError(f"{op}'s sharding rule names {len(axes.outputs)} outputs, the op "
                             f"returned {len(outputs)}")
    wrapped = []
    for out, out_axes in zip(outputs, axes.outputs):
        placements, shape = [], list(out.shape)
        for m, axis in enumerate(split):
            if axis is None:
                placements.append(Replicate())
                continue
            if axis not in out_axes:
                raise AssertionError(f"{op}'s sharding rule gives an output without the {axis}")
            placements.append(Shard(out_axes[axis]))
            shape[out_axes[axis]] = extents[axis]
        shape = torch.Size(shape)
        wrapped.append(DTensor.from_local(out, mesh, placements, run_check=False, shape=shape,
                                          stride=_global_stride(out, shape)))
    return _rebuild(result, wrapped)


def refuse_dtensors(op_overloads) -> None:
    """The registered ops (torch.ops.fastseq.*) take local tensors: a DTensor reaching one is
    refused by name, pointing at the public op that runs on shards."""
    if DTensor is None:
        return
    from torch.distributed.tensor.experimental import register_sharding
    for overload in op_overloads:
        name = overload.name()

        def refusal(*args, _name=name, **kwargs):
            raise InputError(f"{_name} takes local tensors, not DTensors: call its public op "
                             f"(fastseq.ops.*), which runs it on each rank's shard")
        register_sharding(overload)(refusal)

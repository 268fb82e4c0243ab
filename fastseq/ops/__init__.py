"""fastseq's functional API: each function validates its input, picks a backend (its
declaration, chosen through fastseq.backend) and calls a registered op (torch.ops.fastseq.*)
with fake and autograd. PUBLIC_OPS (registry.py) lists them for the derived checks.

Each family's ops are defined in fastseq/ops/<family>.py and exported here as
fastseq/families.py declares them (`Family.ops`), so a new family edits nothing in this file:
fastseq.ops.lstm_cell is fastseq.ops.rnn_cell.lstm_cell, fastseq.ops.attention is
fastseq.ops.attention.attention, and so on.
"""
import importlib as _importlib

from ..families import FAMILIES as _FAMILIES

for _family in _FAMILIES.values():
    _module = _importlib.import_module(f"{__name__}.{_family.name}")
    globals().update({_op: getattr(_module, _op) for _op in _family.ops})

from .attention_mask import AttentionMask  # noqa: E402 (attn_mask as a description)
from .registry import PUBLIC_OPS  # noqa: E402 (it reads the functions exported above)

__all__ = [op for family in _FAMILIES.values() for op in family.ops] + ["AttentionMask",
                                                                         "PUBLIC_OPS"]


def _refuse_dtensors_in_registered_ops() -> None:
    """torch.ops.fastseq.* take local tensors; a DTensor reaching one directly is refused by
    name (fastseq/ops/_sharding.py), the public ops above run on shards."""
    import torch

    from ._sharding import refuse_dtensors
    namespace = torch.ops.fastseq
    refuse_dtensors([getattr(getattr(namespace, name), overload)
                     for name in namespace for overload in getattr(namespace, name).overloads()])


_refuse_dtensors_in_registered_ops()

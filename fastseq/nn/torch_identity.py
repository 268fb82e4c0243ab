"""isinstance(fastseq.nn.GRU(...), torch.nn.GRU) holds, and torch.compile still traces the layer.

torch.compile refuses every instance of torch.nn.RNN, GRU and LSTM: dynamo's module builder tests
isinstance(module, (RNN, GRU, LSTM)) and stops ("Attempted to wrap RNN, GRU, or LSTM"; torch
2.11 and 2.14, only torch._dynamo.config.allow_rnn, a process-wide switch that would change how
every plain torch RNN compiles, lifts it). So fastseq's RNNs derive from torch.nn.RNNBase, not
from those classes, and answer isinstance through __class__: Python's isinstance falls back to
an object's __class__ attribute when its type is not a subclass, and here that attribute names
torch's class, except while torch.compile is tracing (a TracingContext is active), where it is
the true class and dynamo traces fastseq's forward.

Measured (tests/rnn/test_rnn_identity.py): isinstance and repr as torch's; type() is fastseq's;
torch.compile(fullgraph=True) of a model holding one compiles whole; pickling a whole module,
deepcopy and fastseq.patch/unpatch keep fastseq's class. One difference remains: code compiled
by torch.compile that itself asks isinstance(layer, torch.nn.GRU) gets False there (dynamo
answers from type()), where eager code gets True.
"""
from __future__ import annotations

import torch

_OBJECT_CLASS = object.__dict__["__class__"]  # the slot that reads and assigns an object's type


def _tracing() -> bool:
    return torch._guards.TracingContext.try_get() is not None


class PresentsAsTorchClass:
    """Mixin: instances answer isinstance(x, cls._torch_class) (module docstring)."""
    _torch_class: type

    @property
    def __class__(self):
        true_class = _OBJECT_CLASS.__get__(self)
        torch_class = getattr(true_class, "_torch_class", None)
        if torch_class is None or _tracing():
            return true_class
        return torch_class

    @__class__.setter
    def __class__(self, cls):  # fastseq.unpatch assigns torch's class back
        _OBJECT_CLASS.__set__(self, cls)

    def __reduce_ex__(self, protocol):
        # pickle's __newobj__ path checks the class it rebuilds against obj.__class__; rebuilding
        # through rebuild() of the true class keeps fastseq's class across a whole-module save
        # and load (rebuild is among fastseq.nn.safe_globals() for weights_only loads).
        return (rebuild, (type(self),), self.__getstate__())


def rebuild(cls: type):
    """An empty instance of `cls` for the unpickler to fill (its __setstate__ follows)."""
    if not (isinstance(cls, type) and issubclass(cls, PresentsAsTorchClass)):
        raise TypeError(f"fastseq: rebuild() makes fastseq's RNN layers only, not {cls!r}")
    return cls.__new__(cls)

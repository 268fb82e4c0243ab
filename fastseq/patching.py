"""fastseq.patch(model) and fastseq.unpatch(model): swap torch's recurrent, attention and
Transformer layers inside an existing model for fastseq's drop-ins, in place, and back.

    report = fastseq.patch(model)       # torch.nn.LSTM -> fastseq.nn.LSTM, ... in place
    print(report)                       # what was replaced, what was left and why
    fastseq.unpatch(model)              # and back to torch's classes

The swap changes each module's class and nothing else: every fastseq drop-in subclasses the
same torch base (torch.nn.RNNBase for the RNNs, torch's own class for the cells,
nn.MultiheadAttention and the Transformer layers) and only adds a forward and a few attributes,
so the parameters stay the very same tensors, on their device, in their dtype, under the same
state_dict keys, and optimizers holding them keep working.

Only modules of exactly torch's class are swapped. A user's subclass of torch.nn.LSTM (say) is
left alone and reported: its own methods may rely on torch's forward. Swapped RNNs stay
instances of torch.nn.LSTM/GRU/RNN for isinstance (fastseq/nn/torch_identity.py), so code that
tests isinstance(m, torch.nn.GRU), as OpenNMT-py's decoder does, takes the same branch. A
torch.nn.TransformerEncoder is told not to convert its input to nested tensors (its fast path
would skip the layers' forward); unpatch restores its setting.

The report is live for what only a call can tell: a swapped MultiheadAttention called with
torch's default need_weights=True computes the weights it returns in plain PyTorch, and the
report's `plain` lists it (with the reason) from its first such call on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import nn as fnn
from .integrations import seq2seq_attention
from .nn import plain_calls

# torch class -> fastseq drop-in, and the attributes each drop-in's __init__ adds (their
# defaults: what a swapped-in module gets).
SWAPS = {
    torch.nn.LSTM: fnn.LSTM, torch.nn.GRU: fnn.GRU, torch.nn.RNN: fnn.RNN,
    torch.nn.LSTMCell: fnn.LSTMCell, torch.nn.GRUCell: fnn.GRUCell, torch.nn.RNNCell: fnn.RNNCell,
    torch.nn.MultiheadAttention: fnn.MultiheadAttention,
    torch.nn.TransformerEncoderLayer: fnn.TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: fnn.TransformerDecoderLayer,
}
UNSWAPS = {fast: plain for plain, fast in SWAPS.items()}
_RNNS = (fnn.LSTM, fnn.GRU, fnn.RNN)
_CELLS = (fnn.LSTMCell, fnn.GRUCell, fnn.RNNCell)
_NESTED_FLAG = "_fastseq_saved_nested_tensor"


def _added_attributes(cls: type, backend: Optional[str]) -> dict:
    if cls in _RNNS:
        return {"backend": backend, "zoneout_h": 0.0, "zoneout_c": 0.0}
    if cls in _CELLS or cls.__module__ == seq2seq_attention.__name__:
        return {"backend": backend}
    return {}


@dataclass
class PatchReport:
    """replaced: (module name, old class, new class); left: (module name, class, reason);
    plain: module name -> why a replaced module ran plain PyTorch as it was called (filled in
    by the calls, module docstring)."""
    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)
    plain: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s)"]
        lines += [f"  {name or '<model>'}: {old} -> {new}" for name, old, new in self.replaced]
        if self.left:
            lines.append(f"left {len(self.left)} module(s)")
            lines += [f"  {name or '<model>'}: {cls}: {why}" for name, cls, why in self.left]
        if self.plain:
            lines.append(f"ran plain PyTorch as called: {len(self.plain)} module(s)")
            lines += [f"  {name or '<model>'}: {why}" for name, why in self.plain.items()]
        return "\n".join(lines)

    def _recorder(self, name: str):
        def record(why: str) -> None:
            self.plain.setdefault(name, why)
        return record


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def patch(model: torch.nn.Module, *, backend: Optional[str] = None) -> PatchReport:
    """Swap every torch.nn.LSTM, GRU, RNN, their cells, MultiheadAttention,
    TransformerEncoderLayer and TransformerDecoderLayer inside `model` (the model itself
    included) for fastseq's, in place; and OpenNMT-py's GlobalAttention and SpeechBrain's
    content, location-aware and key-value attention for subclasses on fastseq's fused global
    attention (fastseq/integrations/seq2seq_attention.py). backend: pinned on the swapped recurrent modules
    (None: fastseq's `auto`). Returns what was replaced and what was left, and why."""
    report = PatchReport()
    # OpenNMT-py's and SpeechBrain's attention modules, when those packages are imported.
    third_party = seq2seq_attention.swaps()
    swaps = {**SWAPS, **third_party}
    fast_classes = tuple(UNSWAPS) + tuple(third_party.values())
    for name, module in model.named_modules():
        cls = type(module)
        if cls in third_party and seq2seq_attention.refusal(module):
            report.left.append((name, _qualname(cls), seq2seq_attention.refusal(module)))
        elif cls in swaps:
            new = swaps[cls]
            module.__class__ = new
            for attribute, value in _added_attributes(new, backend).items():
                setattr(module, attribute, value)
            report.replaced.append((name, _qualname(cls), _qualname(new)))
            if new is fnn.MultiheadAttention:
                plain_calls.watch(module, report._recorder(name))
        elif isinstance(module, fast_classes):
            report.left.append((name, _qualname(cls), "already fastseq's"))
        elif isinstance(module, tuple(SWAPS)):
            report.left.append((name, _qualname(cls), "a subclass of a torch layer: its own "
                                "code may rely on torch's forward, so it is not swapped"))
        if isinstance(module, torch.nn.TransformerEncoder) and not hasattr(module, _NESTED_FLAG):
            setattr(module, _NESTED_FLAG, (module.enable_nested_tensor, module.use_nested_tensor))
            module.enable_nested_tensor = module.use_nested_tensor = False
    return report


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Swap fastseq's drop-ins inside `model` back to torch's classes (whether patch() put them
    there or they were built as fastseq's), in place. A recurrent module with zoneout is left:
    torch's has none."""
    report = PatchReport()
    unswaps = {**UNSWAPS, **{fast: plain for plain, fast in seq2seq_attention.swaps().items()}}
    for name, module in model.named_modules():
        cls = type(module)
        if cls in unswaps:
            if getattr(module, "zoneout_h", 0.0) or getattr(module, "zoneout_c", 0.0):
                report.left.append((name, _qualname(cls), "uses zoneout, which torch's "
                                    "module does not have"))
                continue
            for attribute in _added_attributes(cls, None):
                delattr(module, attribute)
            module.__class__ = unswaps[cls]
            plain_calls.unwatch(module)
            report.replaced.append((name, _qualname(cls), _qualname(unswaps[cls])))
        if isinstance(module, torch.nn.TransformerEncoder) and hasattr(module, _NESTED_FLAG):
            module.enable_nested_tensor, module.use_nested_tensor = getattr(module, _NESTED_FLAG)
            delattr(module, _NESTED_FLAG)
    return report

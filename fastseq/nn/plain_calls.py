"""Which patched layers ran plain PyTorch as they were called: fastseq.patch watches each layer it
swaps in whose forward has a plain-PyTorch path (MultiheadAttention called with torch's default
need_weights=True), and that path tells the patch report here, once per layer and reason.
Watching holds no reference to the layer (a weak dictionary) and costs nothing under
torch.compile, where it is skipped."""
from __future__ import annotations

import weakref
from typing import Callable

import torch

_WATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, Callable[[str], None]]" = \
    weakref.WeakKeyDictionary()


def watch(module: torch.nn.Module, record: Callable[[str], None]) -> None:
    _WATCHED[module] = record


def unwatch(module: torch.nn.Module) -> None:
    _WATCHED.pop(module, None)


def note(module: torch.nn.Module, why: str) -> None:
    """`module` is running plain PyTorch for this call, because `why`."""
    if torch.compiler.is_compiling():
        return
    record = _WATCHED.get(module)
    if record is not None:
        record(why)

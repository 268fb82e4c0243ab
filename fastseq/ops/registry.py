"""Every public op of fastseq.ops, derived from the family declarations (fastseq.families): its
function, its family (kernels/<family>/, bench/bench_<family>.py, tests/<family>/) and the
fastseq-bench suite that times it.

Derived checks read this list instead of keeping their own: tests/dispatch/test_registry.py
fails when a public op is missing here, and when a cross-cutting test file (tests/across_ops/)
neither covers an op nor names it as an exclusion with a reason.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from ..families import FAMILIES


@dataclasses.dataclass(frozen=True)
class PublicOp:
    name: str
    function: Callable
    family: str

    @property
    def suite(self) -> str:  # fastseq-bench's suite (bench/bench_<family>.py)
        return self.family


PUBLIC_OPS = {name: PublicOp(name, getattr(importlib.import_module(f"fastseq.ops.{family.name}"),
                                           name), family.name)
              for family in FAMILIES.values() for name in family.ops}

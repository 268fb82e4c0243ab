"""What every op family does to register its implementations: fakes for the forward and
backward op, autograd on the forward op through the backward op, and contiguous inputs."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def contiguous_or_none(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    return [t.contiguous() if t is not None else None for t in tensors]


def register_fakes_and_autograd(forward_name: str, backward_name: str, *,
                                forward_fake: Callable, backward_fake: Callable,
                                setup_context: Callable,
                                make_backward: Callable[[Callable], Callable]) -> None:
    """Register both ops' fakes, and autograd on `forward_name` whose backward calls the op
    `backward_name` (make_backward(backward_op) builds the autograd formula)."""
    torch.library.register_fake(forward_name)(forward_fake)
    torch.library.register_fake(backward_name)(backward_fake)
    backward_op = getattr(torch.ops.fastseq, backward_name.split("::")[1])
    torch.library.register_autograd(forward_name, make_backward(backward_op),
                                    setup_context=setup_context)

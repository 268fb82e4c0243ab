"""fastseq: fused Triton and CUDA kernels for sequence models, as PyTorch ops with autograd.

    import fastseq
    fastseq.backends()               # what runs here, and why not where it cannot
    fastseq.ops.lstm_cell(...)       # functional ops (torch.ops.fastseq.* underneath)
    fastseq.nn.LSTMCell(...)         # drop-in layers
    with fastseq.use_backend("triton"): ...
"""
import torch  # noqa: F401  (torch's libraries must be loaded before fastseq._C)

from . import _extension
from .backend import BackendError, backends, use_backend
from . import ops, nn, reference  # noqa: E402
from .ops._checks import InputError

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "BackendError", "InputError", "ops", "nn", "reference",
           "build_info"]
build_info = _extension.build_info

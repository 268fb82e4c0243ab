"""fastseq: fused Triton and CUDA kernels for sequence models, as PyTorch ops with autograd.

    import fastseq
    fastseq.backends()               # what runs here, and why not where it cannot
    fastseq.ops.lstm_cell(...)       # functional ops (torch.ops.fastseq.* underneath)
    fastseq.nn.LSTMCell(...)         # drop-in layers
    with fastseq.use_backend("triton"): ...
    fastseq.patch(model)             # swap torch's layers inside a model for fastseq's
"""
import importlib.util

import torch  # noqa: F401  (torch's libraries must be loaded before fastseq._C)

from ._versions import MIN_TORCH, dotted, version_tuple

# Checked before _C loads: an extension built against another torch fails with a symbol error.
if version_tuple(torch.__version__) < MIN_TORCH:
    raise ImportError(f"fastseq needs torch >= {dotted(MIN_TORCH)}, found {torch.__version__}: "
                      f"pip install 'torch>={dotted(MIN_TORCH)}'")

# kernels/ becomes fastseq.kernels only through an install (package_dir mapping); a bare source
# tree on sys.path lacks it, and _C.
if importlib.util.find_spec("fastseq.kernels") is None:
    raise ImportError(
        "fastseq is being imported from its source tree without being installed: run "
        "`pip install --no-build-isolation -e .` there (or `make test`), or import it from "
        "elsewhere")

from . import _extension
from .backend import BackendError, backends, explain, explain_on_gpu, use_backend
from .described_gpu import H200, GPUDescription
from . import ops, nn, reference  # noqa: E402
from .ops._checks import InputError
from .nn.scripting import TorchScriptError
from .ops._registration import DoubleBackwardError
from .patching import PatchReport, patch, unpatch
from .sdpa_provider import activate_sdpa, restore_sdpa

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "explain", "explain_on_gpu", "GPUDescription", "H200",
           "BackendError", "InputError",
           "DoubleBackwardError", "TorchScriptError", "ops", "nn", "reference", "build_info",
           "patch", "unpatch", "PatchReport", "activate_sdpa", "restore_sdpa"]
build_info = _extension.build_info

"""TorchScript: fastseq's layers refuse torch.jit.script by name.

Their forward chooses a backend in Python (fastseq.backend: devices, dtypes, what each backend
serves) and calls Triton and C++ kernels through torch.library ops whose autograd is Python;
TorchScript compiles none of that (it stopped at the first generator expression of the
recurrent layers' forward). torch.compile(fullgraph=True) and torch.export trace the same
layers whole (tests/torch_api/test_compile_models.py, tests/torch_api/test_export.py), so the refusal points there.
torch.jit.script calls __prepare_scriptable__ on a module and each of its submodules before
compiling anything, so a model holding a fastseq layer anywhere gets this error first.
"""
from __future__ import annotations


class TorchScriptError(RuntimeError):
    """torch.jit.script was asked to compile a fastseq layer."""


class RefusesTorchScript:
    """Mixed into every fastseq layer whose forward runs fastseq's ops."""

    def __prepare_scriptable__(self):
        name = type(self).__qualname__
        raise TorchScriptError(
            f"fastseq: {name} cannot be compiled by torch.jit.script: its forward picks a "
            f"backend in Python and runs Triton/C++ kernels through custom ops. Use "
            f"torch.compile(model, fullgraph=True) or torch.export.export(model, args) "
            f"instead, or fastseq.unpatch(model) first to script torch's own layers")

"""What `torch.load(..., weights_only=True)` (PyTorch's default since 2.6) must be allowed to
rebuild a whole fastseq layer saved with `torch.save(module)`.

torch allowlists none of its own nn.Module classes for that (a whole torch.nn.LSTM saved so
fails the same way), and neither does fastseq at import: allowing a class is the loader's
decision. State dicts need nothing (their keys are torch's). To load whole modules:

    with torch.serialization.safe_globals(fastseq.nn.safe_globals()):
        model = torch.load(path)                  # or add_safe_globals(...) once
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The torch modules and functions fastseq's layers hold (projections, MultiheadAttention's
# out_proj class, dropout, norms, embeddings, containers, the Transformer layers' activations,
# the location-aware attention's convolution).
_TORCH_PARTS = (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear,
                torch.nn.Dropout, torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.ModuleList,
                torch.nn.Sequential, torch.nn.ParameterList, torch.nn.ReLU, torch.nn.Conv1d,
                F.relu, F.gelu)


def safe_globals() -> list:
    """Every nn.Module class fastseq.nn defines (the public layers and the parts they hold, e.g.
    the Transformer-XL's positional embedding) and the torch parts they hold, for
    torch.serialization's safe_globals / add_safe_globals."""
    import inspect
    import sys

    ours = {cls for name, module in sys.modules.items() if name.startswith("fastseq.nn.")
            for cls in vars(module).values()
            if inspect.isclass(cls) and issubclass(cls, torch.nn.Module)
            and cls.__module__.startswith("fastseq.")}
    from .torch_identity import rebuild  # how fastseq's RNNs are unpickled (torch_identity.py)

    return sorted(ours, key=lambda cls: cls.__qualname__) + list(_TORCH_PARTS) + [rebuild]

"""What the ops, their fakes and the launchers share without importing Triton (fastseq imports
without Triton installed; only the triton backend needs it): accumulator dtypes and the head
dims the attention kernels take."""
import torch

# The attention kernels keep a BLOCK_M x head-dim accumulator in registers; relative attention
# also carries its band of pos rows, so it stops lower.
ATTENTION_MAX_HEAD_DIM = 256
REL_ATTENTION_MAX_HEAD_DIM = 128


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate and keep their state in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

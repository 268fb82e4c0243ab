"""What the ops, their fakes and the launchers share without importing Triton (fastseq imports
without Triton installed; only the triton backend needs it): accumulator dtypes and the head
dims the attention kernels take."""
import torch

# The attention kernels keep a BLOCK_M x head-dim accumulator in registers; relative attention
# also carries its band of pos rows, so it stops lower.
ATTENTION_MAX_HEAD_DIM = 256
REL_ATTENTION_MAX_HEAD_DIM = 128


# The split-KV decode kernels (attention's and relative attention's): query rows a step may have
# (relative attention's kernel holds them in one 16-row tile) and the fewest keys worth
# splitting (below 256 the fused forward's loop is at most 4 key blocks of 64).
DECODE_MAX_QUERY_ROWS = 16
DECODE_MIN_KEYS = 256


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate and keep their state in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

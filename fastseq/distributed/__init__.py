"""fastseq across processes, on torch.distributed.

- DTensor inputs on every fastseq op (tensor parallelism, FSDP2): handled by the ops
  themselves (fastseq/ops/_sharding.py), nothing to call here.
- Context parallelism: ring_attention, a sequence split across ranks (split_sequence,
  gather_sequence, the "contiguous" and "zigzag" layouts), and transformer_xl_segment /
  transformer_xl_lm_loss: a Transformer-XL segment split across ranks, each slice's memory
  relayed from its left neighbour.
fastseq.distributed is imported on its own (import fastseq.distributed): fastseq does not
need torch.distributed otherwise.
"""
from .ring import ring_attention
from .sequence import LAYOUTS, gather_sequence, piece_sizes, split_sequence
from .transformer_xl import transformer_xl_lm_loss, transformer_xl_segment

__all__ = ["ring_attention", "split_sequence", "gather_sequence", "piece_sizes", "LAYOUTS",
           "transformer_xl_segment", "transformer_xl_lm_loss"]

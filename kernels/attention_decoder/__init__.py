"""The RNN attention decoder's Triton kernels: global attention (dot and additive scores) of
each query over its encoder states, forward and backward (kernel.py), and their launcher
(launch.py)."""

"""Transformer-XL relative attention's Triton kernels (forward.py, backward.py: dK/dV, dQ and
d(pos)) and their launcher with its configurations and launch specs (launch.py)."""

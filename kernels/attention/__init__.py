"""Scaled dot-product attention's Triton kernels (kernel.py: forward, dK/dV and dQ, and the
tile helpers relative attention reuses) and their launcher with its configurations and launch
specs (launch.py)."""

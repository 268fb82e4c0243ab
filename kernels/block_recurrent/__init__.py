"""The Block-Recurrent Transformer's Triton kernels: two attentions per launch (kernel.py) and
their launcher with its tiles and launch specs (launch.py)."""

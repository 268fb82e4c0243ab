"""The layer_norm_rnn family's Triton kernels: the layer-normalized LSTM/GRU recurrence with its
layer norms fused, forward and backward, and their launchers with launch_specs() (launch.py)."""

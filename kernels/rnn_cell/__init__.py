"""The rnn_cell family's Triton kernels: one LSTM, GRU or tanh/relu RNN step, forward and backward,
and their launchers with launch_specs() (launch.py)."""

"""Layout of the cell-step ops' tensors (no Triton import: the fake implementations use it too).

Gate-major columns: column g*H + j of a gate tensor is gate g of hidden unit j.
"""
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# Columns per hidden unit of the forward's workspace: LSTM i, f, g, o; GRU r, z, n, W_hn h + b_hn.
# Plain RNNs need none (the derivative is read off h').
WORKSPACE = {"lstm": 4, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}
MODES = tuple(GATES)

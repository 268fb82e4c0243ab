"""Layout of the recurrent ops' tensors, cell steps and sequences (no Triton import: the fake
implementations use it too).

Gate-major columns: column g*H + j of a gate tensor is gate g of hidden unit j.
"""
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# Columns per hidden unit of the forward's workspace: LSTM i, f, g, o; GRU r, z, n, W_hn h + b_hn.
# Plain RNNs need none (the derivative is read off h').
WORKSPACE = {"lstm": 4, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}
MODES = tuple(GATES)
# Columns per unit and step of a sequence's workspace: the cell step's, plus c_t for the LSTM
# (its backward needs c_{t-1} and c_t).
LAYER_WORKSPACE = {"lstm": 5, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}
# The kernels' MODE constexpr (0 LSTM, 1 GRU, 2 RNN-tanh, 3 RNN-relu).
MODE_IDS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
# Layer-normalized LSTM/GRU sequences (kernels/layer_norm_rnn/launch.py): the plain layer's
# workspace columns, the LSTM's normalized cell state, then the normalized recurrent projection
# (one column per gate, from LN_PROJECTION_COLUMN); the statistics per step and row: 1/std of
# the recurrent projection, then the LSTM's 1/std of its cell state.
LN_PROJECTION_COLUMN = {"lstm": LAYER_WORKSPACE["lstm"] + 1, "gru": LAYER_WORKSPACE["gru"]}
LN_WORKSPACE = {mode: LN_PROJECTION_COLUMN[mode] + GATES[mode] for mode in ("lstm", "gru")}
LN_STATS = {"lstm": 2, "gru": 1}

"""Drop-in nn.Module layers built on fastseq's ops."""
from .rnn_cell import GRUCell, LSTMCell, RNNCell

__all__ = ["LSTMCell", "GRUCell", "RNNCell"]

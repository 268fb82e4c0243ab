"""The recurrent families' Triton kernels: the cell step (cell.py), the whole-sequence layer
in one or both directions (layer.py), the layer-normalized layer (layer_norm_layer.py), the
gate math they share (cell_math.py) and the tensor layouts the ops and fakes use too
(layout.py, no Triton import). Each kernel module holds its kernels, their launcher and the
launch specs the launcher can produce (launch_specs())."""

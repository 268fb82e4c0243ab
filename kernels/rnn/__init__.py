"""The rnn family's Triton kernels: one recurrent layer over a whole sequence, in one direction or
both, forward and backward, and their launchers with launch_specs() (launch.py)."""

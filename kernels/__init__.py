"""fastseq's Triton kernels (installed as fastseq.kernels): @triton.jit functions and their
launch helpers, nothing else. Op registration, autograd and backend choice live in fastseq.ops.

One folder per family (fastseq/families.py), each with its launchers and launch_specs() in
launch.py; the building blocks several families share beside them: common.py (@triton.jit
helpers, launch_spec), cell_math.py (the recurrent cells' gate math), recurrent_layout.py and
limits.py (no Triton import: the ops and fakes read them too).

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter, which
must be switched on (TRITON_INTERPRET=1) before this package is imported.
"""

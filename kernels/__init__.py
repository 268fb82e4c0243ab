"""fastseq's Triton kernels (installed as fastseq.kernels): @triton.jit functions and their
launch helpers, nothing else. Op registration, autograd and backend choice live in fastseq.ops.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter, which
must be switched on (TRITON_INTERPRET=1) before this package is imported.
"""

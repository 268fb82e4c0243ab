"""The kv_cache family's Triton kernels: split-KV decoding against a preallocated cache, the
combine of the partial softmaxes and the cache append (kernel.py), and their launchers with
launch_specs() (launch.py)."""

"""fastseq inside other libraries: each module here joins one library's extension point and is
imported only by a user of that library (fastseq itself never imports them).

    import fastseq.integrations.transformers   # attn_implementation="fastseq" in transformers
"""

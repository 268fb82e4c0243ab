"""fastseq's kernel families, declared once. A family is one name used by every piece of it
(PIECES below: its ops, registration, kernels, reference, layers, benchmark suite and tests).

Nothing here imports the pieces (this module is read by fastseq.ops.registry, the docs build,
the Makefile and bench/gpu_run.sh): tests/dispatch/test_families.py checks that every piece
exists and holds what it says, and fails naming the missing one. docs/adding-a-family.md is
the checklist in prose.
"""
from __future__ import annotations

import dataclasses


# The files a family adds, by its name: what each holds. A Triton-only family adds these 8.
PIECES = {
    "fastseq/ops/{name}.py": "the public ops: argument checks, the backend declaration "
                             "(OpBackends) and the functions",
    "fastseq/ops/{name}_registration.py": "the torch.library ops with their fakes, autograd "
                                          "and batching rules",
    "kernels/{name}/__init__.py": "the kernel package (installed as fastseq.kernels.{name})",
    "kernels/{name}/launch.py": "the Triton kernels' launchers and launch_specs() (compiled "
                                "ahead of time for sm_90 by the tests)",
    "fastseq/reference/{name}.py": "the plain-PyTorch definition, the tests' float64 truth",
    "fastseq/nn/{name}.py": "the layers",
    "bench/bench_{name}.py": "the fastseq-bench suite, and gpu_smoke(out): its correctness case "
                             "on CUDA for the GPU run's stage 1 (bench/gpu_smoke.py)",
    "tests/{name}/test_{name}.py": "the tests (more files in tests/{name}/ as it grows)",
}
# The shared files a family edits, and the test that fails until it does.
SHARED_EDITS = {
    "fastseq/families.py": "its declaration (tests/dispatch/test_families.py); fastseq.ops and "
                           "fastseq.nn export its ops and layers from it",
    "README.md": "its row in the families table (tests/project/test_readme.py)",
}
# Not a shared edit: the checks run over every op (tests/across_ops) take a family's share from
# its own tests/<name>/test_<name>.py (ACROSS_OPS: check -> {op: its tests there, or why not}),
# or from the across_ops files' COVERS (tests/dispatch/test_registry.py reads both).


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    kind: str                 # "recurrent" or "attention": the GPU run's test chunks, the docs
    what: str                 # one line: what the family computes
    ops: tuple[str, ...]      # public functions of fastseq.ops.<name>
    layers: tuple[str, ...]   # classes of fastseq.nn.<name>
    # fastseq.nn classes built on the family that live in modules of their own (models), and
    # fastseq-bench suites that time them rather than one op.
    models: tuple[str, ...] = ()
    model_suites: tuple[str, ...] = ()
    # What `auto` runs on a CPU and on CUDA, for the docs' table: the first backend named is
    # the op declaration's first preference (tests/dispatch/test_families.py checks it).
    auto_cpu: str = ""
    auto_cuda: str = ""


FAMILIES = {f.name: f for f in (
    Family("rnn_cell", "recurrent", "one LSTM, GRU or tanh/relu RNN step",
           ops=("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"),
           layers=("LSTMCell", "GRUCell", "RNNCell"),
           auto_cpu="torch (its own cell)", auto_cuda="native (fp32, fp64), triton (fp16, bf16)"),
    Family("rnn", "recurrent",
           "whole LSTM/GRU/RNN sequences: layers, directions, lengths, projection",
           ops=("rnn_stack", "rnn_layer", "rnn_bidirectional_layer"),
           layers=("LSTM", "GRU", "RNN"),
           auto_cpu="torch, else native (zoneout, empty lengths, compiled)",
           auto_cuda="torch (cuDNN), else triton (zoneout, empty lengths, compiled)"),
    Family("layer_norm_rnn", "recurrent", "layer-normalized LSTM/GRU sequences (Ba et al. 2016)",
           ops=("layer_norm_rnn_layer",),
           layers=("LayerNormLSTM", "LayerNormGRU"),
           auto_cpu="reference (a loop over steps)", auto_cuda="triton"),
    Family("attention", "attention",
           "scaled dot-product attention: masks, causal, windows, soft-capping, ALiBi, sinks, "
           "dropout, GQA, packed sequences",
           ops=("attention", "attention_varlen"),
           layers=("MultiheadAttention",),
           models=("TransformerEncoderLayer", "TransformerDecoderLayer"),
           model_suites=("hf_transformers", "context_parallel"),
           auto_cpu="torch (SDPA)", auto_cuda="triton"),
    Family("kv_cache", "attention", "decoding against a key/value cache (split-KV for long caches)",
           ops=("attention_with_kv_cache",),
           layers=("KVCache",),
           auto_cpu="torch (SDPA over the cache)", auto_cuda="triton"),
    Family("rel_attention", "attention", "Transformer-XL relative-position attention with memory",
           ops=("rel_attention",),
           layers=("RelPartialLearnableMultiHeadAttn",),
           models=("PositionwiseFF", "TransformerXLLayer", "TransformerXL",
                   "TransformerXLDecodingState", "TransformerXLLM", "AdaptiveEmbedding",
                   "ProjectedAdaptiveLogSoftmax"),
           model_suites=("txl_generation", "adaptive_softmax"),
           auto_cpu="torch (the original's formulation)", auto_cuda="triton"),
    Family("block_recurrent", "attention",
           "the Block-Recurrent Transformer (Hutchins et al. 2022): sliding-window attention "
           "with gated recurrent state vectors",
           ops=("block_recurrent_attention", "block_recurrent_gate"),
           layers=("BlockRecurrentTransformerLayer",),
           models=("BlockRecurrentTransformerLM", "BlockRecurrentMemory"),
           auto_cpu="torch (SDPA per part)", auto_cuda="triton"),
    Family("attention_decoder", "attention",
           "RNN encoder-decoders' global attention (Luong, Bahdanau, location-aware): "
           "OpenNMT-py's and SpeechBrain's decoders and beam search",
           ops=("global_attention",),
           layers=("GlobalAttention", "AttentionDecoder"),
           models=("AttentionDecoderState", "Hypothesis", "AttentionalRNNDecoder"),
           auto_cpu="torch (the original code's ops)", auto_cuda="triton"),
)}

# Tests that are about no one family: each folder of tests/ that is not a family's, and why.
CROSS_CUTTING_TESTS = {
    "dispatch": "backends, explain, the declarations and the step protocol",
    "torch_api": "what PyTorch users do with any op: compile, export, double backward, "
                 "torch.func, TorchScript, saving, patching, PyTorch's own test cases",
    "across_ops": "checks run over every public op (autocast, numerics, strided inputs, "
                  "properties, the CUDA runtime), each naming the ops it covers or leaves out",
    "gpu": "the sm_90 ahead-of-time compile and the staged GPU script's dry run",
    "project": "packaging, the README, the benchmark command and the examples",
    "integrations": "fastseq inside other libraries' models: transformers' attention interface, "
                    "fastseq.patch on torchvision, torchaudio, SpeechBrain and OpenNMT-py models",
}
# Test folders the oldest supported stack (CI's second leg, the GPU machine's torch 2.11 /
# triton 3.6) leaves to the newest: the checks run over every op (across_ops) repeat the
# families' own tests under other inputs, project checks this checkout, not the stack, and the
# third-party packages integrations tests against are installed in the newest stack's venv only.
NEWEST_STACK_ONLY = ("across_ops", "project", "integrations")


def folders_of_tests() -> list[str]:
    """Every folder of tests/: the families' and the cross-cutting ones."""
    return list(FAMILIES) + list(CROSS_CUTTING_TESTS)


def main(argv: list[str]) -> str:
    """The lists the Makefile and bench/gpu_run.sh take from here (run as a script: nothing is
    imported, so it works before fastseq is installed):
      --min-stack-tests    the test folders CI's second leg runs
      --test-folders KIND  the test folders of the families of one kind
    """
    if argv == ["--min-stack-tests"]:
        return " ".join(f"tests/{name}" for name in folders_of_tests()
                        if name not in NEWEST_STACK_ONLY)
    if len(argv) == 2 and argv[0] == "--test-folders" and argv[1] in {"recurrent", "attention"}:
        return " ".join(f"tests/{f.name}" for f in FAMILIES.values() if f.kind == argv[1])
    raise SystemExit(main.__doc__)


if __name__ == "__main__":
    import sys

    print(main(sys.argv[1:]))

"""RNN attention decoders: fastseq's (fastseq.nn.AttentionDecoder: fused cells, fused global
attention) against the same decoder on plain PyTorch (the torch backend: torch's cells and
OpenNMT-py's attention ops, the code users run) and the reference backend; teacher-forced fwd
and fwd+bwd of OpenNMT-py's input-feeding decoder (a step loop) and of its standard decoder (on
the torch backend: cuDNN's LSTM over the targets, then one batched attention), beam-5 decoding
in tokens/s, and SpeechBrain's AttentionalRNNDecoder (location-aware) against SpeechBrain's own
code when it is installed.

GPU: OpenNMT-py's default size (B = 64, S = 50, T = 50, H = 1024, 2 LSTM layers, "general"
attention), bf16. CPU: a small case in float32. FLOPs (2 per multiply-add): per step and row,
the cells 2 x 4 H (E + H + H) + (layers - 1) 2 x 4 H (2 H), the attention's W_a h (2 H^2), its
scores and context (4 S H) and linear_out (4 H^2); backward 2x the forward.
"""
import pytest
import torch

from fastseq.nn import AttentionDecoder, beam_search

from .conftest import DEVICE, GPU_CASES, pass_step, record_error, run_timed

if GPU_CASES:
    BATCH, SOURCE, TARGET, HIDDEN, LAYERS, DTYPE = 64, 50, 50, 1024, 2, torch.bfloat16
    BEAM_BATCH, BEAM_STEPS = 64, 50
else:  # a 2-core CPU
    BATCH, SOURCE, TARGET, HIDDEN, LAYERS, DTYPE = 8, 20, 12, 64, 2, torch.float32
    BEAM_BATCH, BEAM_STEPS = 4, 10
EMBED, VOCAB, BEAM = HIDDEN, 1000, 5
PROVIDERS = {"fastseq": None, "torch": "torch", "reference": "reference"}


def step_flops(rows: int) -> float:
    cells = 2 * 4 * HIDDEN * (EMBED + 2 * HIDDEN) + (LAYERS - 1) * 2 * 4 * HIDDEN * 2 * HIDDEN
    attention = 2 * HIDDEN * HIDDEN + 4 * SOURCE * HIDDEN + 4 * HIDDEN * HIDDEN
    return rows * (cells + attention)


def make(provider, input_feed=True):
    torch.manual_seed(0)
    decoder = AttentionDecoder("LSTM", EMBED, HIDDEN, LAYERS, attn_type="general",
                               input_feed=input_feed, backend=PROVIDERS[provider],
                               device=DEVICE, dtype=DTYPE).eval()
    enc = torch.randn(BATCH, SOURCE, HIDDEN, device=DEVICE, dtype=DTYPE)
    lengths = torch.randint(SOURCE // 2, SOURCE + 1, (BATCH,), device=DEVICE)
    emb = torch.randn(BATCH, TARGET, EMBED, device=DEVICE, dtype=DTYPE)
    return decoder, enc, lengths, emb


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("decoder_kind", ["input_feed", "std"])
def bench_attention_decoder(benchmark, provider, passes, decoder_kind):
    input_feed = decoder_kind == "input_feed"
    decoder, enc, lengths, emb = make(provider, input_feed)
    if passes != "fwd":
        emb.requires_grad_()
    with torch.no_grad():  # the check: row 0 against the reference backend in float64
        twin = AttentionDecoder("LSTM", EMBED, HIDDEN, LAYERS, attn_type="general",
                                input_feed=input_feed, backend="reference", device=DEVICE,
                                dtype=torch.float64)
        twin.load_state_dict(decoder.state_dict())
        expected, _, _ = twin(emb[:1].double(), twin.init_state(enc[:1].double(), lengths[:1]))
        got, _, _ = decoder(emb[:1], decoder.init_state(enc[:1], lengths[:1]))
    record_error(benchmark, got, expected)
    step = pass_step(passes, lambda: decoder(emb, decoder.init_state(enc, lengths))[0])
    step()
    flop = step_flops(BATCH) * TARGET * (1 if passes == "fwd" else 3)
    run_timed(benchmark, step, calls_per_round=3,
              op="attention_decoder" if input_feed else "attention_decoder_std",
              provider=provider, passes=passes, gflop=flop / 1e9,
              shape=f"B={BATCH} S={SOURCE} T={TARGET} H={HIDDEN} L={LAYERS} LSTM general",
              dtype=str(DTYPE).split(".")[1], length=TARGET)


@pytest.mark.parametrize("provider", ["fastseq", "torch"])
def bench_beam_search(benchmark, provider):
    """Beam-5 decoding of BEAM_BATCH sentences for BEAM_STEPS steps (no early stop: eos is
    masked out), tokens/s = sentences x steps / time."""
    decoder, enc, lengths, _ = make(provider)
    embed = torch.nn.Embedding(VOCAB, EMBED, device=DEVICE, dtype=DTYPE)
    head = torch.nn.Linear(HIDDEN, VOCAB, device=DEVICE, dtype=DTYPE)

    def generator(h):
        scores = torch.log_softmax(head(h).float(), -1)
        scores[:, 1] = float("-inf")  # eos never wins: every sentence runs BEAM_STEPS steps
        return scores

    def run():
        return beam_search(decoder, decoder.init_state(enc[:BEAM_BATCH], lengths[:BEAM_BATCH]),
                           embed, generator, bos=0, eos=1, beam_size=BEAM,
                           max_length=BEAM_STEPS)
    with torch.no_grad():
        run()
        run_timed(benchmark, lambda: run(), calls_per_round=1, op="beam_search",
                  provider=provider, passes="fwd",
                  gflop=step_flops(BEAM_BATCH * BEAM) * BEAM_STEPS / 1e9,
                  shape=f"B={BEAM_BATCH} beam={BEAM} steps={BEAM_STEPS} H={HIDDEN} V={VOCAB}",
                  dtype=str(DTYPE).split(".")[1], length=BEAM_STEPS,
                  tokens=BEAM_BATCH * BEAM_STEPS)


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["fastseq", "speechbrain"])
def bench_speechbrain_decoder(benchmark, provider, passes):
    """SpeechBrain's AttentionalRNNDecoder (2 LSTM layers, location-aware attention, attn_dim
    HIDDEN, 10 channels, kernel 2 x 50 + 1 as its LAS recipes) teacher-forced: its own code
    against fastseq.nn.AttentionalRNNDecoder.from_speechbrain of the same weights. float32 (the
    original makes its first alignment in float32)."""
    sb_rnn = pytest.importorskip("speechbrain.nnet.RNN", reason="SpeechBrain is not installed")
    from fastseq.nn import AttentionalRNNDecoder
    torch.manual_seed(0)
    theirs = sb_rnn.AttentionalRNNDecoder(
        rnn_type="lstm", attn_type="location", hidden_size=HIDDEN, attn_dim=HIDDEN,
        num_layers=LAYERS, enc_dim=HIDDEN, input_size=EMBED, channels=10, kernel_size=50,
        re_init=False).to(DEVICE).eval()
    decoder = AttentionalRNNDecoder.from_speechbrain(theirs) if provider == "fastseq" else theirs
    enc = torch.randn(BATCH, SOURCE, HIDDEN, device=DEVICE)
    wav_len = torch.linspace(0.5, 1.0, BATCH, device=DEVICE)
    emb = torch.randn(BATCH, TARGET, EMBED, device=DEVICE, requires_grad=passes != "fwd")
    with torch.no_grad():
        expected = theirs(emb[:1].detach(), enc[:1], wav_len[:1])[0]
        record_error(benchmark, decoder(emb[:1].detach(), enc[:1], wav_len[:1])[0], expected)
    step = pass_step(passes, lambda: decoder(emb, enc, wav_len)[0])
    step()
    cells = 2 * 4 * HIDDEN * (EMBED + 2 * HIDDEN) + (LAYERS - 1) * 2 * 4 * HIDDEN * 2 * HIDDEN
    # mlp_dec, mlp_out and proj (8 H^2), the location convolution (101 taps x 10 channels) and
    # mlp_loc, the scores' v . tanh and the context (4 S H).
    attention = 8 * HIDDEN * HIDDEN + 2 * SOURCE * 101 * 10 + 2 * SOURCE * 10 * HIDDEN \
        + 4 * SOURCE * HIDDEN
    run_timed(benchmark, step, calls_per_round=3, op="speechbrain_decoder", provider=provider,
              passes=passes,
              gflop=BATCH * (cells + attention) * TARGET * (1 if passes == "fwd" else 3) / 1e9,
              shape=f"B={BATCH} S={SOURCE} T={TARGET} H={HIDDEN} L={LAYERS} LSTM location",
              dtype="float32", length=TARGET)


def gpu_smoke(out) -> bool:
    """This family's case in bench/gpu_smoke.py (the GPU run's stage 1): global attention with
    both scores against plain PyTorch and float64 truth under the tolerance rule; True when
    every quantity keeps it."""
    import fastseq
    from .smoke_checks import ATTENTION, DTYPES, check, rand
    B, H, L, M, D = ATTENTION
    S, A = L, max(D, 64)
    lengths = torch.arange(B, device=rand(1).device) * (S // max(B, 1)) + S // 2
    dot = [rand(B, 1, A), rand(B, S, A), rand(B, S, A)]
    additive = [rand(B, 1, A), rand(B, S, A), rand(B, S, A), rand(A)]

    def dot_call(backend, t):
        return list(fastseq.ops.global_attention(*t, lengths=lengths, backend=backend))

    def additive_call(backend, t):
        return list(fastseq.ops.global_attention(*t[:3], v=t[3], score="additive",
                                                 lengths=lengths, backend=backend))
    ok = True
    for dtype in DTYPES:
        ok &= check(out, "attention_decoder", f"dot B={B} S={S} A={A}", "triton", dtype,
                    dot_call, dot, ["context", "alignments", "dquery", "dkeys", "dvalues"], S)
        ok &= check(out, "attention_decoder", f"additive B={B} S={S} A={A}", "triton", dtype,
                    additive_call, additive,
                    ["context", "alignments", "dquery", "dkeys", "dvalues", "dv"], S)
    return ok

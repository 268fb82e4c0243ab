"""fastseq.patch on real models built from their own packages (random weights, no downloads):
torchvision's VisionTransformer, torchaudio's Conformer, DeepSpeech, WaveRNN and Tacotron2,
SpeechBrain's CRDNN, RNN wrappers and AttentionalRNNDecoder, OpenNMT-py's RNN encoder-decoders.

Each patched copy gives the unpatched model's outputs and gradients (inputs' and parameters')
in float64 with the recurrences on each fastseq backend (Triton through the interpreter here;
attention on the reference beside native, which has no attention kernel), and its report lists
what was replaced. A package that is absent skips its tests by name (CI installs them all:
Makefile, THIRD_PARTY).
"""
import copy

import pytest
import torch

import fastseq

RECURRENT_BACKENDS = ("triton", "native", "reference")
# float64: the patched and unpatched models differ only by summation order.
TIGHT = dict(rtol=1e-9, atol=1e-10)


def _package(name: str):
    return pytest.importorskip(name, reason=f"{name} is not installed (make test installs it)")


def _compare(model, inputs, expect_replaced, output=lambda out: out, dtype=torch.float64,
             tolerance=TIGHT):
    """Patch a copy of `model` and compare forward and backward with the original's."""
    model = model.to(dtype).eval()
    for name, param in model.named_parameters():  # an uninitialised table makes runs differ
        assert param.isfinite().all() and param.abs().max() < 1e3, f"{name} is not initialised"
    fast = copy.deepcopy(model)
    report = fastseq.patch(fast)
    replaced = sorted(new.rsplit(".", 1)[-1] for _, _, new in report.replaced)
    assert replaced == sorted(expect_replaced), str(report)
    assert not report.left, str(report)
    inputs = [x.to(dtype).requires_grad_() if torch.is_tensor(x) and x.is_floating_point() else x
              for x in inputs]
    leaves = [x for x in inputs if torch.is_tensor(x) and x.requires_grad]

    def run(m):
        torch.manual_seed(5)  # Tacotron2's prenet drops out even in eval, as its paper says
        out = output(m(*inputs))
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        params = list(m.parameters())
        grads = torch.autograd.grad((out * weights).sum(), leaves + params, allow_unused=True)
        return [out.detach()] + [g for g in grads]

    expected = run(model)
    for backend in RECURRENT_BACKENDS:
        attention = "reference" if backend == "native" else backend
        with fastseq.use_backend(recurrent=backend, attention=attention):
            got = run(fast)
        for i, (g, e) in enumerate(zip(got, expected)):
            if e is None:
                assert g is None
            else:
                torch.testing.assert_close(g, e, **tolerance, msg=lambda m: f"{backend}: tensor {i}: {m}")
    return report


def test_torchvision_vision_transformer():
    models = _package("torchvision.models")
    torch.manual_seed(0)
    vit = models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                   hidden_dim=16, mlp_dim=32, num_classes=5)
    _compare(vit, [torch.randn(2, 3, 16, 16)], ["MultiheadAttention"] * 2)


def test_torchaudio_conformer_with_padding():
    models = _package("torchaudio.models")
    torch.manual_seed(0)
    conformer = models.Conformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=2,
                                 depthwise_conv_kernel_size=3)
    # lengths 6 and 4: its key_padding_mask reaches the fused kernel
    _compare(conformer, [torch.randn(2, 6, 16), torch.tensor([6, 4])],
             ["MultiheadAttention"] * 2, output=lambda out: out[0][:, :4])


def test_torchaudio_deepspeech_and_wavernn():
    models = _package("torchaudio.models")
    torch.manual_seed(0)
    _compare(models.DeepSpeech(16, n_hidden=12, n_class=5), [torch.randn(2, 1, 5, 16)], ["RNN"])
    wavernn = models.WaveRNN(upsample_scales=[2, 2], n_classes=8, hop_length=4, n_res_block=1,
                             n_rnn=8, n_fc=8, kernel_size=3, n_freq=6, n_hidden=6, n_output=6)
    _compare(wavernn, [torch.randn(2, 1, 12), torch.randn(2, 1, 6, 5)], ["GRU", "GRU"])


def test_torchaudio_tacotron2():
    models = _package("torchaudio.models")
    torch.manual_seed(0)
    tacotron = models.Tacotron2(
        n_symbol=20, symbol_embedding_dim=16, encoder_embedding_dim=16, encoder_n_convolution=1,
        encoder_kernel_size=3, decoder_rnn_dim=16, decoder_max_step=10, decoder_dropout=0.0,
        attention_rnn_dim=16, attention_hidden_dim=8, attention_location_n_filter=4,
        attention_location_kernel_size=3, attention_dropout=0.0, prenet_dim=8,
        postnet_n_convolution=1, postnet_kernel_size=3, postnet_embedding_dim=8,
        n_mels=8, gate_threshold=0.5)
    inputs = [torch.randint(0, 20, (2, 5)), torch.tensor([5, 4]), torch.randn(2, 8, 6),
              torch.tensor([6, 6])]
    _compare(tacotron, inputs, ["LSTM", "LSTMCell", "LSTMCell"], output=lambda out: out[1])


def test_speechbrain_crdnn():
    _package("speechbrain")
    from speechbrain.lobes.models.CRDNN import CRDNN
    from speechbrain.nnet.RNN import LSTM
    torch.manual_seed(0)
    crdnn = CRDNN(input_shape=[None, None, 12], cnn_blocks=1, cnn_channels=(4,),
                  rnn_class=LSTM, rnn_layers=2, rnn_neurons=6, rnn_bidirectional=True,
                  dnn_blocks=1, dnn_neurons=8, time_pooling=False, dropout=0.0)
    _compare(crdnn, [torch.randn(2, 7, 12)], ["LSTM"])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_speechbrain_rnn_wrappers(kind):
    _package("speechbrain")
    import speechbrain.nnet.RNN as sb_rnn
    torch.manual_seed(0)
    layer = getattr(sb_rnn, kind)(hidden_size=6, input_shape=[None, None, 5], num_layers=2,
                                  bidirectional=True)
    _compare(layer, [torch.randn(3, 4, 5)], [kind], output=lambda out: out[0])
    cell = getattr(sb_rnn, kind + "Cell")(hidden_size=6, input_shape=[None, 5], num_layers=2)
    _compare(cell, [torch.randn(3, 5)], [kind + "Cell"] * 2, output=lambda out: out[0])


@pytest.mark.parametrize("rnn,attention", [("lstm", "content"), ("gru", "location"),
                                           ("rnn", "keyvalue")])
def test_speechbrain_attentional_rnn_decoder(rnn, attention):
    _package("speechbrain")
    from speechbrain.nnet.RNN import AttentionalRNNDecoder
    torch.manual_seed(0)
    decoder = AttentionalRNNDecoder(rnn_type=rnn, attn_type=attention, hidden_size=6,
                                    attn_dim=4, num_layers=2, enc_dim=5, input_size=3,
                                    channels=2, kernel_size=3, re_init=False)
    inputs = [torch.randn(2, 4, 3), torch.randn(2, 6, 5), torch.tensor([1.0, 0.5])]
    cell = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn": "RNNCell"}[rnn]
    # The attention module runs fastseq's fused global attention too.
    swapped = [cell] * 2 + ["SpeechBrain" + {"content": "ContentBasedAttention",
                                             "location": "LocationAwareAttention",
                                             "keyvalue": "KeyValueAttention"}[attention]]
    if attention == "location":  # its first alignment is made in float32 (enc_len.float())
        _compare(decoder, inputs, swapped, output=lambda out: out[0], dtype=torch.float32,
                 tolerance=dict(rtol=1e-4, atol=1e-5))
    else:
        _compare(decoder, inputs, swapped, output=lambda out: out[0])


def _onmt_model(rnn_type: str, decoder_class: str, bidirectional: bool,
                attn_type: str = "general", coverage_attn: bool = False,
                param_init: float = 0.1):
    """An OpenNMT-py RNN encoder-decoder from its own classes (2 layers, hidden 8), initialised
    as its model_builder does (also tests/attention_decoder's)."""
    _package("onmt")
    from onmt.decoders import decoder as onmt_decoders
    from onmt.encoders.rnn_encoder import RNNEncoder
    from onmt.models.model import NMTModel
    from onmt.modules.embeddings import Embeddings
    torch.manual_seed(0)
    encoder = RNNEncoder(rnn_type, bidirectional, num_layers=2, hidden_size=8,
                         embeddings=Embeddings(6, 11, word_padding_idx=1))
    decoder = getattr(onmt_decoders, decoder_class)(
        rnn_type, bidirectional, num_layers=2, hidden_size=8, attn_type=attn_type,
        coverage_attn=coverage_attn, embeddings=Embeddings(6, 13, word_padding_idx=1))
    model = NMTModel(encoder, decoder)
    # OpenNMT-py builds its embeddings with torch.nn.utils.skip_init (uninitialised memory) and
    # initialises every parameter in onmt.model_builder: uniform(-param_init, param_init), 0.1 by
    # default. Without this the tables held whatever memory they got (seen: 1e26, and NaN left by
    # a freed poisoned tensor), so the outputs were NaN in some processes.
    torch.manual_seed(0)
    for param in model.parameters():
        torch.nn.init.uniform_(param, -param_init, param_init)
    return model


@pytest.mark.parametrize("rnn_type,decoder_class,bidirectional", [
    ("LSTM", "InputFeedRNNDecoder", True), ("GRU", "InputFeedRNNDecoder", False),
    ("LSTM", "StdRNNDecoder", False), ("GRU", "StdRNNDecoder", True)])
def test_opennmt_rnn_encoder_decoder(rnn_type, decoder_class, bidirectional):
    """StdRNNDecoder with a GRU tests isinstance(self.rnn, nn.GRU): the patched GRU answers as
    torch's, so it passes a tensor as hx, as it does unpatched."""
    model = _onmt_model(rnn_type, decoder_class, bidirectional)
    torch.manual_seed(1)
    src = torch.randint(2, 11, (3, 7, 1))
    tgt = torch.randint(2, 13, (3, 5, 1))
    src_len = torch.tensor([7, 5, 6])
    src[1, 5:] = 1
    src[2, 6:] = 1
    # the encoder is stacked layers (one replaced module); the input-feeding decoder steps its own
    # StackedLSTM/GRU of cells, the standard decoder runs one stacked module.
    decoder_modules = ([rnn_type + "Cell"] * 2 if decoder_class == "InputFeedRNNDecoder"
                       else [rnn_type])
    _compare(model, [src, tgt, src_len],
             [rnn_type] + decoder_modules + ["OpenNMTGlobalAttention"],
             output=lambda out: out[0])


def test_attention_modules_unpatch_and_sparsemax_is_left():
    """OpenNMT-py's GlobalAttention goes back to its class on unpatch (its parameters the
    same tensors); one normalising with sparsemax is left, with the reason."""
    _package("onmt")
    from onmt.modules.global_attention import GlobalAttention
    model = torch.nn.ModuleList([GlobalAttention(6, attn_type="mlp"),
                                 GlobalAttention(6, attn_func="sparsemax")])
    weight = model[0].linear_query.weight
    report = fastseq.patch(model)
    assert [new.rsplit(".", 1)[-1] for _, _, new in report.replaced] == ["OpenNMTGlobalAttention"]
    assert report.left[0][0] == "1" and "sparsemax" in report.left[0][2]
    assert isinstance(model[0], GlobalAttention) and model[0].linear_query.weight is weight
    fastseq.unpatch(model)
    assert type(model[0]) is GlobalAttention and type(model[1]) is GlobalAttention
    assert not hasattr(model[0], "backend")

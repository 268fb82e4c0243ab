"""The example scripts train their language models and they learn (validation loss below the
uniform guess, ln 256 = 5.55 nats a byte)."""
import math

from fastseq.examples import train_lm


def test_train_lm_example_learns(capsys):
    results = train_lm.main(["--steps", "30", "--log-every", "15", "--d-model", "32",
                             "--batch", "8", "--seq-len", "32", "--device", "cpu"])
    assert set(results) == {"transformer-xl", "lstm"}
    for name, r in results.items():
        assert r["valid_loss"] < math.log(256) - 1.0, (name, r)
        assert r["tokens_per_s"] > 0
    assert "tokens/s" in capsys.readouterr().out


def test_long_context_evaluation_runs_every_memory(capsys):
    from fastseq.examples import eval_long_context
    results = eval_long_context.main(["--steps", "20", "--d-model", "32", "--batch", "4",
                                      "--seq-len", "16", "--memories", "0,1,4",
                                      "--device", "cpu"])
    assert sorted(results) == [0, 16, 64]
    assert all(math.isfinite(loss) and loss < math.log(256) for loss in results.values())
    assert "perplexity" in capsys.readouterr().out


def test_train_block_recurrent_example_learns(capsys, tmp_path):
    from fastseq.examples import train_block_recurrent
    curves = tmp_path / "curves.csv"
    results = train_block_recurrent.main(["--steps", "24", "--log-every", "12", "--d-model", "32",
                                          "--batch", "8", "--seq-len", "32", "--window", "8",
                                          "--states", "4", "--device", "cpu",
                                          "--curves", str(curves)])
    assert set(results) == {"block-recurrent", "transformer-xl"}
    for name, r in results.items():
        assert r["valid_loss"] < math.log(256) - 1.0, (name, r)
    rows = curves.read_text().splitlines()
    assert rows[0] == "step,model,loss" and len(rows) == 5
    assert "tokens/s" in capsys.readouterr().out


def test_train_seq2seq_example_learns(capsys):
    """The reversal task: the loss falls below the uniform guess over the 13 outputs by 0.5
    nats in 60 steps, and both decodings report their accuracies."""
    from fastseq.examples import train_seq2seq
    results = train_seq2seq.main(["--steps", "60", "--batch", "16", "--d-model", "32",
                                  "--eval-size", "8", "--log-every", "20", "--max-len", "10",
                                  "--device", "cpu"])
    assert results["curve"][-1][1] < math.log(13) - 0.5, results["curve"]
    for name in ("greedy", "beam-5"):
        assert 0.0 <= results[name]["tokens"] <= 1.0
    assert "exact match" in capsys.readouterr().out

"""The example script trains both language models and they learn (validation loss below the
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

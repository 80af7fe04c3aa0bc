import pytest

from llm_train.quickstart import main


def test_help(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    assert "--steps" in out and "--minutes" in out and "examples:" in out


def test_short_quickstart_runs_end_to_end(tmp_path, capsys):
    """A few steps of a smaller model: corpus, tokenizer, training, checkpoint, export, sample."""
    small = ["num_layers=1", "emb_dim=64", "num_heads=2", "head_dim=32", "mlp_dim=128"]
    args = [
        "--steps",
        "3",
        "--out",
        str(tmp_path),
        "--max-new-tokens",
        "5",
        "console_progress=false",
    ]
    assert main([*args, *small, "eval_every=0"]) == 0
    out = capsys.readouterr().out
    assert "corpus:" in out and "loss: first" in out and "steps 1..3" in out
    assert "exported params" in out and "--- sample ---" in out
    assert (tmp_path / "quickstart" / "checkpoints" / "3").is_dir()
    # the export holds the run's tokenizer: llm-serve can serve the folder the quick start prints
    from tokenizers import Tokenizer

    exported = out.split("exported params: ")[1].split()[0]
    assert Tokenizer.from_file(f"{exported}/tokenizer.json").get_vocab_size() > 0

import yaml

from llm_core.cli import main


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", "llama3-8b", "num_layers=2"]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out.split("# derived")[0])
    assert data["num_layers"] == 2 and data["emb_dim"] == 4096 and data["num_kv_heads"] == 8
    assert "resolved_head_dim: 128" in out


def test_config_show_bad_key_exits_2(capsys):
    assert main(["config", "show", "llama3-8b", "num_layer=2"]) == 2
    assert "Did you mean 'num_layers'?" in capsys.readouterr().err


def test_config_show_prints_total_and_active_parameters_for_moe(capsys):
    assert main(["config", "show", "mixtral-8x7b"]) == 0
    derived = yaml.safe_load(capsys.readouterr().out.split("# derived")[1])
    assert derived["parameters"] == 46_702_792_704
    assert derived["active_parameters"] == 12_879_925_248
    assert derived["layer_segments"] == ["groups: 32 x [gqa/moe]"]

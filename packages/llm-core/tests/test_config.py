"""The config system: layering, typing, derived values and every error case, with exact messages."""

from pathlib import Path

import pytest
import yaml

from llm_core.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    load_config,
    parse_overrides,
    resolve_mesh_shape,
    shipped_config_files,
    shipped_model_names,
)


@pytest.mark.parametrize(
    "path", shipped_config_files(), ids=lambda p: p.relative_to(CONFIG_DIR).as_posix()
)
def test_every_shipped_yaml_file_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text()) or {}
    for key, value in raw.items():
        got = getattr(cfg, key)
        assert got == (float(value) if isinstance(got, float) else value), key


def test_layers_apply_in_order(tmp_path):
    task = tmp_path / "task.yml"
    task.write_text("model_name: llama3-8b\nnum_layers: 4\nlearning_rate: 1.0e-3\n")
    cfg = load_config(task, ["num_layers=2", "dtype=bfloat16"])
    assert cfg.model_name == "llama3-8b"
    assert cfg.emb_dim == 4096  # from models/llama3-8b.yml
    assert cfg.num_layers == 2  # override beats task file beats model file
    assert cfg.learning_rate == 1e-3
    assert cfg.dtype == "bfloat16"


def test_model_name_override_picks_model_file():
    cfg = load_config("sft.yml", ["model_name=qwen3-0.6b"])
    assert cfg.qk_norm and cfg.emb_dim == 1024 and cfg.learning_rate == 2e-5


def test_override_types_are_parsed():
    overrides = parse_overrides(
        [
            "steps=5",
            "learning_rate=1e-4",
            "scan_layers=false",
            "attention_pattern=[local, global]",
            "sliding_window=null",
            "run_name=abc",
        ]
    )
    assert overrides == {
        "steps": 5,
        "learning_rate": "1e-4",
        "scan_layers": False,
        "attention_pattern": ["local", "global"],
        "sliding_window": None,
        "run_name": "abc",
    }
    cfg = load_config(None, {**overrides, "sliding_window": 64})
    assert cfg.layer_attention_kinds[:2] == ("local", "global")
    assert cfg.learning_rate == pytest.approx(1e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.scan_layers is False


def test_frozen():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.num_layers = 3  # type: ignore[misc]


def test_derived_values():
    cfg = load_config("gemma3-1b")
    assert cfg.resolved_head_dim == 256 and cfg.resolved_num_kv_heads == 1
    assert cfg.layer_attention_kinds[:6] == ("local",) * 5 + ("global",)
    assert len(cfg.layer_attention_kinds) == 26
    base = load_config(None, ["emb_dim=256", "num_heads=4"])
    assert base.resolved_head_dim == 64 and base.resolved_num_kv_heads == 4


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["num_head=4"])
    assert (
        str(err.value)
        == "Unknown config key 'num_head' in command-line overrides. Did you mean 'num_heads'?"
    )


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert (
        str(err.value)
        == f"Unknown config key 'learning_rat' in {path}. Did you mean 'learning_rate'?"
    )


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["num_layers=abc"])
    assert str(err.value) == (
        "Config key 'num_layers' expects int, got 'abc' (str) from command-line overrides."
    )
    with pytest.raises(ConfigError) as err:
        load_config(None, ["scan_layers=3"])
    assert (
        str(err.value)
        == "Config key 'scan_layers' expects bool, got 3 (int) from command-line overrides."
    )
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dtype=float64"])
    assert str(err.value) == (
        "Config key 'dtype' expects one of 'float32', 'bfloat16', 'float16', got 'float64' (str) "
        "from command-line overrides."
    )


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ConfigError) as err:
        load_config("llama3-8b", ["num_kv_heads=5"])
    assert str(err.value) == (
        "num_heads (32) must be divisible by num_kv_heads (5): set num_kv_heads to a divisor of num_heads."
    )


def test_unknown_model_name():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model_name=lama3-8b"])
    assert str(err.value).startswith(
        "Config key 'model_name' names an unknown model 'lama3-8b'. Did you mean 'llama3-8b'?"
    )


def test_seq_len_beyond_model_limit():
    with pytest.raises(ConfigError) as err:
        load_config("llama2-7b", ["seq_len=8192"])
    assert str(err.value) == (
        "seq_len (8192) is beyond the model's limit max_position_embeddings (4096): lower seq_len."
    )


def test_local_layers_need_a_window():
    with pytest.raises(ConfigError, match="set sliding_window"):
        load_config("gemma2-2b", ["sliding_window=null"])


def test_missing_file_and_bad_override_syntax():
    with pytest.raises(ConfigError) as err:
        load_config("sfft.yml")
    assert str(err.value).startswith("Config file not found: sfft.yml. Did you mean 'sft.yml'?")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["steps"])
    assert str(err.value) == "Override 'steps' is not of the form key=value."


def test_mesh_fill_and_mismatch():
    cfg = load_config(None, ["ici_data_parallelism=2", "ici_tensor_parallelism=2"])
    shape = resolve_mesh_shape(cfg, num_devices=8)
    assert shape["data"] == 2 and shape["tensor"] == 2 and shape["fsdp"] == 2
    fixed = load_config(None, ["ici_fsdp_parallelism=4"])
    with pytest.raises(ConfigError) as err:
        resolve_mesh_shape(fixed, num_devices=8)
    assert str(err.value) == (
        "The ici mesh product is 4 (ici_fsdp_parallelism=4) but there are 8 devices for it: "
        "make the product 8, or set one ici_*_parallelism to -1."
    )
    with pytest.raises(ConfigError) as err:
        resolve_mesh_shape(load_config(None, ["ici_tensor_parallelism=3"]), num_devices=8)
    assert str(err.value) == (
        "The ici mesh needs a multiple of 3 devices (product of the fixed ici_*_parallelism values), "
        "but there are 8."
    )
    with pytest.raises(ConfigError, match="Only one ici_\\*_parallelism may be -1"):
        load_config(None, ["ici_data_parallelism=-1"])
    two_hosts = resolve_mesh_shape(load_config(), num_devices=4, num_slices=2)
    assert two_hosts["data"] == 2 and two_hosts["fsdp"] == 2


def test_shipped_models_listed():
    names = shipped_model_names()
    for expected in (
        "llama3-8b",
        "mistral-7b",
        "qwen3-0.6b",
        "gemma2-9b",
        "gemma3-27b",
        "gpt3-175b",
    ):
        assert expected in names

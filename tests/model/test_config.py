"""Config: config.json round trip, legacy keys, unknown keys, contradictions, presets."""

import json

import pytest

import zamba2
from zamba2.model.config import PRESETS, Config


def test_json_round_trip(tmp_path):
    cfg = zamba2.tiny()
    cfg.save(tmp_path / "config.json")
    assert Config.from_json(tmp_path / "config.json") == cfg
    written = json.loads((tmp_path / "config.json").read_text())
    assert "hybrid_layer_ids" not in written  # derived values are never written


def test_transformers_style_config_is_read():
    d = dict(model_type="zamba2", architectures=["Zamba2ForCausalLM"], hidden_size=32, num_hidden_layers=3,
             layers_block_type=["linear_attention", "hybrid", "linear_attention"], hybrid_layer_ids=[1],
             n_mamba_heads=4, mamba_headdim=16, attention_head_dim=16, num_attention_heads=4,
             rope_parameters={"rope_theta": 5000.0, "rope_type": "default"}, transformers_version="5.23.0")
    cfg = Config.from_dict(d)
    assert cfg.layers_block_type == ["mamba", "hybrid", "mamba"] and cfg.rope_theta == 5000.0


def test_legacy_zyphra_keys_are_mapped():
    cfg = Config.from_dict(dict(hidden_size=32, num_hidden_layers=2, layers_block_type=["m", "g"],
                                ffn_hidden_size=80, lora_rank=4, state_size=8, use_shared_attention_lora=True,
                                n_mamba_heads=4, num_attention_heads=4))
    assert (cfg.intermediate_size, cfg.adapter_rank, cfg.mamba_d_state) == (80, 4, 8)
    assert cfg.use_shared_attention_adapter and cfg.hybrid_layer_ids == [1]


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown key 'hiden_size'"):
        Config.from_dict(dict(hiden_size=32, layers_block_type=["mamba"], num_hidden_layers=1))


@pytest.mark.parametrize("bad, message", [
    (dict(hybrid_layer_ids=[0]), "hybrid_layer_ids=.*contradicts"),
    (dict(num_hidden_layers=4), "has 3 entries but num_hidden_layers is 4"),
    (dict(layers_block_type=["mamba", "attention", "mamba"]), "unknown layer type 'attention'"),
    (dict(n_mamba_heads=5), "must divide by n_mamba_heads"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4}), "rope type 'yarn'"),
    # every field's type and range, checked when the config is built
    (dict(hidden_size="32"), r"hidden_size = '32' is not an integer"),
    (dict(use_mem_rope=1), "use_mem_rope = 1 is not true or false"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps = nan; expected a number > 0"),
    (dict(num_mem_blocks=0), "num_mem_blocks = 0; expected a number > 0"),
    (dict(eos_token_id=[2, 40000]), r"eos_token_id = \[2, 40000\]; expected token ids in \[0, 32000\)"),
    (dict(pad_token_id=-1), "pad_token_id = -1"),
])
def test_contradictions_are_named(bad, message):
    d = dict(hidden_size=32, num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"], n_mamba_heads=4,
             num_attention_heads=4)
    d.update(bad)
    with pytest.raises(ValueError, match=message):
        Config.from_dict(d)


def test_model_type_and_json_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="expected 'zamba2'"):
        Config.from_json(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Config.from_json(tmp_path / "nope.json")


def test_presets_are_valid():
    for name in PRESETS:
        cfg = zamba2.preset(name)
        assert cfg.num_parameters() > 0
    assert zamba2.preset("1.2b").attention_head_dim == 128
    seven = zamba2.preset("7b")  # Zamba2-7B: 7.4B parameters, 13 hybrid layers, attention head dim 224
    assert 7.3e9 < seven.num_parameters() < 7.45e9 and len(seven.hybrid_layer_ids) == 13
    assert seven.attention_head_dim == 224 and seven.mamba_headdim == 64
    assert 40e6 < zamba2.preset("small").num_parameters() < 50e6
    with pytest.raises(ValueError, match="unknown preset"):
        zamba2.preset("13b")
    with pytest.raises(ValueError, match="unknown Config field 'hiden_size' \\(did you mean 'hidden_size'\\?\\)"):
        zamba2.preset("tiny", hiden_size=64)

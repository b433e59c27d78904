"""Checkpoint folders: round trips, the key table, duplicated/legacy layouts and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import zamba2
from conftest import random_model
from zamba2.model.checkpoint import CheckpointError, hf_to_native, native_to_hf


def saved(tmp_path, model=None):
    model = model or random_model()
    zamba2.save(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def rewrite(path, fn):
    """Apply fn to the tensors dict of a single-file checkpoint."""
    tensors = load_file(path / "model.safetensors")
    save_file(fn(tensors), path / "model.safetensors")


def test_round_trip_is_exact(tmp_path):
    model, path = saved(tmp_path)
    loaded = zamba2.load(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.config == model.config


def test_key_table_round_trips_every_key():
    cfg = zamba2.tiny()
    for name in zamba2.Zamba2LM(cfg).state_dict():
        assert hf_to_native(native_to_hf(name, cfg), cfg) == name


def test_shared_block_stored_once_under_source_layers(tmp_path):
    _, path = saved(tmp_path)
    keys = load_file(path / "model.safetensors").keys()
    shared = {k.split(".")[2] for k in keys if ".shared_transformer." in k}
    assert shared == {"1", "3"}  # hybrid layers 1, 3, 4 with two blocks: sources are 1 and 3
    assert "model.layers.1.shared_transformer.feed_forward.gate_up_proj_adapter_list.2.0.weight" in keys


def test_sharded_save_writes_an_index(tmp_path):
    model = random_model()
    zamba2.save(model, tmp_path / "c", max_shard_bytes=50_000)
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not list(tmp_path.glob("c/model.safetensors"))
    ids = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(zamba2.load(tmp_path / "c")(ids), model(ids))


def test_duplicated_shared_blocks_are_accepted(tmp_path):
    model, path = saved(tmp_path)

    def duplicate(t):  # what fine-tuned re-saves do: a copy of block 0 under layer 4 too
        t.update({k.replace("layers.1.", "layers.4."): v.clone() for k, v in t.items()
                  if k.startswith("model.layers.1.shared_transformer.") and "adapter_list" not in k})
        return t

    rewrite(path, duplicate)
    ids = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(zamba2.load(path)(ids), model(ids))


def test_disagreeing_copies_are_rejected(tmp_path):
    _, path = saved(tmp_path)
    key = "model.layers.1.shared_transformer.self_attn.q_proj.weight"
    rewrite(path, lambda t: {**t, key.replace("layers.1", "layers.4"): t[key] + 1})
    with pytest.raises(CheckpointError, match="differs from another copy"):
        zamba2.load(path)


def test_legacy_layout_is_mapped(tmp_path):
    model, path = saved(tmp_path)
    cfg = model.config
    hybrid = cfg.hybrid_layer_ids

    def to_legacy(t):
        out = {}
        for k, v in t.items():
            p = k.split(".")
            if k.startswith("model.layers.") and ".shared_transformer." in k:
                b = hybrid.index(int(p[2])) % cfg.num_mem_blocks
                rest = ".".join(p[4:])
                if "gate_up_proj_adapter_list" in rest:
                    j, ab = p[6], p[7]
                    rest = f"feed_forward.linear_fc1_lora_{'AB'[int(ab)]}_list.{j}.weight"
                rest = rest.replace("gate_up_proj.", "linear_fc1.").replace("down_proj.", "linear_fc2.")
                out[f"model.blocks.{b}.{rest}"] = v
            elif k.startswith("model.layers.") and p[3] == "linear":
                out[f"model.linear_layers.{hybrid.index(int(p[2]))}.weight"] = v
            elif k.startswith("model.layers."):
                out[f"model.mamba_layers.{p[2]}." + ".".join(p[3:]).replace("mamba_decoder.", "")] = v
            else:
                out[k] = v
        return out

    rewrite(path, to_legacy)
    ids = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(zamba2.load(path)(ids), model(ids))


def test_missing_tensor_is_named(tmp_path):
    _, path = saved(tmp_path)
    rewrite(path, lambda t: {k: v for k, v in t.items() if k != "model.layers.2.mamba.A_log"})
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.2\.mamba\.A_log"):
        zamba2.load(path)


def test_unexpected_tensor_is_named(tmp_path):
    _, path = saved(tmp_path)
    rewrite(path, lambda t: {**t, "model.layers.0.mystery.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensors.*mystery"):
        zamba2.load(path)


def test_config_contradicting_tensors(tmp_path):
    _, path = saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["mamba_d_state"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="contradict config.json.*in_proj"):
        zamba2.load(path)


def test_malformed_files(tmp_path):
    _, path = saved(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        zamba2.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        zamba2.load(path)
    (path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        zamba2.load(path)
    with pytest.raises(ValueError, match="no such folder, and not a Hugging Face Hub repo id"):
        zamba2.load(tmp_path / "nowhere")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, path = saved(tmp_path)
    before = (path / "model.safetensors").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zamba2.model.checkpoint, "save_file", disk_full)
    with pytest.raises(ValueError, match="no space left on device while saving .*ckpt; the previous checkpoint is"):
        zamba2.save(random_model(seed=1), path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no half-written folder left behind

"""Quantized checkpoints (`zamba2 quantize`) and quantizing while loading (model/checkpoint.py load, infer/quant.py):
both must give exactly the model that loading in float and quantizing after gives."""

import json

import pytest
import torch

import zamba2
from conftest import random_model
from zamba2.errors import UserError
from zamba2.infer.quant import quantize, quantize_checkpoint
from zamba2.ops.layers import Quantization

FORMATS = [Quantization(8), Quantization(4, 32)]


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A bf16 checkpoint in several shards, as the released ones are stored, with a tokenizer file beside it."""
    path = tmp_path_factory.mktemp("ckpt") / "bf16"
    model = random_model(hidden_size=64, intermediate_size=128, vocab_size=256).to(torch.bfloat16)
    zamba2.save(model, path, max_shard_bytes=100_000)
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.mark.parametrize("q", FORMATS, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_while_loading_equals_load_then_quantize(bf16_checkpoint, q, dtype):
    streamed = zamba2.load(bf16_checkpoint, dtype, quantization=q)
    after = quantize(zamba2.load(bf16_checkpoint, dtype), q)
    assert streamed.quantized == after.quantized == q.name
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert {type(m) for m in streamed.modules()} == {type(m) for m in after.modules()}
    ids = torch.randint(3, 256, (2, 11))
    assert torch.equal(streamed(ids), after(ids))
    assert not any(p.requires_grad for p in streamed.parameters())


@pytest.mark.parametrize("q", FORMATS, ids=lambda q: q.name)
def test_quantized_folder_loads_as_it_was_quantized(bf16_checkpoint, tmp_path, q):
    out = tmp_path / "q"
    made = quantize_checkpoint(bf16_checkpoint, out, q.bits, q.group_size or 64)
    config = json.loads((out / "config.json").read_text())
    assert Quantization.from_dict(config["quantization_config"]) == q
    assert (out / "tokenizer_config.json").exists()  # the other files come along
    loaded = zamba2.load(out)  # no flag: the format is in config.json
    assert loaded.quantized == q.name and Quantization.of(loaded) == q
    ids = torch.randint(3, 256, (2, 11))
    in_memory = quantize(zamba2.load(bf16_checkpoint), q)
    assert torch.equal(loaded(ids), in_memory(ids)) and torch.equal(made(ids), in_memory(ids))
    assert torch.equal(zamba2.generate(loaded, ids, 4), zamba2.generate(in_memory, ids, 4))  # the compiled decode too
    assert zamba2.load(out, quantization=q).quantized == q.name  # asking for what it holds is fine
    other = Quantization(8) if q.bits == 4 else Quantization(4, 32)
    with pytest.raises(UserError, match=f"holds {q.name} weights already"):
        zamba2.load(out, quantization=other)
    zamba2.save(loaded, tmp_path / "again")  # a quantized model saves as stored, and loads back the same
    assert torch.equal(zamba2.load(tmp_path / "again")(ids), loaded(ids))


def test_quantized_checkpoints_are_not_trainable(bf16_checkpoint, tmp_path):
    from zamba2.train.trainer import TrainConfig, build_model

    quantize_checkpoint(bf16_checkpoint, tmp_path / "q", 4, 32)
    with pytest.raises(UserError, match="for inference only"):
        build_model(TrainConfig(model=str(tmp_path / "q")))
    with pytest.raises(UserError, match="for inference only"):
        zamba2.save(zamba2.load(tmp_path / "q"), tmp_path / "t", train_state={"step": 1})
    with pytest.raises(UserError, match="is the source checkpoint"):
        quantize_checkpoint(bf16_checkpoint, bf16_checkpoint, 8)


def test_config_with_a_foreign_quantization_is_refused(bf16_checkpoint, tmp_path):
    import shutil

    shutil.copytree(bf16_checkpoint, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not one zamba2 writes"):
        zamba2.load(tmp_path / "c")

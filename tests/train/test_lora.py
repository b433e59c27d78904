"""LoRA: reach (every targeted module gets a gradient), only adapters change, merge == unmerged, adapter files."""

import json

import pytest
import torch

import zamba2
from conftest import random_model
from zamba2.train.lora import TARGETS, LoRA, LoRALinear, load_adapter, merge
from zamba2.train.trainer import param_groups

IDS = torch.randint(0, 128, (2, 19))


def wrapped(shared: str, targets=TARGETS, seed=0) -> zamba2.Zamba2LM:
    """A tiny model with LoRA applied (float32 base) and random adapter weights, so B != 0 as after training."""
    model = random_model(seed=seed)
    LoRA(rank=3, alpha=6.0, targets=targets, shared=shared, base_dtype="float32").apply(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("shared", ["shared", "per-visit"])
def test_every_targeted_module_and_visit_gets_a_gradient_and_nothing_else_trains(shared):
    model = wrapped(shared)
    c = model.config
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    # every in/out_proj of every layer, and every shared-block projection
    assert len(lora) == 2 * c.num_hidden_layers + 6 * c.num_mem_blocks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in lora for ab in "AB"}
    assert sum(len(g["params"]) for g in param_groups(model, 0.1)) == len(trainable)
    model(IDS).float().pow(2).mean().backward()
    for name, m in lora.items():
        slots = m.lora_A.shape[0]
        assert slots == (len(c.hybrid_layer_ids[int(name.split(".")[1])::c.num_mem_blocks])
                         if shared == "per-visit" and name.startswith("shared_blocks") else 1)
        for s in range(slots):  # each visit's own pair is reached
            assert m.lora_A.grad[s].abs().sum() > 0 and m.lora_B.grad[s].abs().sum() > 0, (name, s)


def test_a_training_step_changes_only_adapter_weights():
    model = random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    LoRA(rank=2, base_dtype="float32").apply(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    for _ in range(2):
        model(IDS).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if k.endswith("lora_B"))


def test_new_adapters_leave_the_model_unchanged_and_the_base_is_held_in_bfloat16():
    model = random_model()
    expected = model(IDS)
    LoRA(rank=4, base_dtype="float32").apply(model)
    assert torch.equal(model(IDS), expected)  # B starts at zero
    LoRA(rank=4).apply(model := random_model())
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("shared,targets", [("shared", TARGETS), ("per-visit", ("in_proj", "q_proj", "gate_up_proj")),
                                            ("per-visit", ("v_proj",))])
def test_merged_checkpoint_gives_the_unmerged_logits(shared, targets, tmp_path):
    model = wrapped(shared, targets).eval()
    with torch.no_grad():
        expected = model(IDS)
        merged = merge(model)
        zamba2.save(merged, tmp_path / "m")
        got = zamba2.load(tmp_path / "m")(IDS)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    rank = model.config.adapter_rank + (3 if shared == "per-visit" else 0)  # per-visit folds into the adapters
    assert merged.config.adapter_rank == rank == json.loads((tmp_path / "m" / "config.json").read_text())["adapter_rank"]
    assert (got - expected).norm() / expected.norm() < 1e-5
    assert not torch.equal(got, random_model()(IDS))  # the adapters did change the model


def test_merged_checkpoint_loads_in_transformers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Zamba2ForCausalLM

    model = wrapped("per-visit", ("q_proj", "k_proj", "gate_up_proj")).eval()
    with torch.no_grad():
        expected = model(IDS)
        zamba2.save(merge(model), tmp_path / "m")
        got = Zamba2ForCausalLM.from_pretrained(tmp_path / "m").eval()(IDS).logits
    assert (got - expected).norm() / expected.norm() < 1e-4


def test_per_visit_adapters_without_a_place_to_fold_cannot_merge():
    with pytest.raises(ValueError, match="cannot merge a per-visit LoRA on o_proj"):
        merge(wrapped("per-visit", ("o_proj",)))
    model = random_model(use_shared_attention_adapter=False)
    LoRA(rank=2, targets=("q_proj",), shared="per-visit", base_dtype="float32").apply(model)
    with pytest.raises(ValueError, match="cannot merge a per-visit LoRA on q_proj"):
        merge(model)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoRA(targets=("x_proj",))


def test_adapter_file_round_trip(tmp_path):
    model = wrapped("per-visit")
    with torch.no_grad():
        expected = model(IDS)
    LoRA(rank=3, alpha=6.0, shared="per-visit", base_dtype="float32").save(model, tmp_path / "ad")
    fresh = random_model()
    assert load_adapter(fresh, tmp_path / "ad").shared == "per-visit"
    with torch.no_grad():
        assert torch.equal(fresh(IDS), expected)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(random_model(), tmp_path)

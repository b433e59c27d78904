"""The compiled CPU decode kernels (zamba2/kernels.py) against the torch code they replace."""

import collections
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zamba2
from zamba2.infer.step import decode_step
from zamba2.ops import decode as compiled_decode, kernels
from zamba2.ops.decode import plain
from zamba2.ops.hardware import NATIVE_BF16
from zamba2.ops.layers import WIDE, RMSNorm, linear

from conftest import random_model


@pytest.fixture(scope="module")
def k():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernels need AVX2 + FMA")
    if not kernels.ENABLED:
        pytest.skip("ZAMBA2_CPU_KERNELS=0: the suite runs the torch code only")
    built = kernels.get()
    assert built is not None, "the CPU kernels did not build on an AVX2 machine (see the warning above)"
    assert built.__name__.startswith(f"zamba2_cpu_{torch.backends.cpu.get_cpu_capability().lower()}_")
    return built


@contextlib.contextmanager
def torch_code():
    """Run the torch reference code: kernels off inside the block."""
    kernels.ENABLED = False
    try:
        yield
    finally:
        kernels.ENABLED = True


@pytest.fixture
def calls(k, monkeypatch):
    """Counts of the compiled calls made from Python, by name: proof that a comparison ran the kernels at all.
    "decoder" counts whole-model decode steps (decode.py), "mamba_step" the mixer steps of the layer-by-layer path,
    "mamba_prefill" the mixers' prompt pieces."""
    counts = collections.Counter()

    class Counted:
        def __init__(self, decoder):
            self.decoder = decoder

        def step(self, *args):
            counts["decoder"] += 1
            return self.decoder.step(*args)

    def compiled(model, _f=compiled_decode.compiled):
        decoder = _f(model)
        return None if decoder is None else Counted(decoder)

    def counted(name):
        def f(*args, _f=getattr(k, name)):
            counts[name] += 1
            return _f(*args)
        return f

    monkeypatch.setattr(compiled_decode, "compiled", compiled)
    for name in ("mamba_step", "mamba_prefill"):
        monkeypatch.setattr(k, name, counted(name))
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("n,k_", [(37, 29), (64, 32), (301, 520)])
def test_gemv_equals_linear(k, dtype, rows, n, k_):
    w = torch.randn(n, k_).to(dtype)
    x = torch.randn(rows, k_)
    torch.testing.assert_close(k.gemv(w, x), F.linear(x, w.float()), rtol=1e-5, atol=1e-4)


def test_gemv_rejects_bad_input(k):
    with pytest.raises(RuntimeError, match="columns"):
        k.gemv(torch.randn(4, 8), torch.randn(1, 9))
    with pytest.raises(RuntimeError, match="float32, bfloat16, int8 or packed int4"):
        k.gemv(torch.randn(4, 8).double(), torch.randn(1, 8))
    with pytest.raises(RuntimeError, match="scale per row"):
        k.gemv(torch.zeros(4, 8, dtype=torch.int8), torch.randn(1, 8))


@pytest.mark.parametrize("rows,n,k_", [(17, 8, 8), (100, 1031, 517), (512, 1024, 512), (33, 37, 2049)])
def test_linear_rows_equals_linear(k, rows, n, k_):
    w, x = torch.randn(n, k_), torch.randn(rows, k_)
    torch.testing.assert_close(k.linear_rows(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    x = torch.randn(k_, rows).t()  # a transposed view
    torch.testing.assert_close(k.linear_rows(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_wide_prompt_matmuls_use_linear_rows(k, monkeypatch):
    """ops.layers.linear sends a prompt's float32 matmul through linear_rows when the weight is WIDE, and bfloat16 there
    too on CPUs without bf16 instructions (upcast), with the result of F.linear; narrow ones (adapters) and decode
    rows stay on their own paths."""
    used = []
    monkeypatch.setattr(k, "linear_rows", lambda x, w, _f=k.linear_rows: used.append(w.shape) or _f(x, w))
    w, b = torch.randn(WIDE[0] + 3, WIDE[1]), torch.randn(WIDE[0] + 3)
    x = torch.randn(2, 40, WIDE[1])
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        assert used == [w.shape]
        linear(x[..., :32], w[:, :32])  # narrow input
        linear(x[:, :5], w)  # decode rows
        assert len(used) == 1
        y = linear(x.bfloat16(), w.bfloat16())
    assert y.dtype == torch.bfloat16 and len(used) == 1 + (not NATIVE_BF16)
    torch.testing.assert_close(y.float(), F.linear(x.bfloat16().float(), w.bfloat16().float()), rtol=2e-2, atol=2e-2)
    linear(x, w.requires_grad_())  # autograd: F.linear
    assert len(used) == 1 + (not NATIVE_BF16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_torch(k, dtype):
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = torch.randn(3, 1, 48).to(dtype)
    with torch.inference_mode():
        fast = norm(x)
        with torch_code():
            ref = norm(x)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-2)


def decode(model, prompt, steps, mask=None):
    """Logits of `steps` decode steps after `prompt` [b,t], and the cache at the end. The steps read fixed random
    tokens, not greedy ones: two codes' bf16 logits can tie and pick different continuations."""
    feed = torch.randint(0, model.config.vocab_size, (prompt.shape[0], steps), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(prompt.shape[0], capacity=prompt.shape[1] + steps)
    out = []
    with torch.inference_mode():
        model(prompt, attention_mask=mask, cache=cache, logits_to_keep=1)
        for i in range(steps):
            out.append(decode_step(model, feed[:, i], cache).float())
    return torch.stack(out, 1), cache


SHAPES = {  # the 1.2B-like default (RoPE, q/k/v adapters, two shared blocks, 2 groups); a 2.7B/7B-like variant
    "rope+adapters": {},
    "gqa, no rope, mlp adapter, silu": dict(use_mem_rope=False, num_key_value_heads=2, use_shared_mlp_adapter=True,
                                            hidden_act="silu", mamba_ngroups=1),
}


# each side decodes its own greedy tokens: over 20 rows, bfloat16 rounding flips a near-tie somewhere
@pytest.mark.parametrize("dtype,batch", [(torch.float32, 1), (torch.float32, 3), (torch.float32, 20),
                                         (torch.bfloat16, 1), (torch.bfloat16, 3)])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_equals_torch_code(k, calls, dtype, batch, shape):
    """Every layer kind (plain and hybrid Mamba layers, shared blocks with their adapters) over steps that cross
    chunk boundaries: logits and every cached state stay equal to the torch code's. Batches over 1 are
    left-padded, so attention must skip the padding slots; over 16 rows float32 projections run linear_rows."""
    model = random_model(use_conv_bias=True, **SHAPES[shape]).to(dtype)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 11))
    mask = torch.ones_like(prompt)
    mask[1:, :3] = 0
    fast, fast_cache = decode(model, prompt, 20, mask)
    expected = {"decoder": 20}  # every decode step ran compiled; a padded prompt runs the torch code
    if batch == 1:
        expected["mamba_prefill"] = model.config.num_hidden_layers
    assert calls == expected
    with torch_code():
        ref, ref_cache = decode(model, prompt, 20, mask)
    assert calls == expected  # and the reference ran none
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(fast, ref, **tol)
    for a, b in zip(fast_cache.ssm + fast_cache.conv, ref_cache.ssm + ref_cache.conv):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    for i in fast_cache.keys:
        torch.testing.assert_close(fast_cache.keys[i], ref_cache.keys[i], **tol)


def test_decode_of_quantized_and_lora_models_equals_torch_code(k, calls):
    """int8 and int4 projections are read by the compiled decoder (inputs and outputs rounded to bfloat16 as torch's int8
    kernel does); LoRA projections keep their modules, with the compiled mixer step between them."""
    from zamba2.train.lora import LoRA

    lora = random_model()
    LoRA(rank=2, base_dtype="float32").apply(lora)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    int8 = zamba2.quantize_int8(random_model(hidden_size=64, intermediate_size=128))
    int4 = zamba2.quantize_int4(random_model(hidden_size=64, intermediate_size=128), group_size=32)
    assert not any(plain(layer.mamba.in_proj) for layer in lora.layers)
    assert all(plain(layer.mamba.in_proj) for layer in int8.layers + int4.layers)
    layers = lora.config.num_hidden_layers
    # int8 and int4 outputs are bfloat16, where sums in another order flip ulps; the compiled int4 GEMV also rounds
    # its inputs to int8 per group (tests/infer/test_quant.py checks it exactly against that reference)
    for model, tol, expected in ((lora, 1e-4, {"mamba_step": 12 * layers, "mamba_prefill": layers}),
                                 (int8, 1e-2, {"decoder": 12, "mamba_prefill": layers}),
                                 (int4, 5e-2, {"decoder": 12, "mamba_prefill": layers})):
        calls.clear()
        prompt = torch.randint(0, model.config.vocab_size, (2, 9))
        fast, _ = decode(model, prompt, 12)
        assert calls == expected
        with torch_code():
            ref, _ = decode(model, prompt, 12)
        torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pieces", [[1], [5, 3], [8], [21], [8, 1, 30]])
def test_prefill_equals_torch_code(k, calls, dtype, pieces):
    """The compiled mixer over prompt pieces (chunk 8: below, at and above it, one token, continuations on a warm
    cache, batch 2, two groups, conv bias) against the torch code: logits of every position and every state."""
    model = random_model(use_conv_bias=True).to(dtype)
    prompt = torch.randint(0, model.config.vocab_size, (2, sum(pieces)))

    def run():
        cache = model.new_cache(2, capacity=prompt.shape[1])
        with torch.inference_mode():
            logits = prefill(model, prompt, cache, logits_to_keep=0, pieces=pieces)
            plain = model(prompt)  # no cache: the states start at zero and are dropped
        return logits.float(), plain.float(), cache

    fast, fast_plain, fast_cache = run()
    ones = pieces.count(1)  # one token through forward: each mixer's compiled step (the whole step is decode_step's)
    assert calls["mamba_prefill"] == model.config.num_hidden_layers * (len(pieces) - ones + 1)
    assert calls["mamba_step"] == model.config.num_hidden_layers * ones and not calls["decoder"]
    with torch_code():
        ref, ref_plain, ref_cache = run()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(fast_plain, ref_plain, **tol)
    for a, b in zip(fast_cache.ssm + fast_cache.conv, ref_cache.ssm + ref_cache.conv):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def prefill(model, prompt, cache, logits_to_keep, pieces):
    out, s = [], 0
    for n in pieces:
        out.append(model(prompt[:, s:s + n], cache=cache, logits_to_keep=logits_to_keep))
        s += n
    return torch.cat(out, 1)


def test_decoder_follows_changes_to_the_model(k, calls):
    """A model changed after its first decode steps (a parameter replaced, the dtype changed through .data,
    quantized, weights copied in place) goes on decoding as the torch code does on the changed model."""
    model = random_model()
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))

    def replace_parameter(m):
        w = m.layers[1].mamba.in_proj.weight
        m.layers[1].mamba.in_proj.weight = torch.nn.Parameter(torch.randn_like(w) * w.std())

    def copy_in_place(m):
        with torch.no_grad():
            m.shared_blocks[0].self_attn.q_proj.weight.mul_(2)

    changes = [replace_parameter, lambda m: m.to(torch.bfloat16), copy_in_place, zamba2.quantize_int8]
    for change in changes:
        decode(model, prompt, 2)  # builds (or checks) the decoder of the model as it is
        change(model)
        calls.clear()
        fast, _ = decode(model, prompt, 6)
        assert calls["decoder"] == 6
        with torch_code():
            ref, _ = decode(model, prompt, 6)
        torch.testing.assert_close(fast, ref, rtol=0.02, atol=0.02)


def test_other_dtypes_decode_in_torch(k, calls):
    """float16 has no kernels: decoding it takes the torch code, with the same result as with kernels off."""
    model = random_model().half()
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))
    fast, _ = decode(model, prompt, 4)
    assert not calls
    with torch_code():
        ref, _ = decode(model, prompt, 4)
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)


def test_training_never_uses_the_kernels(k):
    """The kernels have no backward: with autograd tracking a tensor, get() declines."""
    w = torch.randn(4, 4, requires_grad=True)
    assert kernels.get(w) is None
    with torch.no_grad():
        assert kernels.get(w) is k
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast too: the kernels compute in the tensors' dtypes
            assert kernels.get(w) is None


def test_env_switch_turns_the_kernels_off():
    env = dict(os.environ, ZAMBA2_CPU_KERNELS="0")
    code = "import zamba2.ops.kernels as k; assert k.get() is None"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_lock_left_by_a_killed_build_does_not_hang_the_next_load(k):
    """torch's build lock is a file, which a build killed midway leaves behind; the next process clears it
    instead of waiting on it forever."""
    stale = Path(k.__file__).parent / "lock"
    stale.touch()
    try:
        code = "import zamba2.ops.kernels as k; assert k.get() is not None"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


@pytest.mark.parametrize("capability,vnni,isa", [("AVX512", True, "AVX512_VNNI"), ("AVX512", False, "AVX512"),
                                                  ("AVX2", True, "AVX2"), ("DEFAULT", False, "DEFAULT")])
def test_instruction_set_adds_vnni_to_avx512_only(monkeypatch, capability, vnni, isa):
    """The build each CPU gets (the VNNI build's int4 dot products are checked on CPUs that have it, the other
    form by the AVX2 build, test_kernels_built_for_a_narrower_instruction_set_equal_torch)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni)
    assert kernels.instruction_set() == isa
    assert (isa in kernels.ISA_FLAGS) == (isa != "DEFAULT")


def test_build_is_named_by_what_the_binary_depends_on(tmp_path):
    a, b = tmp_path / "a.cpp", tmp_path / "b.h"
    a.write_text("int f();")
    b.write_text("#pragma once")
    name = kernels.build_name("AVX2", [a, b])
    assert name.startswith("zamba2_cpu_avx2_") and kernels.build_name("AVX2", [a, b]) == name
    assert kernels.build_name("AVX512", [a, b]) != name
    b.write_text("#pragma once // changed")  # a header change rebuilds (torch's own check reads only the .cpp)
    assert kernels.build_name("AVX2", [a, b]) != name
    (tmp_path / "copy").mkdir()  # another checkout of the same sources: its own build (torch's names the paths)
    a2, b2 = tmp_path / "copy" / "a.cpp", tmp_path / "copy" / "b.h"
    a2.write_text(a.read_text())
    b2.write_text(b.read_text())
    assert kernels.build_name("AVX2", [a2, b2]) != kernels.build_name("AVX2", [a, b])
    assert "-mavx512f" in kernels.ISA_FLAGS["AVX512"] and not any("512" in f for f in kernels.ISA_FLAGS["AVX2"])


@pytest.mark.parametrize("isa", ["avx2"])
def test_kernels_built_for_a_narrower_instruction_set_equal_torch(k, isa):
    """This file again, in a process where torch reads the CPU as `isa` (ATEN_CPU_CAPABILITY): the kernels are
    built for that instruction set and pass the same comparisons. An AVX-512 machine imitates an AVX2 one this
    way; the reverse is impossible, so an AVX2 machine skips it (its own run above is the AVX2 check)."""
    if torch.backends.cpu.get_cpu_capability().lower() == isa:
        pytest.skip(f"this CPU is {isa}: the run above covers it")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "not narrower"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

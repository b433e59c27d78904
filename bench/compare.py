"""zamba2 against transformers' Zamba2ForCausalLM (or ZambaForCausalLM) on this machine, on the same random weights,
in one run.

    python bench/compare.py [--arch zamba2 | zamba] --preset small [--dtype bfloat16] [--int8 | --int4 [--group-size 64]] [--long 32768]
                            [--threads 2] [--skip-hf] [--decode-only] [--no-kernels] [--json out.json]

Measures prefill tokens/s (batch 1 at 128, 512, 2048 tokens; ours as generate and the server prefill, in
pieces of zamba2.infer.step.PREFILL_CHUNK tokens), greedy decode tokens/s (64 new tokens after a 128-token
prompt, at batch 1 and 8; the prefill is excluded by timing from the first generated token to the last)
and the peak resident memory each phase adds. It also measures this machine's matmul rate and memory
bandwidth before the first phase and after every phase, and reports each phase as a fraction of the higher
of the two measured around it (a shared VM's rates drift by tens of percent within a run); and checks that
both implementations produce the same last-token logits and greedy tokens.

--int8 / --int4 run our model with int8 / int4 weight-only matmuls (zamba2.quantize_int8 / quantize_int4)
against transformers in the given dtype; its greedy tokens then differ where quantization flips near-ties.
Its weight bytes per parameter are then the stored ones: 1 for int8 (the per-row scales are negligible),
0.5 + 4 / group size for int4 (the packed nibbles and a bfloat16 scale and offset per group).
--decode-only skips the prefill phases. --long N also prefills an
N-token prompt through zamba2.generate (in pieces) and reports the memory it adds beyond its KV cache and
states.

Only one model is in memory at a time: ours runs first, is saved in the Hugging Face layout, freed, and
transformers loads the saved copy (a 1.2B model is ~5 GB in float32; Zamba1's 7b-shape ~30 GB, ~15 GB in bfloat16).

--arch zamba runs Zamba1 (presets tiny, small, 7b-shape: Zyphra/Zamba-7B-v1's sizes) against transformers'
ZambaForCausalLM. Its decode has no compiled CPU step yet: it runs the model's forward.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

import zamba2
from zamba2.model import config as zamba2_config, zamba1_config
from zamba2.ops import kernels
from zamba2.infer.step import prefill as prefill_in_pieces

# --arch -> (its presets offered here, our model class, transformers' class)
ARCHS = {
    "zamba2": ({k: zamba2_config.PRESETS[k] for k in ("tiny", "small", "1.2b")}, zamba2.Zamba2LM, "Zamba2ForCausalLM"),
    "zamba": (zamba1_config.PRESETS, zamba2.Zamba1LM, "ZambaForCausalLM"),
}
PREFILL_LENGTHS = (128, 512, 2048)
PROMPT, NEW_TOKENS, BATCH = 128, 64, 8
REPS, BUDGET_S = 3, 30.0  # median of up to REPS timed runs, fewer when one run takes longer than BUDGET_S


# ---- machine ----

def cpu_summary() -> str:
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.processor())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({' '.join(simd) or 'no AVX2'})"


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds used by every process on the machine, CPU seconds used by this one)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.time(), (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), ru.ru_utime + ru.ru_stime


def other_cores(start: tuple[float, float, float]) -> float:
    """Cores other processes kept busy since `start`. On a small shared machine they make torch's threads wait
    on each other at every op, and timings can drop tenfold."""
    end = cpu_seconds()
    return ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0])


def best_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # a ceiling is measured by its best run


def machine_limits(dtype: torch.dtype) -> dict:
    """Matmul FLOP/s (2048^3) in float32 and the model dtype; GEMV rates over 1 GiB of weights, W @ x, which
    is what batch-1 decode does; and the memory read bandwidth, the fastest of three ways to read that 1 GiB
    (torch's GEMV, zamba2's GEMV kernel, a torch sum): on the 2-core AVX2 machine MKL's GEMV reads ~25 GB/s
    where a 2-thread read reaches ~35, so MKL's rate alone would flatter anything that beats it. The
    bandwidth limit is that read rate; the bfloat16 GEMV is reported beside it, as torch's can be slower than
    the memory allows on CPUs without native bf16.

    Matmuls use nn.Linear's layout, x @ W.T: on an AVX2 CPU torch's bfloat16 a @ b (both row-major) runs ~25x
    slower than x @ W.T, so a plain a @ b would understate what the model's layers can reach."""
    limits = {}
    for dt in dict.fromkeys([torch.float32, dtype]):  # float32, then the model dtype if it differs
        n = 2048
        x, w = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        limits[f"matmul_{dt_name(dt)}"] = 2 * n**3 / best_seconds(lambda: F.linear(x, w), 3)
        cols = 16384
        w = torch.ones(2**30 // (cols * dt.itemsize), cols, dtype=dt)  # 1 GiB, pages touched
        x = torch.ones(cols, dtype=dt)
        limits[f"gemv_{dt_name(dt)}"] = w.numel() * dt.itemsize / best_seconds(lambda: w @ x, 5)
        if dt == torch.float32:
            reads = [limits["gemv_float32"], w.numel() * 4 / best_seconds(lambda: w.sum(), 5)]
            if (k := kernels.get()) is not None:
                limits["gemv_float32_zamba2"] = w.numel() * 4 / best_seconds(lambda: k.gemv(w, x[None]), 5)
                reads.append(limits["gemv_float32_zamba2"])
            limits["read"] = max(reads)
        del w
    return limits


def print_limits(title: str, limits: dict) -> None:
    print(f"{title}: " + ", ".join(f"{k} {v / 1e9:.1f} {'GFLOP/s' if k.startswith('matmul') else 'GB/s'}"
                                   for k, v in limits.items()), flush=True)


def dt_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def effective_params(model: zamba2.Zamba2LM) -> int:
    """Weights every token multiplies by: all layers, the shared block once per hybrid visit, and the LM head
    (the embedding lookup reads one row, so it does not count). 2x this is the FLOPs per token and, times the
    element size, the bytes one decode step reads."""
    c = model.config
    layers = sum(p.numel() for p in model.layers.parameters())
    shared = sum(p.numel() for layer in model.layers if layer.visit is not None
                 for p in model.shared_blocks[layer.block].parameters())
    return layers + shared + c.vocab_size * c.hidden_size


def prefill_flops(c: zamba2.Config, p_eff: int, t: int) -> int:
    """The FLOPs of a t-token prefill that keeps the last token's logits: every weight but the LM head once per
    token, the LM head once, causal attention at each hybrid visit (QK^T and AV over t(t+1)/2 pairs), and the
    selective scan in its recurrent form (4 h p n per token and layer: state update and read-out)."""
    head = c.vocab_size * c.hidden_size
    visits = len(c.hybrid_layer_ids)
    attention = visits * 2 * 2 * c.num_attention_heads * c.attention_head_dim * t * (t + 1) // 2
    scan = c.num_hidden_layers * 4 * c.n_mamba_heads * c.mamba_headdim * c.mamba_d_state * t
    return 2 * (p_eff - head) * t + 2 * head + attention + scan


# ---- memory ----

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


class PeakRSS:
    """Peak resident memory a block adds above the level at its start.

    Resets the kernel's high-water mark (VmHWM) through /proc/self/clear_refs where that is allowed, else
    samples VmRSS from a thread every millisecond. Freed heap is returned to the OS first (malloc_trim), so
    that memory a previous phase freed but glibc kept does not hide this phase's growth.
    """

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except AttributeError:  # not glibc
            pass
        self.base = self.peak = _status_bytes("VmRSS")
        self.stop = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.stop = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, _status_bytes("VmRSS"))

    def __exit__(self, *exc):
        if self.stop is None:
            self.peak = _status_bytes("VmHWM")
        else:
            self.stop.set()
            self.sampler.join()
        self.extra = self.peak - self.base


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return int(next(ln for ln in f if ln.startswith("MemAvailable:")).split()[1]) * 1024


# ---- timing ----

def measure(fn) -> tuple[float, object]:
    """fn() -> (seconds, output). Median seconds over up to REPS runs after a warm-up run; a run slower than
    BUDGET_S is not repeated and the warm-up is the measurement (1.2B prefill at 2048 tokens takes a minute)."""
    t0 = time.perf_counter()
    secs, out = fn()
    if time.perf_counter() - t0 > BUDGET_S:
        return secs, out
    samples, start = [], time.perf_counter()
    while len(samples) < REPS and (not samples or time.perf_counter() - start < BUDGET_S):
        secs, out = fn()
        samples.append(secs)
    return statistics.median(samples), out


def timed(call):
    def fn(*args):
        t0 = time.perf_counter()
        out = call(*args)
        return time.perf_counter() - t0, out
    return fn


# ---- the two implementations: prefill(ids) -> (s, last logits), decode(ids) -> (s, new tokens) ----

def ours(model: zamba2.Zamba2LM):
    # the prefill generate and the server run: the prompt in pieces of PREFILL_CHUNK tokens through the cache
    prefill = timed(lambda ids: prefill_in_pieces(model, ids, model.new_cache(ids.shape[0]))[:, -1])

    def decode(ids):
        stamps, tokens = [], []
        for tok in zamba2.stream(model, ids, NEW_TOKENS):  # greedy, no EOS
            stamps.append(time.perf_counter())  # stamp 0 comes right after the prefill
            tokens.append(tok)
        return stamps[-1] - stamps[0], torch.stack(tokens, 1)

    return prefill, decode


def theirs(hf):
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per forward, before the greedy pick: the same points as ours
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    prefill = timed(lambda ids: hf(ids, use_cache=True, logits_to_keep=1).logits[:, -1])

    def decode(ids):
        stamp = Stamp()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
        return stamp.stamps[-1] - stamp.stamps[0], out[:, ids.shape[1]:]

    return prefill, decode


def run_phases(prefill, decode, prompts: dict, decode_prompts: dict, limits, before: dict) -> dict:
    """Every phase of one implementation: tokens/s, peak extra RSS, outputs, and the machine limits (the higher
    of those measured by `limits()` before and after the phase; `before` is the first phase's). A prefill whose
    memory, extrapolated linearly from the previous length, would not fit in MemAvailable is skipped, not run."""
    res, prev = {}, None
    for t, ids in prompts.items():
        name = f"prefill {t}"
        if prev is not None:
            est = prev[1] * t / prev[0]
            if est > 0.9 * mem_available():
                res[name] = {"skipped_est_bytes": est}
                print(f"  {name}: skipped (est. {est / 1e9:.1f} GB)", flush=True)
                continue
        with PeakRSS() as mem:
            secs, logits = measure(lambda: prefill(ids))
        res[name] = {"tok_s": t / secs, "peak_extra_bytes": mem.extra, "tokens_per_pass": t, "logits": logits}
        res[name]["limits"], before = around(before, limits())
        prev = (t, mem.extra)
        print(f"  {name}: {t / secs:.1f} tok/s", flush=True)
    for name, ids in decode_prompts.items():
        with PeakRSS() as mem:
            secs, tokens = measure(lambda: decode(ids))
        b = ids.shape[0]
        res[name] = {"tok_s": b * (NEW_TOKENS - 1) / secs, "peak_extra_bytes": mem.extra, "tokens_per_pass": b,
                     "tokens": tokens}
        res[name]["limits"], before = around(before, limits())
        print(f"  {name}: {res[name]['tok_s']:.1f} tok/s", flush=True)
    return res


def around(before: dict, after: dict) -> tuple[dict, dict]:
    """(the limits a phase is compared with: the higher of before and after, the next phase's `before`)"""
    return {k: max(v, after[k]) for k, v in before.items()}, after


def long_prompt(model: zamba2.Zamba2LM, n: int) -> dict:
    """Prefill n tokens as generate does (in pieces); the memory beyond KV cache + states is working memory."""
    c = model.config
    ids = torch.randint(3, c.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        zamba2.generate(model, ids, 1)
        secs = time.perf_counter() - t0
    cache = model.new_cache(1, capacity=n + 1)
    kv = sum(t.numel() * t.element_size() for t in [*cache.keys.values(), *cache.values.values()])
    state = sum(t.numel() * t.element_size() for t in cache.conv + cache.ssm)
    row = {"tok_s": n / secs, "peak_extra_bytes": mem.extra, "tokens_per_pass": n, "kv_bytes": kv,
           "state_bytes": state}
    print(f"  long prompt {n}: {n / secs:.1f} tok/s; adds {mem.extra / 1e6:.0f} MB = KV cache {kv / 1e6:.0f} MB"
          f" + states {state / 1e6:.1f} MB + {(mem.extra - kv - state) / 1e6:.0f} MB working memory", flush=True)
    return row


# ---- report ----

def fmt(row: dict | None, key: str, scale: float = 1.0, spec: str = ".1f") -> str:
    if row is not None and "skipped_est_bytes" in row and key == "tok_s":
        return f"skipped (est. {row['skipped_est_bytes'] / 1e9:.1f} GB)"
    return format(row[key] * scale, spec) if row is not None and key in row else "-"


def ratio(a: dict | None, b: dict | None, key: str) -> str:
    ok = a and b and key in a and key in b and b[key] > 0
    return f"{a[key] / b[key]:.2f}x" if ok else "-"


def print_tables(results: dict, p_eff: int, flops_per_pass, elems: dict, limits: dict, dtype: torch.dtype) -> None:
    z, h = results["zamba2"], results.get("transformers", {})
    print(f"\n{'phase':<14}{'zamba2 tok/s':>24}{'hf tok/s':>24}{'z/hf':>8}{'zamba2 +MB':>12}{'hf +MB':>8}{'z/hf':>7}")
    for name in z:
        a, b = z[name], h.get(name)
        print(f"{name:<14}{fmt(a, 'tok_s'):>24}{fmt(b, 'tok_s'):>24}{ratio(a, b, 'tok_s'):>8}"
              f"{fmt(a, 'peak_extra_bytes', 1e-6, '.0f'):>12}{fmt(b, 'peak_extra_bytes', 1e-6, '.0f'):>8}"
              f"{ratio(a, b, 'peak_extra_bytes'):>7}")
    print("(+MB: peak resident memory the phase adds above the loaded model)")

    print(f"\nfraction of machine limits, each phase against the limits measured around it:\n"
          f"  FLOP/s: decode = tok/s x 2 x {p_eff / 1e6:.1f}M effective params; prefill = prefill_flops() / s (the LM "
          f"head once, attention and scan included);\n    vs the faster matmul (float32 or the model dtype)\n"
          f"  weight bytes/s = passes/s x {p_eff / 1e6:.1f}M x {elems['zamba2']} B (zamba2), x "
          f"{elems['transformers']} B (transformers); one pass per prefill or decode step; vs the memory read rate")
    print(f"{'phase':<14}{'zamba2 %FLOP':>14}{'zamba2 %BW':>12}{'hf %FLOP':>12}{'hf %BW':>10}{'limits GFLOP/s, GB/s':>24}")
    # either side may compute a bfloat16 model's matmuls in float32 (ours does for prefill on CPUs without bf16
    # instructions), so the FLOP ceiling is the faster of the two matmul rates
    ceiling = lambda lim: max(lim["matmul_float32"], lim[f"matmul_{dt_name(dtype)}"])  # noqa: E731
    for name in z:
        cells = []
        for row, elem in ((z[name], elems["zamba2"]), (h.get(name), elems["transformers"])):
            if row is None or "tok_s" not in row:
                cells += ["-", "-"]
                continue
            lim = row.get("limits", limits)
            passes = row["tok_s"] / row["tokens_per_pass"]
            done = (passes * flops_per_pass(row["tokens_per_pass"]) if name.startswith(("prefill", "long"))
                    else row["tok_s"] * 2 * p_eff)
            cells += [f"{100 * done / ceiling(lim):.3g}%", f"{100 * passes * p_eff * elem / lim['read']:.3g}%"]
        lim = z[name].get("limits", limits)
        rates = f"{ceiling(lim) / 1e9:.0f}, {lim['read'] / 1e9:.1f}"
        print(f"{name:<14}{cells[0]:>14}{cells[1]:>12}{cells[2]:>12}{cells[3]:>10}{rates:>24}")
    print("(limits: zamba2's; transformers' phases have their own)")


def agreement(z: dict, h: dict) -> dict:
    out = {"logits_rel_err": {}}
    for name in z:  # the prefills past one chunk check that state is carried between chunks
        if "logits" in z[name] and "logits" in h.get(name, {}):
            a, b = z[name]["logits"].float(), h[name]["logits"].float()
            out["logits_rel_err"][name] = ((a - b).abs().max() / b.abs().max()).item()
    print("\nlast-token logits, max rel err: "
          + ", ".join(f"{k} {v:.2e}" for k, v in out["logits_rel_err"].items()))
    for name in ("decode b=1", f"decode b={BATCH}"):
        x, y = z[name]["tokens"], h[name]["tokens"]
        same = x == y
        # after a row's first mismatch its tokens follow a different history, so that index is what counts
        first = [int((~r).nonzero()[0]) if not r.all() else None for r in same]
        out[name] = {"match": int(same.sum()), "total": same.numel(), "first_mismatch": first}
        verdict = "AGREE" if bool(same.all()) else "DISAGREE"
        print(f"greedy tokens, {name}: {verdict} ({out[name]['match']}/{same.numel()} equal"
              + ("" if bool(same.all()) else f"; first mismatch per row: {first}") + ")")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="zamba2", choices=list(ARCHS), help="Zamba2 (default) or Zamba1 ('zamba')")
    ap.add_argument("--preset", required=True, help="model shape (random weights): tiny, small, 1.2b (zamba2); "
                                                    "tiny, small, 7b-shape (zamba)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight and activation dtype")
    quant = ap.add_mutually_exclusive_group()
    quant.add_argument("--int8", action="store_true", help="our model with int8 weight-only matmuls")
    quant.add_argument("--int4", action="store_true", help="our model with int4 weight-only matmuls")
    ap.add_argument("--group-size", type=int, default=64, help="int4 weights per scale (default 64)")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill phases")
    ap.add_argument("--long", type=int, default=0, help="also prefill a prompt of this many tokens (memory check)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--skip-hf", action="store_true", help="measure zamba2 only")
    ap.add_argument("--no-kernels", action="store_true",
                    help="zamba2 without its compiled CPU kernels (the torch code they replace)")
    ap.add_argument("--json", help="also write every number to this file")
    args = ap.parse_args()
    presets, model_class, hf_class = ARCHS[args.arch]
    if args.preset not in presets:
        ap.error(f"--arch {args.arch} has presets {', '.join(presets)}, not {args.preset!r}")
    dtype = getattr(torch, args.dtype)
    kernels.ENABLED = not args.no_kernels
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_summary()} | {len(os.sched_getaffinity(0))} cores available, "
          f"{torch.get_num_threads()} torch threads | torch {torch.__version__} | dtype {args.dtype}")
    start = cpu_seconds()
    limits = machine_limits(dtype)
    print_limits("machine limits", limits)

    torch.manual_seed(0)
    cfg = presets[args.preset]()
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.long + 1)
    model = model_class(cfg).to(dtype).eval()
    cfg, p_eff, elem = model.config, effective_params(model), dtype.itemsize
    elems = {"zamba2": elem, "transformers": elem}
    print(f"{args.arch} preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{p_eff / 1e6:.1f}M effective per token (shared block counted per use)")
    g = torch.Generator().manual_seed(0)
    prompts = {t: torch.randint(3, cfg.vocab_size, (1, t), generator=g) for t in PREFILL_LENGTHS}
    decode_prompts = {"decode b=1": prompts[PROMPT],
                      f"decode b={BATCH}": torch.randint(3, cfg.vocab_size, (BATCH, PROMPT), generator=g)}

    results = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        if not args.skip_hf:
            zamba2.save(model, tmp)
        quant = "int8" if args.int8 else f"int4 (groups of {args.group_size})" if args.int4 else ""
        if args.int8:
            zamba2.quantize_int8(model)
            elems["zamba2"] = 1  # the matmul weights; the float embedding is read one row per token
        if args.int4:
            zamba2.quantize_int4(model, args.group_size)
            elems["zamba2"] = 0.5 + 4 / args.group_size  # nibbles, and a bfloat16 scale and offset per group
        print(f"zamba2 {quant}:", flush=True)
        prefills = {} if args.decode_only else prompts
        results["zamba2"] = run_phases(*ours(model), prefills, decode_prompts, lambda: machine_limits(dtype), limits)
        if args.long:
            results["zamba2"][f"long prompt {args.long}"] = long_prompt(model, args.long)
        del model
        if not args.skip_hf:
            import transformers
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            hf = getattr(transformers, hf_class).from_pretrained(tmp, dtype=dtype).eval()
            hf.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
            hf(prompts[PREFILL_LENGTHS[0]][:, :8])  # its first forward pages the weights in: no phase's memory
            print(f"transformers {transformers.__version__}:", flush=True)
            results["transformers"] = run_phases(*theirs(hf), prefills, decode_prompts, lambda: machine_limits(dtype),
                                             machine_limits(dtype))

    # the phases have their own limits (run_phases); the run's, start and end, are for --long and the record
    end_limits = machine_limits(dtype)
    print_limits("machine limits at the end", end_limits)
    limits = {k: max(v, end_limits.get(k, 0.0)) for k, v in limits.items()}
    print_tables(results, p_eff, lambda t: prefill_flops(cfg, p_eff, t), elems, limits, dtype)
    other = other_cores(start)
    print(f"other processes used {other:.2f} cores on average during this run"
          + (": the timings are not reliable" if other > 0.1 else ""))
    agree = agreement(results["zamba2"], results["transformers"]) if not args.skip_hf else None
    if args.json:
        for phases in results.values():  # generated tokens are kept, logits are not
            for row in phases.values():
                row.pop("logits", None)
                if "tokens" in row:
                    row["tokens"] = row["tokens"].tolist()
        meta = {"cpu": cpu_summary(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "dtype": args.dtype, "arch": args.arch, "preset": args.preset, "effective_params": p_eff, "other_cores": other}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "limits": limits, "results": results, "agreement": agree}, f, indent=2)


if __name__ == "__main__":
    main()

"""Command line: `zamba2 <command>` (or `python -m zamba2`). Each command parses flags and calls one function."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def utf8_text(s: str) -> str:
    """An argparse type for text flags: bytes that are not UTF-8 reach Python as lone surrogates
    (surrogateescape), which no tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text (byte 0x{ord(s[e.start]) - 0xDC00:02x} at "
                                         f"character {e.start})") from None
    return s


def cmd_generate(args) -> None:
    from .infer.generate import stream_text
    from .infer.load import load_for_inference

    model, tok = load_for_inference(args.model, args.dtype, args.device, args.int8, args.int4, args.revision)
    draft = load_draft(args)
    ids = tok.encode(args.prompt)
    eos = model.config.eos_token_ids if not args.ignore_eos else None
    for _, text in stream_text(model, tok, ids, args.max_new_tokens, eos, context=ids, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, draft=draft,
                               num_speculative=args.num_speculative):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args) -> None:
    from .hub import resolve
    from .infer.chat import ChatSession, chat, terminal_lines
    from .infer.load import load_for_inference
    from .text.chat import chat_template

    folder = resolve(args.model, args.revision)
    model, tok = load_for_inference(folder, args.dtype, args.device, args.int8, args.int4)
    session = ChatSession(model, tok, chat_template(folder, tok), args.system, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed, args.max_context, load_draft(args),
                          args.num_speculative)
    interactive = sys.stdin.isatty()
    chat(session, terminal_lines() if interactive else sys.stdin, sys.stdout, interactive)


def load_draft(args):
    """The drafter --draft / --prompt-lookup name: a loaded model, "prompt-lookup" or None."""
    from .infer.load import load_for_inference

    if args.draft_int8 and not args.draft:
        raise UserError("--draft-int8 goes with --draft MODEL")
    if args.num_speculative is not None and not (args.draft or args.prompt_lookup):
        raise UserError("--num-speculative goes with --draft MODEL or --prompt-lookup")
    if args.draft:
        return load_for_inference(args.draft, args.dtype, args.device, args.draft_int8)[0]
    return "prompt-lookup" if args.prompt_lookup else None


def cmd_quantize(args) -> None:
    import torch

    from .infer.quant import quantize_checkpoint

    quantize_checkpoint(args.model, args.out, args.bits, args.group_size, getattr(torch, args.dtype), args.revision)
    print(f"int{args.bits} weights" + (f" (groups of {args.group_size})" if args.bits == 4 else "") + f" -> {args.out}")


def cmd_prepare(args) -> None:
    from .text.read import read_documents
    from .train.data import prepare
    from .text.tokenizer import named_tokenizer

    tok = named_tokenizer(args.tokenizer)
    stats: dict = {}
    meta = prepare(read_documents(args.inputs, args.text_key, stats), args.out, tok, args.shard_tokens, stats)
    print(f"{meta['docs']:,} documents, {meta['tokens']:,} tokens in {len(meta['shards'])} shard(s) -> {args.out}"
          + (f"; skipped {meta['bad_lines']} malformed JSONL lines" if meta["bad_lines"] else ""))


def cmd_train(args) -> None:
    from .train import parallel
    from .train.trainer import Trainer, TrainConfig, start_folder

    flags = dict(data=args.data, out=args.out, model=args.model, steps=args.steps)
    cfg = TrainConfig.from_toml(args.config, **flags) if args.config else TrainConfig.from_dict(
        {k: v for k, v in flags.items() if v is not None})
    if args.revision:  # a Hub repo id at a revision: the run starts from its downloaded folder
        cfg.model = str(start_folder(cfg.model, args.revision))
    try:
        Trainer(cfg, resume=args.resume).run()
    finally:
        parallel.cleanup()


def finetune_config(args):
    """TrainConfig + LoRA (or None) from the `finetune` flags."""
    from .train.lora import LoRA
    from .train.trainer import TrainConfig, start_folder

    lora = None
    if args.lora_rank:
        lora = LoRA(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank, shared=args.lora_shared,
                    base_dtype=args.lora_base_dtype, seed=args.seed,
                    **({"targets": args.lora_targets} if args.lora_targets else {}))
    lr = args.lr if args.lr is not None else (2e-4 if lora else 2e-5)  # adapters start at zero: they take a larger lr
    model = str(start_folder(args.model, args.revision)) if args.revision else args.model
    cfg = TrainConfig(data=args.data, out=args.out, model=model, seq_len=args.seq_len,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, lr=lr,
                      warmup_steps=args.warmup_steps, weight_decay=0.0, dtype=args.dtype, device=args.device,
                      val_fraction=args.val_fraction, eval_every=args.eval_every, eval_batches=args.eval_batches,
                      save_every=args.save_every, log_every=args.log_every, seed=args.seed)
    return cfg, lora


def cmd_dpo(args) -> None:
    from .train.dpo import dpo

    cfg, lora = finetune_config(args)
    stats = dpo(cfg, args.beta, lora, args.merge, args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(f"{stats['pairs']:,} pairs ({stats['dropped']} dropped as too long; skipped {stats['bad_lines']} "
              f"malformed lines, {stats['no_assistant']} without a final assistant turn) -> {stats['output']}")


def cmd_finetune(args) -> None:
    from .train.finetune import finetune

    cfg, lora = finetune_config(args)
    stats = finetune(cfg, lora, args.merge, args.resume, args.too_long)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(f"{stats['conversations']:,} conversations ({stats['truncated']} truncated, {stats['dropped']} "
              f"dropped as too long; skipped {stats['bad_lines']} malformed lines, {stats['no_assistant']} without "
              f"an assistant turn) -> {stats['output']}")


def cmd_demo(args) -> None:
    from .demo import demo

    demo(args.out, args.steps)


def cmd_serve(args) -> None:
    from .serve.app import serve
    from .serve.server import Limits

    limits = Limits(max_batch=args.max_batch, max_queue=args.max_queue, max_n=args.max_n,
                    max_body_bytes=args.max_body_bytes, prefix_cache_mb=args.prefix_cache_mb,
                    prefill_chunk=args.prefill_chunk)
    serve(args.model, args.host, args.port, args.dtype, args.device, args.served_model_name, limits, args.int8,
          args.int4, args.api_key or os.environ.get("ZAMBA2_API_KEY") or None, args.drain_timeout, args.revision,
          load_draft(args), args.num_speculative)


def cmd_eval_perplexity(args) -> None:
    from .eval.perplexity import perplexity
    from .infer.load import load_for_inference
    from .text.read import read_documents

    model, tok = load_for_inference(args.model, args.dtype, args.device, revision=args.revision)
    stats: dict = {}
    r = perplexity(model, tok, read_documents(args.data, args.text_key, stats), args.window, args.stride)
    print(f"perplexity {r['perplexity']:.3f} ({r['nll_per_token']:.4f} nats/token) over {r['tokens']:,} tokens in "
          f"{r['documents']:,} documents; window {r['window']}, stride {r['stride']}"
          + (f"; skipped {stats['bad_lines']} malformed JSONL lines" if stats["bad_lines"] else ""))


def cmd_eval_lm_eval(args) -> None:
    import json

    from lm_eval.utils import make_table

    from .eval.harness import evaluate

    results = evaluate(args.model, args.tasks.split(","), args.include_path, args.num_fewshot, args.limit,
                       args.batch_size, args.dtype, args.device, args.max_length, args.revision)
    print(make_table(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results["results"], f, indent=2, default=str)


def cmd_data(args) -> None:
    from .pipeline import PipelineConfig, run

    if args.data_command == "run":
        cfg = PipelineConfig.from_toml(args.pipeline, executor=args.executor, workers=args.workers)
    else:  # one stage on its own, over the sources given on the command line
        options = None  # the stage's own table; each stage's subcommand has only its own flags
        if args.data_command == "dedup":
            options = dict(preset=args.preset, mode=args.mode, verify=args.verify, exact=not args.no_exact,
                           near=not args.no_near)
        elif args.data_command == "classify":
            options = dict(model=args.model, keep_labels=args.keep_labels or [], min_score=args.min_score)
        elif args.data_command == "tokenize":
            options = dict(tokenizer=args.tokenizer)
        cfg = PipelineConfig.one_stage(args.data_command, args.inputs, args.source, args.out, args.work,
                                       args.executor, args.workers, args.shard_docs, options)
    run(cfg)


def add_finetune_flags(f: argparse.ArgumentParser, out: str) -> None:
    """The `finetune` flags after model and data: output, training, LoRA."""
    f.add_argument("--out", default=out, help=f"output folder (default {out})")
    f.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    # training
    f.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    f.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (default 1024)")
    f.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5, or 2e-4 with LoRA)")
    f.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps (default 10)")
    f.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="bfloat16: mixed precision (float32 weights, bf16 matmuls); auto (default): bfloat16 where "
                        "the CPU has bf16 instructions or AMX, or on a bf16 GPU, else float32")
    f.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    f.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the data (default 0.05)")
    f.add_argument("--eval-every", type=int, default=50, help="validation every N steps (default 50)")
    f.add_argument("--eval-batches", type=int, default=4, help="validation batches (default 4)")
    f.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    f.add_argument("--log-every", type=int, default=10, help="metrics every N steps (default 10)")
    f.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    # LoRA
    f.add_argument("--lora-rank", type=int, default=0, help="train rank-R adapters instead of all weights (0 = off)")
    f.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha/R (default alpha = 2R)")
    f.add_argument("--lora-targets", nargs="+", default=None,
                   help="projections to adapt, from in_proj out_proj q_proj k_proj v_proj o_proj gate_up_proj "
                        "down_proj (default: all)")
    f.add_argument("--lora-shared", choices=("shared", "per-visit"), default="shared",
                   help="shared-block projections: one adapter on the shared weight, or one per hybrid visit")
    f.add_argument("--lora-base-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype the frozen base is held in (default bfloat16)")
    f.add_argument("--merge", action="store_true",
                   help="write OUT/merged, a plain checkpoint with the adapters folded in (else OUT/adapter)")


def add_model_flags(p: argparse.ArgumentParser, what: str = "checkpoint folder (config.json + safetensors)") -> None:
    """--model (a folder or a Hub repo id, zamba2/hub.py) and --revision."""
    p.add_argument("--model", required=True, help=f"{what}, or a Hugging Face Hub repo id such as "
                   "Zyphra/Zamba2-1.2B-instruct (downloaded once into the Hugging Face cache)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub --model (default main)")


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    """--int8 | --int4: weight-only quantization of a float checkpoint as it loads."""
    q = p.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true",
                   help="int8 weight-only matmuls on CPU: faster decode (bench/quant.py measures it), 1/4 of the "
                        "matmul weight memory")
    q.add_argument("--int4", action="store_true",
                   help="int4 weight-only matmuls on CPU (groups of 64): the fastest decode, about 1/7 of the matmul "
                        "weight memory, at some accuracy (bench/quant.py measures both)")


def add_speculative_flags(p: argparse.ArgumentParser, where: str = "") -> None:
    """--draft MODEL [--draft-int8] | --prompt-lookup, --num-speculative K: speculative decoding (batch 1; the same
    output as without it)."""
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", default=None, metavar="MODEL",
                      help="a smaller checkpoint with the same tokenizer proposes tokens the model checks in one "
                           "forward (e.g. Zamba2-1.2B for the 7B, or the model itself with --draft-int8)")
    spec.add_argument("--prompt-lookup", action="store_true",
                      help="propose the tokens that followed the last few tokens earlier in the prompt or output: "
                           "no second model; for output that repeats its input (summaries, edits, code)")
    p.add_argument("--draft-int8", action="store_true", help="the --draft model with int8 weight-only matmuls")
    p.add_argument("--num-speculative", type=int, default=None, metavar="K",
                   help="propose K tokens every step (default: adaptive, 0 to 4 by measured acceptance and speed)"
                        + where)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zamba2", description="Run, train and serve Zamba2 hybrid language models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming tokens as they come")
    add_model_flags(g)
    g.add_argument("--prompt", required=True, type=utf8_text, help="text to continue (BOS is added)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    # sampling
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    # runtime
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    add_quant_flags(g)
    add_speculative_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat in the terminal (or over piped stdin, a line per turn), the conversation's "
                       "cache carried from turn to turn")
    add_model_flags(c)
    c.add_argument("--system", default=None, type=utf8_text, help="system prompt (change it with /system TEXT)")
    c.add_argument("--max-new-tokens", type=int, default=512, help="longest reply in tokens (default 512)")
    c.add_argument("--max-context", type=int, default=None,
                   help="tokens the conversation may fill before /reset is needed (default: the model's context, "
                        "max_position_embeddings in its config.json)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    c.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    c.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    c.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    c.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    add_quant_flags(c)
    add_speculative_flags(c)
    c.set_defaults(func=cmd_chat)

    q = sub.add_parser("quantize", help="write a checkpoint with int8 or int4 weights, which every command loads as is")
    add_model_flags(q, "float checkpoint folder (config.json + safetensors)")
    q.add_argument("--out", required=True, help="folder to write (config.json records the format)")
    q.add_argument("--bits", type=int, choices=(8, 4), required=True, help="8: a scale per row; 4: per group")
    q.add_argument("--group-size", type=int, default=64, help="int4 weights per scale and offset (default 64)")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the weights kept in float (embedding, norms, SSM parameters; default float32)")
    q.set_defaults(func=cmd_quantize)

    d = sub.add_parser("demo", help="prepare a bundled corpus, train a small Zamba2 on CPU, evaluate and sample")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--steps", type=int, default=150,
                   help="training steps (default 150; the demo prints the time it took)")
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("prepare", help="tokenize .txt / .jsonl / .parquet files into token shards for training")
    pr.add_argument("inputs", nargs="+", help=".txt files (one document each), .jsonl (one per line) or .parquet "
                    "(one per row), optionally .gz / .zst")
    pr.add_argument("--out", required=True, help="output data folder")
    pr.add_argument("--tokenizer", default=None, help="tokenizer.json or tokenizer.model, or a checkpoint folder or "
                    "Hub repo id to take it from (default Mistral v0.1)")
    pr.add_argument("--text-key", default="text", help="JSONL field holding the text (default 'text')")
    pr.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    pr.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="pretrain / anneal / continue pretraining on prepared shards")
    t.add_argument("--config", default=None, help="run.toml with a [train] table (TrainConfig fields)")
    t.add_argument("--data", default=None, help="prepared data folder (overrides the config)")
    t.add_argument("--out", default=None, help="output folder (overrides the config)")
    t.add_argument("--model", default=None, help="preset name (Zamba1: zamba1-tiny, zamba1-small, ...), checkpoint "
                                                  "folder or Hugging Face Hub repo id (overrides the config)")
    t.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model (default main)")
    t.add_argument("--steps", type=int, default=None, help="phase-1 steps (overrides the config)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("finetune", help="chat SFT of a checkpoint (loss on assistant turns only), full or LoRA")
    add_model_flags(f, "checkpoint folder to start from")
    f.add_argument("--data", required=True, help='chat JSONL: {"messages": [{"role", "content"}, ...]} per line')
    f.add_argument("--too-long", choices=("truncate", "drop"), default="truncate",
                   help="conversations longer than --seq-len: cut at seq-len, or skip (default truncate)")
    add_finetune_flags(f, "runs/finetune")
    f.set_defaults(func=cmd_finetune)

    o = sub.add_parser("dpo", help="direct preference optimisation on chosen/rejected pairs, full or LoRA")
    add_model_flags(o, "checkpoint folder to start from (also the frozen reference)")
    o.add_argument("--data", required=True,
                   help='pairs JSONL: {"prompt", "chosen", "rejected"} per line (strings or chat messages)')
    o.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (default 0.1)")
    add_finetune_flags(o, "runs/dpo")
    o.set_defaults(func=cmd_dpo)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat) with continuous batching")
    add_model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--served-model-name", default=None,
                   help="the `model` name clients use (default: the Hub repo id, or the folder's name)")
    s.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    add_quant_flags(s)
    # batching limits
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting sequences before 503 (default 256)")
    s.add_argument("--max-n", type=int, default=16, help="largest n (choices per prompt) accepted (default 16)")
    s.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                   help="larger request bodies get 413 (default 8 MiB)")
    s.add_argument("--prefix-cache-mb", type=int, default=1024,
                   help="memory for snapshots of finished requests' states, restored exactly when a prompt starts "
                        "with their tokens (chat turns, shared system prompts); 0 turns it off (default 1024)")
    s.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per engine step while other sequences decode: smaller keeps their "
                        "inter-token latency low, larger prefills a long prompt faster (default 256)")
    add_speculative_flags(s, where="; the server speculates while one request runs alone, unless it asks for "
                          "logprobs, is sampled with a seed, or sends \"speculative\": false")
    # operating it
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health (default: $ZAMBA2_API_KEY; "
                        "set one before binding beyond loopback)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish before the exit (default 30)")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("eval", help="perplexity, or lm-evaluation-harness tasks on the model")
    esub = e.add_subparsers(dest="what", required=True)
    ep = esub.add_parser("perplexity", help="sliding-window token perplexity of .txt / .jsonl / .parquet documents")
    add_model_flags(ep, "checkpoint folder")
    ep.add_argument("--data", required=True, nargs="+",
                    help=".txt (one document each), .jsonl or .parquet files, optionally .gz / .zst")
    ep.add_argument("--text-key", default="text", help="JSONL field holding the text (default 'text')")
    ep.add_argument("--window", type=int, default=None, help="tokens per forward (default: the context length)")
    ep.add_argument("--stride", type=int, default=None, help="tokens a window advances (default window / 2)")
    ep.set_defaults(func=cmd_eval_perplexity)
    el = esub.add_parser("lm-eval", help="lm-evaluation-harness tasks with the `zamba2` model (offline tasks bundled)")
    add_model_flags(el, "checkpoint folder")
    el.add_argument("--tasks", required=True, help="comma-separated: zamba2_mc, zamba2_ppl, zamba2_qa or any lm-eval task")
    el.add_argument("--include-path", default=None, help="a folder of your own task YAMLs")
    el.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    el.add_argument("--limit", type=int, default=None, help="examples per task (for a quick check)")
    el.add_argument("--batch-size", type=int, default=8, help="loglikelihood rows per forward (default 8)")
    el.add_argument("--max-length", type=int, default=None, help="window for long inputs (default: the context length)")
    el.add_argument("--output", default=None, help="write the results as JSON here")
    el.set_defaults(func=cmd_eval_lm_eval)
    for q in (ep, el):
        q.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)")
        q.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")

    da = sub.add_parser("data", help="the Zyda-style data pipeline: filter, deduplicate, classify, tokenize")
    dsub = da.add_subparsers(dest="data_command", required=True)
    r = dsub.add_parser("run", help="run (or resume) the stages declared in a pipeline TOML")
    r.add_argument("pipeline", help="pipeline.toml (see zamba2/pipeline/config.py)")
    r.add_argument("--executor", choices=("serial", "processes", "ray"), default=None, help="overrides the file")
    r.add_argument("--workers", type=int, default=None, help="processes / Ray CPUs (overrides the file)")
    for name, text in (("filter", "normalize and apply the Zyda-1 heuristic filters; writes .jsonl.zst"),
                       ("dedup", "exact + MinHash-LSH fuzzy dedup across sources; writes .jsonl.zst"),
                       ("classify", "keep documents by a quality classifier's label or score; writes .jsonl.zst"),
                       ("tokenize", "tokenize into token shards for `zamba2 train`")):
        s_ = dsub.add_parser(name, help=text)
        s_.add_argument("inputs", nargs="*", help="input files or globs (.jsonl/.parquet/.txt, optionally .gz/.zst)")
        s_.add_argument("--source", action="append", metavar="NAME=GLOB",
                        help="a named source (repeatable; for dedup, best-ranked first)")
        s_.add_argument("--out", required=True, help="output folder")
        s_.add_argument("--work", default=None, help="work folder for shards and resume (default OUT.work)")
        s_.add_argument("--executor", choices=("serial", "processes", "ray"), default=None,
                        help="where tasks run (default serial)")
        s_.add_argument("--workers", type=int, default=None, help="processes / Ray CPUs (default all cores)")
        s_.add_argument("--shard-docs", type=int, default=50_000, help="documents per work shard (default 50000)")
        if name == "dedup":
            s_.add_argument("--preset", choices=("zyda1", "zyda2"), default="zyda1",
                            help="zyda1: word 13-grams, 32x4 bands; zyda2: char 25-grams, 8x16 bands")
            s_.add_argument("--mode", choices=("all", "cross-source-only"), default="all",
                            help="remove all duplicates, or only those across sources (Zyda-2)")
            s_.add_argument("--verify", action="store_true", help="check candidate pairs by exact Jaccard")
            s_.add_argument("--no-exact", action="store_true", help="skip the exact-hash pass")
            s_.add_argument("--no-near", action="store_true", help="skip the MinHash pass")
        if name == "classify":
            s_.add_argument("--model", required=True, help="a HashedLogistic .npz or module:factory")
            s_.add_argument("--keep-labels", nargs="+", default=None, help="labels to keep, e.g. High")
            s_.add_argument("--min-score", type=float, default=None, help="keep documents scoring at least this")
        if name == "tokenize":
            s_.add_argument("--tokenizer", default=None, help="tokenizer.json / .model, or a checkpoint folder or Hub "
                            "repo id to take it from (default Mistral v0.1)")
    da.set_defaults(func=cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileNotFoundError) as e:  # bad input: one line, not a traceback (bugs keep theirs)
        print(f"zamba2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

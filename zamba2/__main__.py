"""Command line: `zamba2 <command>` (or `python -m zamba2`). Each command parses flags and calls one function."""

from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16", "float16")


def cmd_generate(args) -> None:
    import torch

    from . import load, load_tokenizer, stream

    model = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    tok = load_tokenizer(args.model)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    ids = tok.encode(args.prompt)
    push = tok.stream_decoder()
    for i in ids:  # feed the prompt so the continuation decodes in context (leading spaces, split characters)
        push(i)
    eos = model.config.eos_token_ids if not args.ignore_eos else None
    for token in stream(model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, eos_token_id=eos, seed=args.seed):
        if eos and int(token[0]) in eos:
            break
        sys.stdout.write(push(int(token[0])))
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_prepare(args) -> None:
    from .data import prepare, read_documents
    from .tokenizer import Tokenizer, load_tokenizer

    tok = Tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer()
    stats: dict = {}
    meta = prepare(read_documents(args.inputs, args.text_key, stats), args.out, tok, args.shard_tokens, stats)
    print(f"{meta['docs']:,} documents, {meta['tokens']:,} tokens in {len(meta['shards'])} shard(s) -> {args.out}"
          + (f"; skipped {meta['bad_lines']} malformed JSONL lines" if meta["bad_lines"] else ""))


def cmd_train(args) -> None:
    from .train import Trainer, TrainConfig

    flags = dict(data=args.data, out=args.out, model=args.model, steps=args.steps)
    cfg = TrainConfig.from_toml(args.config, **flags) if args.config else TrainConfig.from_dict(
        {k: v for k, v in flags.items() if v is not None})
    Trainer(cfg, resume=args.resume).run()


def cmd_demo(args) -> None:
    from .demo import demo

    demo(args.out, args.steps)


def cmd_data(args) -> None:
    from .pipeline import PipelineConfig, run

    if args.data_command == "run":
        cfg = PipelineConfig.from_toml(args.pipeline, executor=args.executor, workers=args.workers)
    else:  # one stage on its own, over the sources given on the command line
        sources = [{"name": "input", "paths": args.inputs}] if args.inputs else []
        for spec in args.source or []:
            name, sep, pattern = spec.partition("=")
            if not sep or not name or not pattern:
                raise ValueError(f"--source takes NAME=GLOB, not {spec!r}")
            sources.append({"name": name, "paths": [pattern]})
        stages = {"filter": ["normalize", "filter"], "dedup": ["dedup"], "classify": ["classify"],
                  "tokenize": ["tokenize"]}[args.data_command]
        d = {"source": sources, "stages": stages, "out": args.out, "work": args.work or f"{args.out.rstrip('/')}.work",
             "executor": args.executor or "serial", "workers": args.workers or 0, "shard_docs": args.shard_docs}
        if args.data_command == "dedup":
            d["dedup"] = {"preset": args.preset, "mode": args.mode, "verify": args.verify,
                          "exact": not args.no_exact, "near": not args.no_near}
        if args.data_command == "classify":
            d["classify"] = {"model": args.model, "keep_labels": args.keep_labels or [], "min_score": args.min_score}
        if args.data_command == "tokenize":
            d["tokenize"] = {"tokenizer": args.tokenizer}
        cfg = PipelineConfig.from_dict(d)
    run(cfg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zamba2", description="Run, train and serve Zamba2 hybrid language models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming tokens as they come")
    g.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    g.add_argument("--prompt", required=True, help="text to continue (BOS is added)")
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
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="prepare a bundled corpus, train a small Zamba2 on CPU, evaluate and sample")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--steps", type=int, default=150, help="training steps (default 150, about 3 minutes on 2 cores)")
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("prepare", help="tokenize .txt / .jsonl files into token shards for training")
    pr.add_argument("inputs", nargs="+", help=".txt files (one document each) or .jsonl files (one per line)")
    pr.add_argument("--out", required=True, help="output data folder")
    pr.add_argument("--tokenizer", default=None, help="tokenizer.json or tokenizer.model (default Mistral v0.1)")
    pr.add_argument("--text-key", default="text", help="JSONL field holding the text (default 'text')")
    pr.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    pr.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="pretrain / anneal / continue pretraining on prepared shards")
    t.add_argument("--config", default=None, help="run.toml with a [train] table (TrainConfig fields)")
    t.add_argument("--data", default=None, help="prepared data folder (overrides the config)")
    t.add_argument("--out", default=None, help="output folder (overrides the config)")
    t.add_argument("--model", default=None, help="preset name or checkpoint folder (overrides the config)")
    t.add_argument("--steps", type=int, default=None, help="phase-1 steps (overrides the config)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.set_defaults(func=cmd_train)

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
            s_.add_argument("--tokenizer", default=None, help="tokenizer.json / .model (default Mistral v0.1)")
    da.set_defaults(func=cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"zamba2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

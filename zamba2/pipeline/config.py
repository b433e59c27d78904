"""The pipeline's configuration, read from a TOML file (`zamba2 data run pipeline.toml`).

    stages = ["normalize", "filter", "dedup", "classify", "tokenize"]   # any subset, run in this order
    work = "work/"          # intermediate shards, done markers, report.json (a rerun resumes here)
    out = "data/"           # token shards (tokenize), else the surviving documents as .jsonl.zst
    executor = "processes"  # serial | processes | ray
    shard_docs = 50000      # documents per work shard: memory is bounded by this, not the corpus

    [[source]]              # one table per source; dedup ranks them in this order unless [dedup] ranking
    name = "fwe"
    paths = ["raw/fwe/*.parquet"]

    [filter.mean_word_length]   # any rule of filters.RULES: enabled / min / max
    max = 15

    [dedup]                 # preset zyda1 | zyda2, mode all | cross-source-only, exact, near, verify
    preset = "zyda2"
    mode = "cross-source-only"

    [classify]              # see classify.ClassifyConfig
    model = "quality.npz"
    keep_labels = ["High"]

    [tokenize]
    tokenizer = "tokenizer.model"   # default: Mistral v0.1 from mistral-common
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import UserError, naming, read_toml
from .classify import ClassifyConfig
from .dedup import MODES
from .filters import FilterConfig
from .minhash import PRESETS, MinHashParams

STAGES = ("normalize", "filter", "dedup", "classify", "tokenize")
VERIFY_JACCARD = {"zyda1": 0.4, "zyda2": 0.85}  # the Jaccard each paper quotes for its LSH setting
EXECUTORS = ("serial", "processes", "ray")


@dataclass
class Source:
    name: str
    paths: list[str]
    text_key: str = "text"          # JSONL field / Parquet column holding the text
    filter: bool = True             # Zyda-1 did not filter StarCoder (code breaks the prose heuristics)

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not self.paths or not all(isinstance(p, str) for p in self.paths):
            raise UserError(f"source {self.name!r}: paths must be a list of files or globs")


@dataclass
class DedupConfig:
    preset: str = "zyda1"
    mode: str = "all"               # or "cross-source-only" (Zyda-2)
    exact: bool = True              # exact-text hash pass (cheap)
    near: bool = True               # MinHash LSH pass
    verify: bool = False            # keep only candidate pairs whose exact shingle Jaccard >= threshold
    threshold: float | None = None  # default: the preset's quoted Jaccard, or (1/bands)^(1/rows) if overridden
    ranking: list[str] = field(default_factory=list)   # sources, best first (default: declaration order)
    minhash: dict = field(default_factory=dict)        # overrides of MinHashParams fields (ngram, n, bands, ...)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise UserError(f"[dedup] preset must be one of {sorted(PRESETS)}, not {self.preset!r}")
        if self.mode not in MODES:
            raise UserError(f"[dedup] mode must be one of {MODES}, not {self.mode!r}")
        self.params  # validates the overrides

    @property
    def params(self) -> MinHashParams:
        known = {f.name for f in fields(MinHashParams)}
        bad = set(self.minhash) - known
        if bad:
            raise UserError(f"[dedup.minhash]: unknown field(s) {sorted(bad)}; known: {sorted(known)}")
        return replace(PRESETS[self.preset], **self.minhash)

    @property
    def jaccard_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return self.params.threshold if self.minhash else VERIFY_JACCARD[self.preset]


@dataclass
class TokenizeConfig:
    tokenizer: str | None = None    # tokenizer.json / tokenizer.model; default Mistral v0.1


@dataclass
class PipelineConfig:
    sources: list[Source]
    work: str
    out: str
    stages: list[str] = field(default_factory=lambda: list(STAGES[:3]) + ["tokenize"])
    executor: str = "serial"
    workers: int = 0                # processes: 0 = all cores; ray: CPUs to ask for (0 = the cluster's)
    ray_address: str | None = None  # None: start or join a local Ray
    shard_docs: int = 50_000
    count_tokens: bool = False      # tokenize every input document to report tokens at every stage
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    classify: ClassifyConfig | None = None
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    def __post_init__(self):
        if not self.sources:
            raise UserError("no [[source]] given")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise UserError(f"source names must be unique: {names}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise UserError(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
        self.stages = [s for s in STAGES if s in self.stages]
        if self.executor not in EXECUTORS:
            raise UserError(f"executor must be one of {EXECUTORS}, not {self.executor!r}")
        if self.shard_docs < 1:
            raise UserError("shard_docs must be positive")
        if "classify" in self.stages and self.classify is None:
            raise UserError("stage 'classify' needs a [classify] table with a model")
        unknown = set(self.dedup.ranking) - set(names)
        if unknown:
            raise UserError(f"[dedup] ranking names unknown source(s) {sorted(unknown)}")

    @property
    def ranking(self) -> list[str]:
        """Source names, best first: the listed ones, then the rest in declaration order."""
        return list(self.dedup.ranking) + [s.name for s in self.sources if s.name not in self.dedup.ranking]

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)} | {"source"}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown pipeline key(s) {sorted(unknown)}; known: {sorted(known)}")
        sources = [_build(Source, "[[source]]", s) for s in _source_tables(d.pop("source", d.pop("sources", [])))]
        filt = FilterConfig.from_dict(d.pop("filter", {}))
        dedup = _build(DedupConfig, "[dedup]", d.pop("dedup", {}))
        classify = d.pop("classify", None)
        classify = _build(ClassifyConfig, "[classify]", classify) if classify is not None else None
        tokenize = _build(TokenizeConfig, "[tokenize]", d.pop("tokenize", {}))
        try:
            return cls(sources=sources, filter=filt, dedup=dedup, classify=classify, tokenize=tokenize, **d)
        except TypeError as e:  # a value of the wrong type
            raise UserError(f"pipeline config: {e}") from None

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "PipelineConfig":
        path = Path(path)
        d = read_toml(path, f"no such pipeline file: {path}")
        d.update({k: v for k, v in overrides.items() if v is not None})
        base = path.parent  # relative paths in the file are relative to it
        d.setdefault("work", "work")
        d.setdefault("out", "data")
        for key in ("work", "out"):
            d[key] = str(base / d[key])
        for s in _source_tables(d.get("source", [])):
            paths = s.get("paths", [])
            paths = [paths] if isinstance(paths, str) else paths  # one glob may be given as a string
            s["paths"] = [str(base / p) if isinstance(p, str) else p for p in paths]
        with naming(path):
            return cls.from_dict(d)

    @classmethod
    def one_stage(cls, stage: str, inputs: list[str] | None, named_sources: list[str] | None, out: str,
                  work: str | None, executor: str | None, workers: int | None, shard_docs: int,
                  options: dict | None) -> "PipelineConfig":
        """The pipeline of one stage (`zamba2 data filter|dedup|classify|tokenize`): `inputs` as the source "input",
        each of `named_sources` given as NAME=GLOB; `options`, the stage's table ([dedup], [classify], [tokenize])."""
        sources = [{"name": "input", "paths": inputs}] if inputs else []
        for spec in named_sources or []:
            name, sep, pattern = spec.partition("=")
            if not sep or not name or not pattern:
                raise UserError(f"--source takes NAME=GLOB, not {spec!r}")
            sources.append({"name": name, "paths": [pattern]})
        stages = {"filter": ["normalize", "filter"], "dedup": ["dedup"], "classify": ["classify"],
                  "tokenize": ["tokenize"]}[stage]
        d = {"source": sources, "stages": stages, "out": out, "work": work or f"{out.rstrip('/')}.work",
             "executor": executor or "serial", "workers": workers or 0, "shard_docs": shard_docs}
        if options is not None:
            d[stage] = options
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["source"] = d.pop("sources")
        d["filter"] = {name: asdict(rule) for name, rule in self.filter.rules.items()} | (
            {"wordlists": self.filter.wordlists} if self.filter.wordlists else {})
        for rule in d["filter"].values():
            rule.pop("feature", None)
        if self.classify is None:
            d.pop("classify")
        return d

    def fingerprint(self) -> dict:
        """What decides the output: a work folder made with another fingerprint cannot be resumed."""
        d = self.to_dict()
        for key in ("executor", "workers", "ray_address"):
            d.pop(key)
        # absolute paths: `p.toml`, `$PWD/p.toml` and `sub/p.toml` from the parent folder are one run
        d["work"], d["out"] = os.path.abspath(d["work"]), os.path.abspath(d["out"])
        for src in d["source"]:
            src["paths"] = [os.path.abspath(p) for p in src["paths"]]
        if d["tokenize"]["tokenizer"] is not None:
            d["tokenize"]["tokenizer"] = os.path.abspath(d["tokenize"]["tokenizer"])
        return d


def _source_tables(sources) -> list[dict]:
    """The sources as a list of tables; `[source]` (one table) instead of `[[source]]` is the usual slip."""
    if isinstance(sources, dict):
        raise UserError("[source] is a single table; write each source as [[source]] (an array of tables)")
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        raise UserError(f"source = {sources!r}; expected [[source]] tables with name and paths")
    return sources


def _build(cls, table: str, d: dict):
    """cls(**d), with unknown or missing keys reported by table name."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"{table}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:  # a required key is missing
        raise UserError(f"{table}: {e}") from None

"""Zyda-style pretraining data pipeline: read -> normalize -> filter -> dedup -> classify -> tokenize.

    from zamba2.pipeline import PipelineConfig, run
    report = run(PipelineConfig.from_toml("pipeline.toml"))

Files follow the data flow: read, normalize, filters, minhash, dedup, classify (the stages' logic),
stages (one task of each stage), executors (serial / processes / Ray Data), runner (the whole run,
resumable), report. `zamba2 data ...` is the command line. References: Zyda-1 (arXiv 2406.01981),
Zyda-2 (arXiv 2411.06068) and ../shared/design/data-pipeline.md.
"""

from .classify import ClassifyConfig, HashedLogistic, load_classifier
from .config import DedupConfig, PipelineConfig, Source, TokenizeConfig
from .filters import RULES, Filter, FilterConfig, Rule
from .minhash import PRESETS, MinHasher, MinHashParams
from .runner import run

__all__ = ["PipelineConfig", "Source", "DedupConfig", "TokenizeConfig", "ClassifyConfig", "FilterConfig", "Rule",
           "RULES", "Filter", "MinHasher", "MinHashParams", "PRESETS", "HashedLogistic", "load_classifier", "run"]

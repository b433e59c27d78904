"""Offline datasets for the task YAMLs: a JSONL file (one example per line) as the task's test split.

A YAML names its file in `dataset_kwargs: {file: ...}`, relative to this folder or absolute. To evaluate
your own data, copy a YAML, change `task` and `file`, and pass its folder with --include-path.
"""

import json
from pathlib import Path

import datasets


def load_jsonl(file: str, **unused) -> dict:  # unused: lm-eval also passes the run's --metadata / model args
    path = Path(file) if Path(file).is_absolute() else Path(__file__).parent / file
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}

"""`zamba2 finetune`: chat SFT of a checkpoint with the pretraining Trainer, in full or with LoRA.

The Trainer brings the schedule, gradient accumulation and clipping, resumable checkpoints
(OUT/checkpoint), metrics and FSDP2; this module only supplies the chat rows (sft.py) and the LoRA
wrapping (lora.py), and writes the result:
  - full fine-tune: OUT/checkpoint is the fine-tuned model;
  - LoRA: OUT/adapter (adapter.safetensors + adapter_config.json), or with `merge` OUT/merged, a plain
    Hugging Face folder.
Every output folder gets the tokenizer files and the chat template used, so `zamba2 serve` chats with it
exactly as it was trained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import hub
from ..errors import UserError
from . import parallel
from ..model.checkpoint import read_config, save
from .lora import LoRA, merge as merge_lora
from ..model.zamba2 import Zamba2LM
from ..text.chat import BUILTIN_TEMPLATE, read_tokenizer_config
from .sft import chat_loaders
from ..text.tokenizer import load_tokenizer
from .trainer import Trainer, TrainConfig, start_folder

TOKENIZER_FILES = [f for f in hub.TOKENIZER_FILES if f != "tokenizer_config.json"]  # the config is rewritten


def write_tokenizer_files(src: Path | None, dst: Path) -> None:
    """Copy the base checkpoint's tokenizer files (none from a preset: src None) to dst, with tokenizer_config.json
    holding the chat template."""
    for name in TOKENIZER_FILES if src is not None else ():
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    cfg = read_tokenizer_config(src)
    cfg.setdefault("chat_template", BUILTIN_TEMPLATE)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def finetune(cfg: TrainConfig, lora: LoRA | None = None, merge: bool = False, resume: bool = False,
             too_long: str = "truncate", loaders: tuple | None = None, objective=None,
             stats: dict | None = None, model: Zamba2LM | None = None) -> dict:
    """SFT on the chat JSONL `cfg.data` starting from `cfg.model`; returns the data counts and output folder.

    dpo.dpo passes its own `loaders` (preference pairs) and `objective`, and the starting `model` it has
    already built for the reference log-probs, and reuses everything else."""
    if merge and lora is None:
        raise UserError("--merge needs LoRA (--lora-rank); a full fine-tune is already a plain checkpoint")
    model_dir = start_folder(cfg.model)  # None for a preset
    if merge and model_dir is not None:  # fail now, not after training
        lora.check_mergeable(read_config(model_dir / "config.json"))
    stats = stats if stats is not None else {}
    if loaders is None:
        tok = load_tokenizer(model_dir)
        loaders = chat_loaders(cfg.data, model_dir, tok, cfg.seq_len,
                               cfg.batch_size, cfg.val_fraction, too_long, cfg.seed, stats)
    try:
        trainer = Trainer(cfg, resume=resume, loaders=loaders, lora=lora, objective=objective, model=model)
        stats["losses"] = trainer.run()
        out = Path(cfg.out) / "checkpoint"
        if lora is not None:
            model = trainer.model
            if trainer.world > 1:  # FSDP: gather the full weights (collective) into a plain wrapped model on rank 0
                full = parallel.model_state(trainer.model)
                model = type(trainer.model)(trainer.model.config)
                lora.apply(model)
                if trainer.rank == 0:
                    model.load_state_dict(full)
            out = Path(cfg.out) / ("merged" if merge else "adapter")
            if trainer.rank == 0:
                save(merge_lora(model), out) if merge else lora.save(model, out)
        if trainer.rank == 0:
            write_tokenizer_files(model_dir, out)
    finally:
        parallel.cleanup()
    stats["output"] = str(out)
    return stats

"""Pretraining and annealing on packed token shards, on one process or many (torchrun + FSDP2).

Recipe (Zamba2 tech report): phase 1 is warmup-stable-decay (WSD) at the peak learning rate; the
optional phase 2 anneals on high-quality data that replays phase-1 data at a set ratio, re-warming
to `anneal_lr_factor` (about 0.75) of the first peak and decaying to zero.

A checkpoint folder is the Hugging Face layout (loadable by zamba2.load and transformers) plus
train_state.pt (optimizer, step, data position, RNG), written atomically; `resume` continues so the
losses equal those of an uninterrupted run step for step.

With N processes, every rank reads the same global batch and computes its rows [rank::N]. The data
position is then one number shared by all ranks, and a checkpoint resumes under any number of
processes. The loss is normalised by the global count of target tokens, so N processes give the
same losses and gradients as one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..errors import UserError, check_choice, check_keys, check_range, check_types, device, naming, read_toml
from ..hub import resolve
from ..model import checkpoint
from . import parallel
from ..model import zamba1_config
from ..model.config import PRESETS, Config, preset
from ..model.score import IGNORE, token_logprobs
from .data import MixedLoader, PackedLoader, TokenData
from ..model.zamba2 import Zamba2LM
from ..ops.hardware import fast_bf16


ZAMBA1_PREFIX = "zamba1-"  # `model = "zamba1-tiny"`: a Zamba1 preset (model/zamba1_config.py)
PRESET_NAMES = [*PRESETS, *(ZAMBA1_PREFIX + name for name in zamba1_config.PRESETS)]


def model_preset(name: str, **overrides) -> Config | zamba1_config.Zamba1Config:
    """The config of a preset `model` names: Zamba2's, or Zamba1's under the zamba1- prefix."""
    if name.startswith(ZAMBA1_PREFIX):
        return zamba1_config.preset(name.removeprefix(ZAMBA1_PREFIX), **overrides)
    return preset(name, **overrides)


@dataclass
class TrainConfig:
    data: str = ""  # prepared data folder (zamba2 prepare)
    out: str = "runs/out"  # metrics.jsonl and checkpoint/ go here
    model: str = "tiny"  # a preset name (Zamba1's as "zamba1-tiny", ...), or a checkpoint folder to continue from
    model_overrides: dict | None = None  # Config fields changed on top of the preset
    # batch
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    # optimisation
    steps: int = 1000  # phase-1 optimizer steps
    lr: float = 3e-3
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # last fraction of phase 1 spent decaying (WSD)
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "auto"  # autocast dtype of forward/backward: "bfloat16", "float32", or "auto" (compute_dtype)
    device: str = "auto"  # "cpu", "cuda", or "auto" (cuda when available); under torchrun, cuda:LOCAL_RANK
    # phase 2: annealing
    anneal_data: str | None = None
    anneal_steps: int = 0
    anneal_replay: float = 0.5  # fraction of phase-2 rows drawn from phase-1 data
    anneal_lr_factor: float = 0.75
    anneal_warmup_steps: int = 10
    # evaluation and checkpoints
    val_fraction: float = 0.05  # last documents of `data` held out
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        where = "[train]"
        check_types(self, where)
        for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "log_every"):
            check_range(where, name, getattr(self, name), 1)
        for name in ("steps", "warmup_steps", "anneal_steps", "anneal_warmup_steps", "seed", "weight_decay",
                     "grad_clip"):
            check_range(where, name, getattr(self, name), 0)
        for name in ("min_lr_ratio", "decay_fraction", "anneal_replay"):
            check_range(where, name, getattr(self, name), 0, 1)
        check_range(where, "lr", self.lr, 0, low_open=True)
        check_range(where, "anneal_lr_factor", self.anneal_lr_factor, 0, low_open=True)
        check_range(where, "val_fraction", self.val_fraction, 0, 1, high_open=True)
        if len(self.betas) != 2:
            raise UserError(f"{where}: betas = {self.betas!r}; expected two numbers, e.g. [0.9, 0.95]")
        for b in self.betas:
            check_range(where, "betas", b, 0, 1, high_open=True)
        check_choice(where, "dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if self.device != "auto":
            device(self.device, f"{where} device")
        if self.total_steps < 1:
            raise UserError(f"{where}: steps = {self.steps} and anneal_steps = {self.anneal_steps}: nothing to train")
        if self.model_overrides:  # built now, so a bad [model] field is reported before any work
            if self.model not in PRESET_NAMES:
                raise UserError(f"[model] overrides apply to a preset ({', '.join(PRESET_NAMES)}), not to the "
                                f"checkpoint {self.model!r}")
            try:
                model_preset(self.model, **self.model_overrides)
            except UserError as e:
                raise UserError(f"[model] {e}") from None

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        d = read_toml(path, f"no such run config: {path}")
        # [train]: TrainConfig fields; [model]: Config fields changed on top of the preset
        train, model = d.pop("train", {}), d.pop("model", None)
        if d:
            raise UserError(f"{path}: unknown table(s) {sorted(d)}; expected [train] and optionally [model]")
        if model:
            train["model_overrides"] = model
        with naming(path):
            return cls.from_dict({**train, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        check_keys("[train]", d, [f.name for f in fields(cls)], "training option")
        cfg = cls(**d)
        cfg.betas = tuple(cfg.betas)
        if not cfg.data:
            raise UserError("training needs `data`, a folder made by `zamba2 prepare`")
        if cfg.anneal_steps and not cfg.anneal_data:
            raise UserError("anneal_steps > 0 needs anneal_data")
        return cfg

    @property
    def total_steps(self) -> int:
        return self.steps + self.anneal_steps


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """WSD for phase 1 (linear warmup, flat, linear decay to min); phase 2 re-warms and decays to zero."""
    if step >= cfg.steps:  # annealing
        s, n = step - cfg.steps, max(cfg.anneal_steps, 1)
        peak = cfg.lr * cfg.anneal_lr_factor
        if s < cfg.anneal_warmup_steps:
            return peak * (s + 1) / cfg.anneal_warmup_steps
        return peak * (1 - (s - cfg.anneal_warmup_steps) / max(n - cfg.anneal_warmup_steps, 1))
    floor = cfg.lr * cfg.min_lr_ratio
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step < decay_start:
        return cfg.lr
    return floor + (cfg.lr - floor) * (1 - (step - decay_start) / max(cfg.steps - decay_start, 1))


NO_DECAY = ("A_log", "D", "dt_bias", "dt_proj_bias")  # dt_proj_bias: Zamba1's per-channel dt bias [h, p]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no weight decay on norms, biases, A_log, D and dt_bias (all < 2-D)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.split(".")[-1] in NO_DECAY else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def start_folder(model: str, revision: str | None = None) -> Path | None:
    """The checkpoint folder a run starts from: None for a preset, else the folder `model`, or the Hub repo `model`
    downloaded at `revision` (hub.resolve)."""
    if model in PRESET_NAMES:
        if revision is not None:
            raise UserError(f"model {model!r} is a preset; a revision applies only to a Hugging Face Hub repo id")
        return None
    if not Path(model).is_dir() and model.count("/") != 1:  # not a Hub repo id either: say what is accepted
        raise UserError(f"model {model!r} is neither a preset {PRESET_NAMES}, a checkpoint folder nor a Hugging "
                        "Face Hub repo id")
    return resolve(model, revision)


def check_vocabulary(model: Zamba2LM, data_vocab: int) -> None:
    """Token ids the model has no embedding for: one line before any work (not an index error mid-step)."""
    if model.config.vocab_size < data_vocab:
        raise UserError(f"data vocabulary ({data_vocab}) exceeds the model's ({model.config.vocab_size})")


def build_model(cfg: TrainConfig) -> Zamba2LM:
    if cfg.model in PRESET_NAMES:
        mc = model_preset(cfg.model, **(cfg.model_overrides or {}))
        torch.manual_seed(cfg.seed)
        return checkpoint.ARCHITECTURES[mc.model_type][1](mc)
    model = checkpoint.load(start_folder(cfg.model))
    if model.quantized:
        raise UserError(f"{cfg.model} holds {model.quantized}-quantized weights, which are for inference only: "
                        "train from the float checkpoint it was made from")
    return model


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """TrainConfig.dtype on `device`. "bfloat16" is mixed precision: float32 weights, gradients and optimizer
    state, bf16 matmuls under autocast, the SSM scan and its state in float32 (ssd.py). "auto" picks it where
    bf16 matmuls outrun float32 ones (CPUs with bf16 instructions or AMX, bf16 GPUs), else float32."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return getattr(torch, name)


def lm_loss(model: Zamba2LM, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    """Cross-entropy summed over the batch's target tokens (callers divide by the global token count)."""
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"])
    return -token_logprobs(logits, batch["labels"]).sum()


def target_count(batch: dict) -> int:
    return int((batch["labels"] != IGNORE).sum())


class LMObjective:
    """Next-token cross-entropy, summed over target tokens and counted per token (pretraining, SFT).

    The Trainer divides `loss` by the global `count` of a batch; dpo.DPOObjective is the other objective."""

    def loss(self, model: Zamba2LM, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        return lm_loss(model, batch, dtype)

    def count(self, batch: dict) -> int:
        return target_count(batch)

    def metrics(self) -> dict:
        return {}


@torch.no_grad()
def evaluate(trainer: "Trainer", batches: int) -> float:
    """Validation loss per token over the first `batches` batches of the held-out split (always the same ones)."""
    model, loader = trainer.model, trainer.val_loader
    model.eval()
    saved = loader.state_dict()
    loader.load_state_dict({"pos": loader.lo})
    total, count = torch.zeros((), device=trainer.device), 0
    for _ in range(batches):
        batch = loader.next_batch()
        total += trainer.objective.loss(model, trainer.local_rows(batch), trainer.dtype)
        count += trainer.objective.count(batch)
    loader.load_state_dict(saved)
    model.train()
    return parallel.all_sum(total).item() / count


class Trainer:
    """`loaders` (train, validation or None) replace the token shards of cfg.data: fine-tuning on chat rows
    (sft.ChatLoader). `lora` (a lora.LoRA) wraps the model's projections before training; only its adapter
    weights train, and checkpoints keep them in train_state.pt beside the base weights. `objective` is the
    loss (default LMObjective; dpo.DPOObjective for preference pairs). `model` is the starting model when
    the caller has built it already (dpo: the reference); by default build_model(cfg)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, loaders: tuple | None = None, lora=None,
                 objective=None, model: Zamba2LM | None = None):
        # float32 subnormals (from strongly decayed SSM terms and tiny gradients) made CPU training
        # steps up to 20x slower in measurements; flushing them to zero changes nothing that matters
        torch.set_flush_denormal(True)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.objective = objective or LMObjective()
        self.rank, self.world, self.device = parallel.setup(cfg.device)
        self.dtype = compute_dtype(cfg.dtype, self.device)
        if cfg.batch_size % self.world:
            raise UserError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({self.world})")
        if loaders is not None:
            self.train_loader, self.val_loader = loaders
            data_vocab = self.train_loader.vocab_size
        else:
            data = TokenData(cfg.data)
            split = data.split_point(cfg.val_fraction)
            self.train_loader = PackedLoader(data, cfg.seq_len, cfg.batch_size, 0, split)
            self.val_loader = PackedLoader(data, cfg.seq_len, cfg.batch_size, split) if split < data.num_tokens else None
            data_vocab = data.meta["vocab_size"]
        self.anneal_loader = None
        if cfg.anneal_steps:
            anneal = PackedLoader(TokenData(cfg.anneal_data), cfg.seq_len, cfg.batch_size)
            self.anneal_loader = MixedLoader(anneal, self.train_loader, cfg.anneal_replay, cfg.seed)
        self.step = 0
        state = None
        if resume:
            state_path = self.out / "checkpoint" / "train_state.pt"
            if not state_path.exists():
                raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
            self.model = checkpoint.load(self.out / "checkpoint")
            state = torch.load(state_path, weights_only=False)
        else:
            self.model = model if model is not None else build_model(cfg)
        check_vocabulary(self.model, data_vocab)
        self.lora = lora
        if lora is not None:
            lora.apply(self.model)
            if state is not None:
                lora.load_state_dict(self.model, state["adapter"])
        self.model.to(self.device).train()
        if self.world > 1:
            parallel.shard(self.model)
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                     fused=False)
        self.tb = self._tensorboard()
        if state is not None:
            parallel.load_optimizer_state(self.model, self.opt, state["optimizer"])
            self.train_loader.load_state_dict(state["train_loader"])
            if self.anneal_loader is not None and "anneal_loader" in state:
                self.anneal_loader.load_state_dict(state["anneal_loader"])
            torch.set_rng_state(state["rng"])
            self.step = state["step"]
            self.forget_metrics_after(self.step)
        self.saved_step = self.step

    def _tensorboard(self):
        """A SummaryWriter under OUT/tb when TensorBoard is installed (rank 0 only), else None."""
        if self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tb"))

    def local_rows(self, batch: dict) -> dict:
        """This rank's rows of a global batch, on this rank's device."""
        return {k: v[self.rank::self.world].to(self.device) for k, v in batch.items()}

    def save(self) -> None:
        # gathering the full state is collective; only rank 0 holds the tensors and writes
        weights = parallel.model_state(self.model)
        state = {"step": self.step, "optimizer": parallel.optimizer_state(self.model, self.opt),
                 "rng": torch.get_rng_state(), "train_loader": self.train_loader.state_dict(),
                 "config": asdict(self.cfg)}
        if self.lora is not None:  # the HF files get the (frozen) base; the adapters go in train_state.pt
            weights, state["adapter"] = self.lora.split_state_dict(weights)
        if self.anneal_loader is not None:
            state["anneal_loader"] = self.anneal_loader.state_dict()
        if self.rank == 0:
            try:
                checkpoint.save(self.model, self.out / "checkpoint", train_state=state, state_dict=weights)
            except BaseException:
                self.forget_metrics_after(self.saved_step)  # the steps since then will be trained again
                raise
        self.saved_step = self.step
        parallel.barrier()

    def forget_metrics_after(self, step: int) -> None:
        """Drop the metrics.jsonl records of steps after `step`, which a resume trains and logs again."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        keep = 0
        with open(path, "rb") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] > step:
                        break
                except (ValueError, KeyError):  # a line cut short by a kill
                    break
                keep += len(line)
        os.truncate(path, keep)  # shrinking a file needs no free space (the disk may be full)

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def progress(self, text: str) -> None:
        if self.rank == 0:
            sys.stderr.write(text)
            sys.stderr.flush()

    def run(self, stop_after: int | None = None) -> list[float]:
        """Train to cfg.total_steps (or `stop_after` more steps); returns the training losses of this run."""
        cfg, model = self.cfg, self.model
        self.out.mkdir(parents=True, exist_ok=True)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        losses, t0, last = [], time.time(), self.step
        end = cfg.total_steps if stop_after is None else min(cfg.total_steps, self.step + stop_after)
        while self.step < end:
            lr = learning_rate(cfg, self.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            loader = self.anneal_loader if self.step >= cfg.steps else self.train_loader
            loss = torch.zeros((), device=self.device)
            for _ in range(cfg.grad_accum):
                batch = loader.next_batch()  # the global micro-batch, the same on every rank
                # FSDP averages gradients over ranks: scaling by world size makes that a sum over all rows
                scale = self.world / (max(self.objective.count(batch), 1) * cfg.grad_accum)
                micro = self.objective.loss(model, self.local_rows(batch), self.dtype) * scale
                micro.backward()
                loss += micro.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            loss = parallel.all_sum(loss).item() / self.world
            losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; lower lr or check data")
            if self.step % cfg.log_every == 0 or self.step == end:
                dt = time.time() - t0
                tps = tokens_per_step * (self.step - last) / max(dt, 1e-9)
                t0, last = time.time(), self.step
                self.log({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                          "tokens": self.step * tokens_per_step, **self.objective.metrics()})
                self.progress(f"\rstep {self.step}/{cfg.total_steps}  loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s ")
            if self.val_loader is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.total_steps):
                val = evaluate(self, cfg.eval_batches)
                self.log({"step": self.step, "val_loss": val, "val_ppl": math.exp(val)})
                self.progress(f"\n  val loss {val:.4f}  ppl {math.exp(val):.2f}\n")
            if self.step % cfg.save_every == 0 or self.step == cfg.total_steps:
                self.save()
        self.progress("\n")
        return losses

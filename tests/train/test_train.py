"""Data shards, packing, the schedule, parameter groups, and exact resume."""

import errno
import json

import pytest
import torch

import zamba2
from zamba2.__main__ import main
from zamba2.train import trainer as trainer_module
from zamba2.text.read import read_documents
from zamba2.model.score import IGNORE
from zamba2.model.zamba1_config import tiny as zamba1_tiny
from zamba2.train.data import PackedLoader, TokenData, prepare
from zamba2.train.trainer import NO_DECAY, Trainer, TrainConfig, learning_rate, param_groups

TINY = dict(vocab_size=32000, max_position_embeddings=512)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    lines = [json.dumps({"text": f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 5 + 1)})
             for i in range(60)]
    lines.insert(3, "{broken json")
    lines.insert(7, json.dumps({"no_text": 1}))
    (root / "docs.jsonl").write_text("\n".join(lines))
    stats = {}
    meta = prepare(read_documents([root / "docs.jsonl"], stats=stats), root / "shards", zamba2.load_tokenizer(),
                   shard_tokens=500, stats=stats)
    assert meta["bad_lines"] == 2 and meta["docs"] == 60 and len(meta["shards"]) > 1
    return root / "shards"


def test_rows_mark_documents_and_mask_cross_document_targets(data_dir):
    data = TokenData(data_dir)
    batch = PackedLoader(data, seq_len=64, batch_size=3).next_batch()
    ids, labels, doc = batch["input_ids"], batch["labels"], batch["doc_ids"]
    assert ids.shape == labels.shape == doc.shape == (3, 64)
    tok = zamba2.load_tokenizer()
    starts = ids == tok.bos_id
    # a new document starts exactly where a <s> is, and the <s> is never a target
    assert torch.equal(starts[:, 1:], doc[:, 1:] != doc[:, :-1])
    assert torch.equal(labels[:, :-1][starts[:, 1:]], torch.full_like(labels[:, :-1][starts[:, 1:]], IGNORE))


def test_loader_resumes_at_the_same_batch(data_dir):
    loader = PackedLoader(TokenData(data_dir), 32, 2)
    loader.next_batch()
    state = loader.state_dict()
    expected = loader.next_batch()
    other = PackedLoader(TokenData(data_dir), 32, 2)
    other.load_state_dict(state)
    assert torch.equal(other.next_batch()["input_ids"], expected["input_ids"])


def test_schedule_is_warmup_stable_decay_then_anneal():
    cfg = TrainConfig(data="x", steps=100, warmup_steps=10, decay_fraction=0.2, lr=1.0, anneal_data="y",
                      anneal_steps=20, anneal_warmup_steps=5, anneal_lr_factor=0.75)
    lrs = [learning_rate(cfg, s) for s in range(120)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[79] == 1.0
    assert lrs[99] < 0.06 and all(a >= b for a, b in zip(lrs[80:100], lrs[81:100]))
    assert max(lrs[100:]) == 0.75 and lrs[119] < 0.05


def test_no_weight_decay_on_norms_biases_and_ssm_parameters():
    skipped = set()
    for model in (zamba2.Zamba2LM(zamba2.tiny(add_bias_linear=True)), zamba2.Zamba1LM(zamba1_tiny(mamba_proj_bias=True))):
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        # matrices, conv kernels and Zamba1's per-head x_proj / dt_proj; not its [h, p] D and dt bias, [h, p, n] A_log
        assert all(p.dim() >= 2 and names[id(p)].split(".")[-1] not in NO_DECAY for p in decay["params"])
        skipped |= {names[id(p)].split(".")[-1] for p in no_decay["params"]}
    assert set(NO_DECAY) <= skipped and "bias" in skipped and "weight" in skipped  # norm weights


def run_config(data_dir, out, **kw):
    return TrainConfig.from_dict(dict(data=str(data_dir), out=str(out), model="tiny", model_overrides=TINY,
                                      seq_len=32, batch_size=2, steps=8, warmup_steps=2, lr=1e-2, eval_every=4,
                                      eval_batches=1, save_every=3, log_every=1, val_fraction=0.1,
                                      **{"dtype": "float32", **kw}))


def test_interrupted_run_resumes_with_identical_losses(data_dir, tmp_path):
    straight = Trainer(run_config(data_dir, tmp_path / "a")).run()
    first = Trainer(run_config(data_dir, tmp_path / "b")).run(stop_after=5)  # checkpoint at step 3, then "crash"
    resumed = Trainer(run_config(data_dir, tmp_path / "b"), resume=True)
    assert resumed.step == 3
    assert first[:3] + resumed.run() == straight
    assert straight[-1] < straight[0]
    # the final checkpoint is a plain model folder
    ckpt = zamba2.load(tmp_path / "a" / "checkpoint")
    assert ckpt.config.vocab_size == 32000
    records = metrics(tmp_path / "a")
    assert any("val_ppl" in r for r in records) and all("loss" in r or "val_loss" in r for r in records)
    # the records of steps 4-5 of the interrupted run were dropped on resume, not logged twice
    assert [r["step"] for r in metrics(tmp_path / "b")] == [r["step"] for r in records]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_disk_full_while_saving_is_one_line_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "run.toml").write_text('[train]\nseq_len = 32\nbatch_size = 2\nwarmup_steps = 1\nsave_every = 2\n'
                                       'log_every = 1\nval_fraction = 0.1\neval_every = 100\n'
                                       '[model]\nvocab_size = 32000\n')
    args = ["train", "--config", str(tmp_path / "run.toml"), "--data", str(data_dir), "--out", str(tmp_path / "r")]
    assert main(args + ["--steps", "2"]) == 0
    ckpt = tmp_path / "r" / "checkpoint"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def disk_full(*a, **k):  # the next save finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zamba2.model.checkpoint, "save_file", disk_full)
    capsys.readouterr()
    assert main(args + ["--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"zamba2 train: error: no space left on device while saving {ckpt}; the previous checkpoint is intact"
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]  # no half-written folder
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2, 2]  # steps 3-4 are redone by a resume
    monkeypatch.undo()
    assert main(args + ["--steps", "4", "--resume"]) == 0
    assert [r["step"] for r in metrics(tmp_path / "r") if "loss" in r] == [1, 2, 3, 4]


def test_mixed_precision_trains_like_float32(data_dir, tmp_path, monkeypatch):
    """bfloat16: float32 weights and optimizer state, bf16 matmuls; the losses follow float32's within a few %.
    "auto" picks it by hardware (forced both ways here)."""
    full = Trainer(run_config(data_dir, tmp_path / "f32", dtype="float32")).run()
    mixed = Trainer(run_config(data_dir, tmp_path / "bf16", dtype="bfloat16"))
    assert mixed.dtype == torch.bfloat16
    losses = mixed.run()
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    assert all(v.dtype == torch.float32 for st in mixed.opt.state.values() for v in st.values() if v.dim())
    assert losses[-1] < losses[0] and abs(losses[-1] - full[-1]) < 0.05 * full[-1]
    for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(trainer_module, "fast_bf16", lambda device, fast=fast: fast)
        assert Trainer(run_config(data_dir, tmp_path / "auto", dtype="auto")).dtype == expected


def test_metrics_also_go_to_tensorboard(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(run_config(data_dir, tmp_path)).run()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))


def test_annealing_phase_mixes_replay(data_dir, tmp_path):
    cfg = run_config(data_dir, tmp_path / "c", anneal_data=str(data_dir), anneal_steps=3, anneal_replay=0.5)
    losses = Trainer(cfg).run()
    assert len(losses) == 11


def test_bad_training_input_is_named(data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        Trainer(TrainConfig.from_dict({"data": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer(run_config(data_dir, tmp_path / "empty"), resume=True)
    with pytest.raises(ValueError, match="neither a preset"):
        Trainer(TrainConfig.from_dict({"data": str(data_dir), "model": str(tmp_path / "nope"), "seq_len": 32}))
    with pytest.raises(ValueError, match="need at least seq_len"):
        Trainer(TrainConfig.from_dict({"data": str(data_dir), "seq_len": 100_000}))
    (tmp_path / "run.toml").write_text("[train\nsteps = 3")
    with pytest.raises(ValueError, match="invalid TOML"):
        TrainConfig.from_toml(tmp_path / "run.toml")


def test_toml_run_config(tmp_path):
    (tmp_path / "run.toml").write_text('[train]\ndata = "d"\nsteps = 7\nmodel = "tiny"\n[model]\nhidden_size = 64\n')
    cfg = TrainConfig.from_toml(tmp_path / "run.toml", steps=9)
    assert cfg.steps == 9 and cfg.model_overrides == {"hidden_size": 64}

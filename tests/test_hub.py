"""Models named by Hugging Face Hub repo id (zamba2/hub.py), against a loopback stand-in for the Hub
(tests/helpers/hub.py) driven by the real huggingface_hub client: no network needed."""

import json
import os
import subprocess
import sys

import pytest
import torch

import zamba2
from conftest import random_model
from helpers.hub import FakeHub, hub_env, use_hub
from helpers.process import ROOT
from zamba2.errors import UserError
from zamba2.hub import resolve, served_name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two revisions of a tiny checkpoint, with a tokenizer config and a file a checkpoint does not need."""
    root = tmp_path_factory.mktemp("hub")
    for name, seed in (("v1", 0), ("v2", 1)):
        zamba2.save(random_model(seed=seed), root / name)
        (root / name / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
        (root / name / "pytorch_model.bin").write_bytes(b"not needed")
    return root


@pytest.fixture
def hub(folders, tmp_path, monkeypatch):
    fake = FakeHub()
    fake.add("owner/tiny", folders / "v1")
    fake.add("owner/tiny", folders / "v2", revision="v2")
    fake.add("owner/gated", folders / "v1", gated=True)
    use_hub(monkeypatch, fake.url, tmp_path / "hf")
    monkeypatch.chdir(tmp_path)  # "owner/tiny" must not be a folder here
    yield fake
    fake.close()


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_repo_id_loads_what_the_folder_holds(hub, folders):
    model = zamba2.load("owner/tiny")
    assert same_weights(model, zamba2.load(folders / "v1"))
    fetched = {p.rsplit("/", 1)[1] for m, p in hub.requests if "/resolve/" in p and m == "GET"}
    assert "pytorch_model.bin" not in fetched and {"config.json", "model.safetensors"} <= fetched


def test_revision_picks_the_branch(hub, folders):
    assert same_weights(zamba2.load("owner/tiny", revision="v2"), zamba2.load(folders / "v2"))
    with pytest.raises(UserError, match="has no revision 'nope'"):
        resolve("owner/tiny", "nope")


def test_offline_after_download_reads_the_cache(hub, tmp_path, monkeypatch):
    folder = resolve("owner/tiny")
    use_hub(monkeypatch, None, tmp_path / "hf", offline=True)
    seen = len(hub.requests)
    assert resolve("owner/tiny") == folder and len(hub.requests) == seen
    with pytest.raises(UserError, match=r"^owner/other: not in the Hugging Face cache .* HF_HUB_OFFLINE is set$"):
        resolve("owner/other")


def test_errors_are_one_line(hub, tmp_path):
    cases = {"owner/missing": "no such folder, and no such model on the Hugging Face Hub",
             "owner/gated": "a gated repo on the Hugging Face Hub",
             "not a repo!": "no such folder, and not a Hugging Face Hub repo id",
             "./runs/x": "no such folder, and not a Hugging Face Hub repo id"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as e:
            resolve(name)
        assert "\n" not in str(e.value)


def test_an_existing_folder_wins_over_a_repo_id(hub, folders, tmp_path):
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "tiny").symlink_to(folders / "v2")
    assert resolve("owner/tiny").resolve() == folders / "v2" and hub.requests == []
    with pytest.raises(UserError, match="a revision applies only to a Hugging Face Hub repo id"):
        resolve("owner/tiny", "v2")


def test_served_name():
    assert served_name("Zyphra/Zamba2-1.2B-instruct") == "Zyphra/Zamba2-1.2B-instruct"


def test_the_command_line_says_one_line_and_exits_2(hub, tmp_path):
    env = {**os.environ, **hub_env(hub.url, tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    for model, message in (("owner/missing", "no such model on the Hugging Face Hub"),
                           ("owner/gated", "a gated repo")):
        out = subprocess.run([sys.executable, "-m", "zamba2", "generate", "--model", model, "--prompt", "Hi"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "zamba2", "generate", "--model", "owner/tiny", "--prompt", "Hi"],
                         capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert out.returncode == 2 and "HF_HUB_OFFLINE is set" in out.stderr, out.stderr


def test_a_tokenizer_by_repo_id_fetches_only_tokenizer_files(hub):
    zamba2.load_tokenizer("owner/tiny")  # no tokenizer file in the repo: Mistral v0.1, as for a folder
    fetched = {p.rsplit("/", 1)[1] for m, p in hub.requests if "/resolve/" in p and m == "GET"}
    assert fetched == {"tokenizer_config.json"}


def test_served_name_of_a_training_run_is_the_run(tmp_path):
    (tmp_path / "demo" / "checkpoint").mkdir(parents=True)
    assert served_name(tmp_path / "demo" / "checkpoint") == "demo" and served_name(tmp_path / "demo") == "demo"


def test_a_tokenizer_flag_takes_a_file_a_folder_or_a_repo_id(hub, folders):
    from zamba2.text.tokenizer import named_tokenizer, mistral_v1_model_path

    assert named_tokenizer(str(mistral_v1_model_path())).vocab_size == 32000
    assert named_tokenizer("owner/tiny").vocab_size == 32000  # the repo has none: Mistral v0.1, as for its folder
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        named_tokenizer("owner/tokenizer.json")


def test_training_starts_from_a_repo_id(hub, folders):
    from zamba2.train.trainer import TrainConfig, build_model, start_folder

    model = build_model(TrainConfig(data="unused", model="owner/tiny"))
    assert same_weights(model, zamba2.load(folders / "v1"))
    assert same_weights(zamba2.load(start_folder("owner/tiny", "v2")), zamba2.load(folders / "v2"))
    assert start_folder("tiny") is None


def test_no_network_and_not_cached_is_one_line(tmp_path, monkeypatch):
    from helpers.process import free_port

    use_hub(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path / "hf")  # nothing listens there
    with pytest.raises(UserError, match=r"^owner/x: not in the Hugging Face cache .* the Hub cannot be reached$"):
        resolve("owner/x")

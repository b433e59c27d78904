"""Where a model named on the command line (or to `zamba2.load`) lives: a checkpoint folder, or a Hugging Face Hub
repo id ("Zyphra/Zamba2-1.2B-instruct") downloaded into the Hub's cache.

The download is huggingface_hub's `snapshot_download`, so its cache (HF_HOME, HF_HUB_CACHE), offline mode
(HF_HUB_OFFLINE=1), token (HF_TOKEN, `hf auth login`), endpoint (HF_ENDPOINT) and progress bars all apply. Only
the files a checkpoint needs are fetched, never a repo's other weight formats (pytorch_model.bin, GGUF, ONNX).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
               *TOKENIZER_FILES]


def resolve(name: str | os.PathLike, revision: str | None = None, files: list[str] = MODEL_FILES) -> Path:
    """The local folder of `name`: a folder that exists, else the Hub repo `name` at `revision` (default: its
    main branch), downloaded (only `files`, glob patterns) or found in the cache. Every way this fails is a
    one-line UserError: no such folder or repo, a revision the repo lacks, a gated repo, no network."""
    path = Path(name).expanduser()
    if path.is_dir():
        if revision is not None:
            raise UserError(f"{name} is a folder; a revision applies only to a Hugging Face Hub repo id")
        return path
    if path.exists():
        raise UserError(f"{name}: not a folder (a checkpoint is a folder with config.json and safetensors)")
    repo_id = str(name)
    if not _is_repo_id(repo_id):  # a path with a typo, say: no point asking the Hub
        raise UserError(f"{name}: no such folder, and not a Hugging Face Hub repo id (owner/name)")
    return _download(repo_id, revision, files)


def _is_repo_id(name: str) -> bool:
    """owner/name as the Hub spells it. Ids without an owner ("gpt2") exist, but a lone word is far more often a
    folder missing from here than a legacy repo, so it is not sent to the Hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1 and not name.startswith(("./", "../", "~"))


def _download(repo_id: str, revision: str | None, files: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))
    except GatedRepoError:  # before RepositoryNotFoundError: it is one
        raise UserError(f"{repo_id}: a gated repo on the Hugging Face Hub; accept its terms at "
                        f"https://huggingface.co/{repo_id} and log in (`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such folder, and no such model on the Hugging Face Hub (a private repo "
                        "needs a token: `hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id}: the Hugging Face Hub repo has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise UserError(f"{repo_id}{at}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}") from None
    except OSError as e:  # any other HTTP or network failure midway (HfHubHTTPError is an OSError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{repo_id}{at}: download from the Hugging Face Hub failed ({first})") from None


def served_name(name: str | os.PathLike) -> str:
    """What a model goes by (the server's `model` field): a Hub repo id as given; a folder by its name, except that
    a training run's OUT/checkpoint goes by its run (runs/demo/checkpoint -> "demo")."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return str(name)
    path = path.resolve()
    return path.parent.name if path.name == "checkpoint" and path.parent.name else path.name

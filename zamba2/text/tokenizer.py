"""Tokenizer: the checkpoint's own (tokenizer.json or tokenizer.model), else Mistral v0.1's SentencePiece.

Zamba2 uses the Mistral v0.1 vocabulary (32000 pieces, <unk>=0, <s>=1, </s>=2). The `mistral-common`
package ships that SentencePiece model, so folders without a tokenizer (and the demo) need no download.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..hub import TOKENIZER_FILES, resolve


def mistral_v1_model_path() -> Path:
    import mistral_common

    return Path(os.path.dirname(mistral_common.__file__)) / "data" / "tokenizer.model.v1"


class Tokenizer:
    """encode/decode over either a `tokenizers` JSON file or a SentencePiece model."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        if not path.is_file():
            raise FileNotFoundError(f"no such tokenizer file: {path}")
        try:
            self._load(path)
        except ImportError:
            raise
        except Exception as e:  # both libraries raise bare Exception / RuntimeError on a malformed file
            kind = "a tokenizers JSON file" if path.suffix == ".json" else "a SentencePiece model"
            raise UserError(f"{path}: not {kind} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    def _load(self, path: Path) -> None:
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(path))
            self._hf.no_padding()
            self._hf.no_truncation()
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size()
            self.bos_id = self._hf.token_to_id("<s>")
            self.eos_id = self._hf.token_to_id("</s>")
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            self._hf = None
            self.vocab_size = self._sp.vocab_size()
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if self._sp is not None:
            ids = self._sp.encode(text)
        else:  # the JSON's post-processor may add <s> itself: strip it and decide here
            ids = self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            if skip_special:
                ids = [i for i in ids if not self._sp.is_control(i)]
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def piece(self, token: int) -> str:
        """The vocabulary entry of one id, as stored (SentencePiece's "▁" word marker included)."""
        return self._sp.id_to_piece(int(token)) if self._sp is not None else self._hf.id_to_token(int(token))

    def piece_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry (e.g. "</s>"), or None when the vocabulary lacks it."""
        if self._sp is not None:
            i = self._sp.piece_to_id(piece)
            return i if self._sp.id_to_piece(i) == piece else None  # unknown pieces map to <unk>
        return self._hf.token_to_id(piece)

    def stream_decoder(self):
        """A function fed token ids one at a time that returns the new text each adds.

        Decoding the whole sequence and diffing handles SentencePiece's leading-space marker and
        multi-token UTF-8 characters (text is held back while it ends in an incomplete character).
        """
        ids: list[int] = []
        emitted = 0

        def push(token: int) -> str:
            nonlocal emitted
            ids.append(int(token))
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                return ""
            new, emitted = text[emitted:], len(text)
            return new

        return push


def load_tokenizer(folder: str | Path | None = None, model_vocab_size: int | None = None,
                   revision: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint folder, falling back to the Mistral v0.1 model from mistral-common.
    `folder` may be a Hub repo id instead (only its tokenizer files are fetched, at `revision`; see hub.resolve).

    With `model_vocab_size`, a tokenizer with more tokens than the model's embedding is refused: its
    extra ids would fail deep inside the model."""
    names = ("tokenizer.json", "tokenizer.model")
    folder = resolve(folder, revision, TOKENIZER_FILES) if folder is not None else None
    found = [Path(folder) / n for n in names if (Path(folder) / n).exists()] if folder is not None else []
    tok = Tokenizer(found[0] if found else mistral_v1_model_path())
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise UserError(f"{tok.path}: the tokenizer has {tok.vocab_size} tokens but the model only {model_vocab_size}")
    return tok


def named_tokenizer(name: str | None) -> Tokenizer:
    """A `--tokenizer` flag: a tokenizer.json / tokenizer.model file, or a checkpoint folder or Hub repo id (its
    tokenizer, as load_tokenizer finds it); None: Mistral v0.1."""
    if name is not None and (Path(name).is_file() or str(name).endswith((".json", ".model"))):
        return Tokenizer(name)  # a missing file says so, rather than being asked of the Hub
    return load_tokenizer(name)

"""The tokenizer: Mistral v0.1 by default, BOS handling, pieces, streaming decode, and clear errors."""

import pytest

from zamba2.text.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_the_default_is_mistral_v1(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.piece(2) == "</s>" and tok.piece_id("</s>") == 2 and tok.piece_id("no such piece at all") is None


def test_encode_adds_bos_on_request_and_decode_inverts(tok):
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_id and tok.encode("Hello world", add_bos=False) == ids[1:]
    assert tok.decode(ids) == "Hello world"  # BOS is a control piece: skipped


def test_stream_decoder_yields_exactly_the_decoded_text(tok):
    text = "Grüße aus 東京, café!"
    ids = tok.encode(text, add_bos=False)
    push = tok.stream_decoder()
    pieces = [push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # a split character is held back, never shown half


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model"):
        Tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="32000 tokens but the model only 128"):
        load_tokenizer(None, model_vocab_size=128)

"""Token shards on their own (a stand-in tokenizer, no model): prepare, TokenData, the packed loaders."""

import pytest
import torch

from zamba2.model.score import IGNORE
from zamba2.train.data import MixedLoader, PackedLoader, TokenData, prepare


class Letters:
    """A tokenizer stand-in: <s>=1, </s>=2, one id per letter."""

    vocab_size, bos_id, eos_id, path = 40, 1, 2, "letters"

    def encode(self, text: str) -> list[int]:
        return [1] + [3 + (ord(c) - ord("a")) for c in text]


DOCS = ["abc", "", "defgh", "ij", "klmnopq"]  # the empty document is skipped


@pytest.fixture
def folder(tmp_path):
    meta = prepare(DOCS, tmp_path, Letters(), shard_tokens=8)
    assert meta["docs"] == 4 and meta["tokens"] == 5 + 7 + 4 + 9 and meta["dtype"] == "uint16"
    assert [s["docs"] for s in meta["shards"]] == [2, 2]  # a shard closes once it holds shard_tokens
    return tmp_path


def test_shards_read_back_as_one_stream(folder):
    data = TokenData(folder)
    assert data.num_tokens == 25 and data.doc_starts.tolist() == [0, 5, 12, 16]
    assert data.tokens(3, 14).tolist() == [5, 2, 1, 6, 7, 8, 9, 10, 2, 1, 11]  # across the shard boundary
    assert data.split_point(0.25) == 16 and data.split_point(0) == 25
    with pytest.raises(ValueError, match="no training documents"):
        data.split_point(1.0)


def test_rows_mask_the_next_documents_bos_and_restart_doc_ids(folder):
    loader = PackedLoader(TokenData(folder), seq_len=6, batch_size=2)
    batch = loader.next_batch()
    assert batch["input_ids"].tolist() == [[1, 3, 4, 5, 2, 1], [6, 7, 8, 9, 10, 2]]
    assert batch["labels"][0].tolist() == [3, 4, 5, 2, IGNORE, 6]  # </s> -> <s> of the next document: no target
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]


def test_loaders_resume_from_their_state(folder):
    data = TokenData(folder)
    a = MixedLoader(PackedLoader(data, 4, 2), PackedLoader(data, 4, 2, 12), replay=0.5, seed=3)
    a.next_batch()
    state = a.state_dict()
    b = MixedLoader(PackedLoader(data, 4, 2), PackedLoader(data, 4, 2, 12), replay=0.5, seed=99)
    b.load_state_dict(state)
    for _ in range(5):  # wrapping around included
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="need at least seq_len"):
        PackedLoader(data, seq_len=30, batch_size=1)


def test_a_missing_folder_says_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="zamba2 prepare"):
        TokenData(tmp_path)

"""sft.py's pieces without a model: message parsing, the validation split, ChatLoader's order and resume."""

import json

import numpy as np
import pytest

from zamba2.train.sft import ChatLoader, pack, parse_messages, shuffle_split


def test_parse_messages_keeps_role_and_content_only():
    line = json.dumps({"messages": [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant",
                                                                                  "content": "a"}]})
    assert parse_messages(line) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for bad in ("{not json", json.dumps({"messages": []}), json.dumps({"messages": "hi"}), json.dumps([1]),
                json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
                json.dumps({"messages": [{"role": "user", "content": 3}]})):
        assert parse_messages(bad) is None, bad


def test_shuffle_split_is_seeded_and_holds_out_the_fraction():
    items = list(range(20))
    train, val = shuffle_split(items, 0.25, seed=1)
    assert len(val) == 5 and sorted(train + val) == items and (train, val) == shuffle_split(items, 0.25, seed=1)
    assert shuffle_split(items, 0.25, seed=2) != (train, val)
    assert shuffle_split([7], 0.5, seed=0) == ([7], [])  # one item: nothing to hold out
    assert shuffle_split(items, 0.0, seed=0)[1] == []


def test_pack_starts_a_new_row_when_a_conversation_does_not_fit():
    convs = [([1, 5, 6], [False, True, True]), ([1, 7], [False, True]), ([1, 8, 9, 10], [False, False, True, True])]
    rows = pack(convs, seq_len=6, pad_id=0)
    assert [r["input_ids"].tolist() for r in rows] == [[1, 5, 6, 1, 7, 0], [1, 8, 9, 10, 0, 0]]
    assert rows[0]["doc_ids"].tolist() == [0, 0, 0, 1, 1, 2]  # the padding tail is one more document
    assert rows[1]["labels"].tolist() == [-100, 9, 10, -100, -100, -100]


def test_chat_loader_wraps_around_and_resumes():
    rows = [{"input_ids": np.full(4, i), "labels": np.full(4, i), "doc_ids": np.zeros(4, dtype=np.int64)}
            for i in range(3)]
    loader = ChatLoader(rows, batch_size=2, vocab_size=10)
    assert loader.next_batch()["input_ids"][:, 0].tolist() == [0, 1]
    state = loader.state_dict()
    assert loader.next_batch()["input_ids"][:, 0].tolist() == [2, 0]
    loader.load_state_dict(state)
    assert loader.next_batch()["input_ids"][:, 0].tolist() == [2, 0]
    with pytest.raises(ValueError, match="no rows"):
        ChatLoader([], 2, 10)

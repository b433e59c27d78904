"""The request JSON: strict types, unknown fields ignored, unsupported OpenAI fields refused, helpers."""

import pytest

pytest.importorskip("pydantic")
from pydantic import ValidationError  # noqa: E402

from zamba2.serve.protocol import (APIError, ChatRequest, CompletionRequest, Message, TokenizeRequest,  # noqa: E402
                                   usage)


def test_types_are_strict_and_unknown_fields_ignored():
    r = CompletionRequest.model_validate_json('{"prompt": "x", "max_tokens": 5, "unknown": 1}')
    assert r.max_tokens == 5 and r.n == 1 and r.temperature is None
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate_json('{"prompt": "x", "max_tokens": "5"}')  # no coercion
    for bad in ('{"prompt": "x", "top_p": 0}', '{"prompt": "x", "n": 0}', f'{{"prompt": "x", "seed": {2**63}}}'):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate_json(bad)


@pytest.mark.parametrize("field", ['"presence_penalty": 0.5', '"logit_bias": {"1": 2}', '"suffix": "!"',
                                   '"best_of": 3'])
def test_unsupported_openai_fields_are_refused_not_ignored(field):
    with pytest.raises(ValidationError, match="not supported"):
        CompletionRequest.model_validate_json(f'{{"prompt": "x", {field}}}')


def test_stops_drop_empty_strings():
    assert CompletionRequest(prompt="x", stop="").stops == []
    assert CompletionRequest(prompt="x", stop=["a", ""]).stops == ["a"]
    assert CompletionRequest(prompt="x", stop="\n").stops == ["\n"]


def test_messages_reach_the_template_as_plain_dicts():
    m = Message.model_validate({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                        "text": "b"}], "name": "x"})
    assert m.template_dict() == {"role": "user", "content": "ab", "name": "x"}
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"messages": []})


def test_tokenize_takes_exactly_one_input():
    assert TokenizeRequest(prompt="x").prompt == "x"
    for body in ({}, {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}):
        with pytest.raises(ValidationError, match="exactly one"):
            TokenizeRequest.model_validate(body)


def test_error_body_and_usage_shapes():
    e = APIError("bad n", param="n")
    assert e.status == 400 and e.body() == {"error": {"message": "bad n", "type": "invalid_request_error",
                                                      "param": "n", "code": 400}}
    assert usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}

"""Chat text: special tokens written as text, template rendering, and template errors as plain ValueErrors."""

import json

import pytest

from zamba2.errors import UserError
from zamba2.text.chat import (BUILTIN_TEMPLATE, ChatTemplate, ChatTemplateError, TextCodec, chat_template,
                              read_tokenizer_config)
from zamba2.text.tokenizer import load_tokenizer

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(scope="module")
def codec():
    return TextCodec(load_tokenizer(), {"bos_token": "<s>", "eos_token": {"content": "</s>"}})


def test_special_tokens_in_text_encode_to_their_ids(codec):
    tok = codec.tok
    assert codec.encode("<s>hi</s>", add_bos=False) == [tok.bos_id] + tok.encode("hi", add_bos=False) + [tok.eos_id]
    assert codec.encode("hi", add_bos=True) == tok.encode("hi")
    assert codec.token_text(tok.encode("hi there", add_bos=False)[-1]) == " there"  # the word marker as a space


def test_the_builtin_template_renders_role_tagged_turns(codec):
    template = chat_template(None, codec.tok)
    assert template.source == BUILTIN_TEMPLATE
    assert template.render(MESSAGES[:1]) == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    assert template.render(MESSAGES, add_generation_prompt=False) == "<s><|user|>\nhi</s>\n<|assistant|>\nhello</s>\n"


def test_a_checkpoint_template_is_read_from_tokenizer_config(tmp_path, codec):
    assert read_tokenizer_config(tmp_path) == {} and read_tokenizer_config(None) == {}
    default = [{"name": "default", "template": "{{ messages[0]['content'] }}!"}, {"name": "tool_use", "template": "x"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": default}))
    assert chat_template(tmp_path, codec.tok).render(MESSAGES) == "hi!"


def test_template_problems_are_value_errors_not_http_errors(codec):
    assert issubclass(ChatTemplateError, UserError) and issubclass(ChatTemplateError, ValueError)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTemplate({}, codec).render(MESSAGES)
    strict = ChatTemplate({"chat_template": "{% if messages[0]['role'] != 'system' %}"
                                            "{{ raise_exception('a system turn comes first') }}{% endif %}"}, codec)
    with pytest.raises(ChatTemplateError, match="rejected these messages: a system turn comes first"):
        strict.render(MESSAGES)
    with pytest.raises(UserError, match="does not compile"):
        ChatTemplate({"chat_template": "{% for %}"}, codec)

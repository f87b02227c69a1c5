"""vlm.chat against HF ``apply_chat_template(tokenize=False)`` (the reference renderer)."""
from __future__ import annotations

import pytest

import real_models
from vlm.chat import BUILTIN_TEMPLATES, ChatTemplateError, default_template, encode_chat, render

# Gemma 3's published chat template (tokenizer_config.json of google/gemma-3-*-it), used as the reference for
# our built-in Gemma fallback.
GEMMA3_OFFICIAL = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Llama 3(.0) Instruct's published template.
LLAMA3_OFFICIAL = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
                   "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city — returns °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system_user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"}],
    "multi_turn": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "  What is 2+2?  "},
                   {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?\nThanks"}],
    "unicode": [{"role": "user", "content": "Résumé: 我想在苹果工作 <tag> & \"quotes\""}],
    "tool_call": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "{\"temp\": 21}"}],
}


def _hf_tokenizer(**special):
    """A throwaway HF fast tokenizer: apply_chat_template(tokenize=False) only needs its special-token map."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   **special)


@pytest.fixture(scope="module")
def qwen_template():
    from vlm.gguf import GGUFFile
    return GGUFFile(real_models.qwen25_05b()).metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_qwen25_template_matches_hf(qwen_template, conv, gen):
    hf = _hf_tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    msgs = CONVERSATIONS[conv]
    for tools in (None, TOOLS):
        want = hf.apply_chat_template(msgs, chat_template=qwen_template, tools=tools, tokenize=False,
                                      add_generation_prompt=gen)
        got = render(msgs, qwen_template, tools=tools, add_generation_prompt=gen, eos_token="<|im_end|>")
        assert got == want


@pytest.mark.parametrize("conv", ["user", "system_user", "multi_turn", "unicode"])
def test_gemma_fallback_matches_official_template(conv):
    hf = _hf_tokenizer(bos_token="<bos>", eos_token="<eos>")
    msgs = CONVERSATIONS[conv]
    for gen in (True, False):
        want = hf.apply_chat_template(msgs, chat_template=GEMMA3_OFFICIAL, tokenize=False, add_generation_prompt=gen)
        assert render(msgs, None, arch="gemma3", bos_token="<bos>", add_generation_prompt=gen) == want
    mm = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe. "}]}]
    assert render(mm, arch="gemma3", bos_token="<bos>") == hf.apply_chat_template(
        mm, chat_template=GEMMA3_OFFICIAL, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("conv", ["user", "system_user", "multi_turn"])
def test_llama3_fallback_matches_official_template(conv):
    hf = _hf_tokenizer(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    msgs = CONVERSATIONS[conv]
    want = hf.apply_chat_template(msgs, chat_template=LLAMA3_OFFICIAL, tokenize=False, add_generation_prompt=True)
    assert render(msgs, arch="llama", bos_token="<|begin_of_text|>") == want


def test_default_template_choice():
    assert default_template("gemma3") is BUILTIN_TEMPLATES["gemma"]
    assert default_template("qwen2") is BUILTIN_TEMPLATES["chatml"]
    assert default_template("llama", ["<s>", "</s>"]) is BUILTIN_TEMPLATES["chatml"]
    assert default_template("llama", ["<|start_header_id|>"]) is BUILTIN_TEMPLATES["llama3"]
    assert render(CONVERSATIONS["user"], arch="qwen2") == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_template_helpers_and_hf_semantics():
    t = ("{{ tools | tojson }}|{{ {'b': 1, 'a': 'é'} | tojson(indent=2, sort_keys=True) }}|{{ strftime_now('%Y') }}"
         "|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
         "|{% generation %}{{ eos_token }}{% endgeneration %}|{{ messages[0].keys() | list | join(',') }}"
         "|{{ enable_thinking }}")
    msgs = [{"role": "user", "content": "x", "name": None}, {"role": "assistant", "content": "y"}]
    hf = _hf_tokenizer(eos_token="</s>")
    want = hf.apply_chat_template(msgs, chat_template=t, tools=TOOLS, tokenize=False, enable_thinking=False)
    got = render(msgs, t, tools=TOOLS, eos_token="</s>", enable_thinking=False)
    assert got == want
    assert "°C" in got and '"é"' in got  # tojson keeps non-ASCII (ensure_ascii=False)


def test_encode_chat_adds_bos_once():
    from vlm.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(real_models.gemma3_270m())
    ids = encode_chat(tok, CONVERSATIONS["system_user"], arch="gemma3")
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    assert ids[1] == tok.vocab["<start_of_turn>"] and ids[-2:] == tok.encode("model\n", add_special=False)
    assert tok.decode(ids) == render(CONVERSATIONS["system_user"], arch="gemma3", bos_token="<bos>")


# ------------------------------------------------------------------------------------------ bad input
def test_raise_exception_and_bad_input():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render([{"role": "assistant", "content": "hi"}], arch="gemma3")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render(CONVERSATIONS["user"], "{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="list of"):
        render("hello", arch="qwen2")
    with pytest.raises(ChatTemplateError, match="message 0 must be a dict with a 'role'"):
        render([{"content": "no role"}], arch="qwen2")


def test_sandbox_blocks_python_internals():
    import jinja2
    with pytest.raises(jinja2.exceptions.SecurityError):
        render(CONVERSATIONS["user"], "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render(CONVERSATIONS["user"], "{% set ns = namespace(_x=1) %}")

"""Chat templates: ``tokenizer.chat_template`` rendered with jinja2 the way HF ``apply_chat_template`` renders.

Environment (same as transformers' ``_compile_jinja_template``): ``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension and a ``{% generation %}`` block (rendered
as-is), a ``tojson`` filter that does not HTML-escape (``json.dumps(ensure_ascii=False)`` with optional
indent / separators / sort_keys), and globals ``raise_exception(msg)``, ``strftime_now(fmt)``, ``dict`` and a
``namespace`` that refuses underscore names. Messages whose values are ``None`` lose those keys, and
``reasoning_content`` / ``thinking`` / ``reasoning`` are aliased, as HF does before rendering.

When a GGUF has no template (Gemma 3 270M), :func:`default_template` picks a built-in one by architecture:
Gemma (``<start_of_turn>user ... <end_of_turn>``), Llama 3 (header ids) or ChatML (Qwen2, and the generic fallback).

The rendered text contains the special tokens as text (e.g. ``<bos>`` when the template writes ``bos_token``):
tokenize it with ``parse_special=True`` and without adding BOS again -- :func:`encode_chat` does both.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["render", "encode_chat", "default_template", "ChatTemplateError", "BUILTIN_TEMPLATES"]


class ChatTemplateError(ValueError):
    """A template raised (``raise_exception``), failed to parse, or the messages are malformed."""


# ---------------------------------------------------------------------------------------------- built-ins
# Gemma (1/2/3): system text is folded into the first user turn; assistant is called "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(prefix='', msgs=messages) %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] %}"
    "{% set ns.prefix = (sys if sys is string else sys[0]['text']) + '\n\n' %}"
    "{% set ns.msgs = messages[1:] %}"
    "{% endif %}"
    "{% for m in ns.msgs %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if loop.first %}{{ ns.prefix }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] | trim }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BUILTIN_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE}
_ARCH_DEFAULT = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama3", "qwen2": "chatml",
                 "qwen2vl": "chatml", "qwen3": "chatml"}


def default_template(arch: str | None, tokens: Sequence[str] | None = None) -> str:
    """Built-in template for a GGUF architecture without ``tokenizer.chat_template``.

    ``llama`` gets Llama 3's format when the vocabulary has ``<|start_header_id|>`` (or is unknown) and ChatML
    otherwise (e.g. SmolLM); other unknown architectures get ChatML.
    """
    name = _ARCH_DEFAULT.get(arch or "", "chatml")
    if name == "llama3" and tokens is not None and "<|start_header_id|>" not in set(tokens[:200_000]):
        name = "chatml"
    return BUILTIN_TEMPLATES[name]


# ---------------------------------------------------------------------------------------------- environment
class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF assistant-mask marker): renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace() without underscore attributes (no way to reach CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e.message} (line {e.lineno})") from e


_REASONING = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """Only JSON-like data reaches the sandbox (as HF's _plain_template_data)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _normalize(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role', 'content'}} dicts, got "
                                f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with a 'role' key, got {m!r:.80}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(_plain(m))
    return out


# ---------------------------------------------------------------------------------------------- API
def render(messages, template: str | None = None, *, add_generation_prompt: bool = True, bos_token: str = "",
           eos_token: str = "", arch: str | None = None, tools=None, documents=None, **extra) -> str:
    """Render a conversation to prompt text.

    template: a jinja chat template (``tokenizer.chat_template``); None -> :func:`default_template` (arch).
    bos_token / eos_token and ``extra`` (e.g. ``enable_thinking``, ``unk_token``) are visible to the template,
    as HF passes its special-tokens map and extra kwargs.
    """
    if template is None:
        template = default_template(arch)
    if not isinstance(template, str):
        raise ChatTemplateError(f"template must be a str, got {type(template).__name__}")
    msgs = _normalize(messages)
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ChatTemplateError("tools must be JSON-schema dicts")
    ctx = {"bos_token": bos_token, "eos_token": eos_token, **_plain(extra)}
    try:
        return _compile(template).render(messages=msgs, tools=_plain(tools), documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt, **ctx)
    except jinja2.exceptions.SecurityError:
        raise
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e


def encode_chat(tok, messages, *, add_generation_prompt: bool = True, template: str | None = None,
                arch: str | None = None, **extra) -> list[int]:
    """Render with the tokenizer's template (or the built-in one for ``arch``) and tokenize.

    Special-token text in the rendering is parsed; BOS is prepended only when the tokenizer adds BOS and the
    template did not already write it (HF tokenizes chat renderings with add_special_tokens=False).
    """
    template = template or tok.chat_template or default_template(arch, tok.tokens)
    bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
    eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""
    text = render(messages, template, add_generation_prompt=add_generation_prompt, bos_token=bos,
                  eos_token=eos, **extra)
    ids = tok.encode(text, add_special=False, parse_special=True)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids

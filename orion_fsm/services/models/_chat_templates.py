"""Chat templates: format strings that turn (role, content) messages into a model's prompt.

A registry file names a preset or writes its own; only a bare `{content}` is ever substituted.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["CHAT_TEMPLATE_PRESETS", "ChatTemplate", "substitute", "template_fields"]


@dataclass(frozen=True)
class ChatTemplate:
    """Format strings (with `{content}`) that turn (role, content) messages into a prompt."""

    system: str
    user: str
    assistant: str
    assistant_prefix: str

    @classmethod
    def preset(cls, name: str) -> ChatTemplate:
        try:
            return CHAT_TEMPLATE_PRESETS[name]
        except KeyError:
            known = ", ".join(CHAT_TEMPLATE_PRESETS)
            raise KeyError(f"unknown chat template preset {name!r}; known: {known}") from None

    def render(
        self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        formats = {"system": self.system, "user": self.user, "assistant": self.assistant}
        parts: list[str] = []
        for role, content in messages:
            try:
                fmt = formats[role]
            except KeyError:
                raise ValueError(
                    f"unknown message role {role!r}; expected system, user or assistant"
                ) from None
            parts.append(substitute(fmt, content))
        if add_generation_prompt:
            parts.append(self.assistant_prefix)
        return "".join(parts)


def template_fields(fmt: str) -> list[str]:
    """Every replacement field of a template, written back as it appears (`{content:>9}`).

    Only a bare `{content}` may be substituted: a format spec (`{content:>100000000}`), a
    conversion (`{content!r}`) or an attribute (`{content.__class__}`) gives a template the
    power to allocate or to reach into objects, which a registry file must not have.
    """
    fields = []
    for _, name, spec, conversion in string.Formatter().parse(fmt):
        if name is not None and (name != "content" or spec or conversion):
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            fields.append("{" + shown + "}")
    return fields


def substitute(fmt: str, content: str) -> str:
    """`fmt` with each `{content}` replaced and `{{`/`}}` unescaped: str.format without its
    mini-language, so that no template can do more than paste the content in."""
    parts: list[str] = []
    for literal, name, spec, conversion in string.Formatter().parse(fmt):
        parts.append(literal)
        if name is None:
            continue
        if name != "content" or spec or conversion:
            raise ValueError(f"template field {{{name}}} is not {{content}}")
        parts.append(content)
    return "".join(parts)


CHAT_TEMPLATE_PRESETS: Mapping[str, ChatTemplate] = MappingProxyType(
    {
        "chatml": ChatTemplate(
            system="<|im_start|>system\n{content}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
        ),
        "zephyr": ChatTemplate(
            system="<|system|>\n{content}</s>\n",
            user="<|user|>\n{content}</s>\n",
            assistant="<|assistant|>\n{content}</s>\n",
            assistant_prefix="<|assistant|>\n",
        ),
        "llama3": ChatTemplate(
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    }
)

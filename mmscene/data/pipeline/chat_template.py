"""The qwen_1_5 ChatML template of LLaVA-NeXT-Interleave, used when a tokenizer has none.

One template: the encoder hands it to the tokenizer's ``apply_chat_template``; tools that need
the same text without a tokenizer (length statistics, the demo's tokenizer corpus) render it
with :func:`render_chat`, through the same Jinja engine.
"""

from __future__ import annotations

import functools
import json

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# <|im_start|>role\n…<|im_end|>\n per turn; the generation prompt opens an assistant turn.
QWEN_1_5_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def template_with_system_prompt(template: str | None, system_prompt: str | None) -> str:
    """``template`` (default: the ChatML one) that opens with ``system_prompt`` when the messages
    have no system turn, as training's prompts do. Written into exported checkpoints, so that a
    harness sending only the user turn (lmms-eval's ``llava_hf``) renders training's prompt."""
    template = template or QWEN_1_5_TEMPLATE
    if system_prompt is None:
        return template
    # json.dumps gives a string literal Jinja reads back exactly (quotes, newlines, \uXXXX)
    literal = json.dumps(system_prompt)
    return (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        f"{{% set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{% endif %}" + template
    )


def with_system_prompt(conversation: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``{"role", "content"}`` messages, opened by ``system_prompt`` unless the conversation has one."""
    messages = [{"role": t["role"], "content": t["content"]} for t in conversation]
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


@functools.cache
def _compiled(template: str):
    # The sandboxed environment transformers renders chat templates with.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render_chat(
    conversation: list[dict[str, str]],
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
    template: str = QWEN_1_5_TEMPLATE,
) -> str:
    """The text ``template`` makes of a conversation (``<image>`` placeholders left in place)."""
    messages = with_system_prompt(conversation, system_prompt)
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt)

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


# Turns messages whose content is a list of parts (transformers' multimodal chat format:
# {"type": "image"} / {"type": "text", "text": ...}) into the text training renders: images in
# front as "<image> <image>\n" when the text holds no placeholder of its own, else the text alone.
_FLATTEN_PARTS = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
    "{%- else -%}"
    "{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- set n = m['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- if n > 0 and '<image>' not in text -%}"
    "{%- set text = (['<image>'] * n) | join(' ') + '\n' + text -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


def export_chat_template(template: str | None, system_prompt: str | None) -> str:
    """``template`` (default: the ChatML one) as written into exported checkpoints, so that other
    tools render training's prompt: it opens with ``system_prompt`` when the messages have no
    system turn (harnesses such as lmms-eval's ``llava_hf`` send only the user turn), and it
    accepts content given as a list of image / text parts (their chat models do)."""
    template = template or QWEN_1_5_TEMPLATE
    head = _FLATTEN_PARTS
    if system_prompt is not None:
        # json.dumps gives a string literal Jinja reads back exactly (quotes, newlines, \uXXXX)
        literal = json.dumps(system_prompt)
        head += (
            "{% if not messages or messages[0]['role'] != 'system' %}"
            f"{{% set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{% endif %}"
        )
    return head + template


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

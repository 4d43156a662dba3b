"""The encoder's learned turn layout gives exactly what rendering growing prefixes gives.

Every conversation is encoded twice: by ``PromptEncoder`` (layout + one checking render) and by
the reference alone (``_prefix_pieces``, the prefix renders). input_ids, labels, pixel counts and
pooling flags must be equal, or both must raise the same error. A counting wrapper around
``apply_chat_template`` shows which path ran: one render per sample on the fast path.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmscene.data.pipeline import turn_layout
from mmscene.data.pipeline.chat_template import QWEN_1_5_TEMPLATE, render_chat
from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
from mmscene.data.tools.local_tokenizer import train_tokenizer
from mmscene.scenario import Prompt, SkipSample

_TURN = "'<|im_start|>' + message['role'] + '\n' + {content} + '<|im_end|>' + '\n'"
_LOOP = "{{% for message in messages %}}{{{{ {turn} }}}}{{% endfor %}}"
_GEN = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

TRIM = _LOOP.format(turn=_TURN.format(content="(message['content'] | trim)")) + _GEN
SYSTEM_DEFAULT = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are mmscene, a default.<|im_end|>\n' }}{% endif %}" + QWEN_1_5_TEMPLATE
)
# Positional: the newline goes between turns, not after the last; prefixes stay prefixes.
SEPARATED = (
    "{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}{% endif %}"
)
# Content-dependent: each header carries the content's length, which the probe's sentinels do not
# share, so the layout cannot hold and the reference must run.
LENGTH = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|> ' + (message['content'] | length | string) + '\n' }}{% endfor %}" + _GEN
)
# Not prefix-stable: the end marker follows only the last message; both paths must refuse it.
LAST_MARKER = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if loop.last %}{{ '<|endoftext|>' }}{% endif %}{% endfor %}" + _GEN
)

SIZE, PER_IMAGE, PER_POOLED = 28, 3, 2


class CountingTokenizer:
    """The tokenizer with its chat template set and its ``apply_chat_template`` calls counted."""

    def __init__(self, tokenizer, template: str):
        self._tok = tokenizer
        self.chat_template = template
        self.renders = 0

    def apply_chat_template(self, *args, **kwargs):
        self.renders += 1
        return self._tok.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


class ReferenceEncoder(PromptEncoder):
    """The encoder with the layout switched off: prefix renders for every sample."""

    def _layout_pieces(self, messages):
        return None


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [
        render_chat(
            [
                {"role": "user", "content": "<image>\nWhat is the ball's colour? é ü 你好 🙂"},
                {"role": "assistant", "content": "Red, mostly."},
            ]
        )
    ] * 8
    return train_tokenizer(corpus, vocab_size=320)


def encoders(tokenizer, template: str, system_prompt):
    geometry = ImageGeometry(SIZE, tokenizer.convert_tokens_to_ids("<image>"), PER_IMAGE, PER_POOLED)
    fast_tok = CountingTokenizer(tokenizer, template)
    fast = PromptEncoder(fast_tok, geometry, system_prompt=system_prompt)
    reference = ReferenceEncoder(
        CountingTokenizer(tokenizer, template), geometry, system_prompt=system_prompt
    )
    return fast, fast_tok, reference


# ------------------------------------------------------------------------------ conversations
_TEXT = st.text(alphabet="ab cdé你🙂\n\t.?", max_size=12)
_EDGE = st.sampled_from(["", " ", "\n", "  \n", "\t"])


@st.composite
def contents(draw, images: bool) -> str:
    parts = draw(st.lists(st.one_of(_TEXT, st.just("<image>") if images else _TEXT), max_size=4))
    return draw(_EDGE) + "".join(parts) + draw(_EDGE)


@st.composite
def prompts(draw, system: bool = False) -> Prompt:
    roles = draw(st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=6))
    if system and draw(st.booleans()):
        roles = ["system", *roles]
    # Rarely an image in an answer: both paths must raise image_in_answer.
    conversation = [
        {"role": r, "content": draw(contents(images=r == "user" or draw(st.integers(0, 19)) == 0))}
        for r in roles
    ]
    n = sum(t["content"].count("<image>") for t in conversation)
    sizes = draw(st.lists(st.tuples(st.integers(4, 40), st.integers(4, 40)), min_size=n, max_size=n))
    images = [Image.new("RGB", wh, (40 * k % 255, 90, 160)) for k, wh in enumerate(sizes)]
    pooled = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return Prompt("sample", "test", "task", conversation, images, pooled)


def outcome(encoder: PromptEncoder, prompt: Prompt):
    try:
        out = encoder.encode(prompt)
    except (SkipSample, ValueError) as err:
        return ("raised", type(err), getattr(err, "reason", None), str(err))
    return (
        out["input_ids"].tolist(),
        out["labels"].tolist(),
        tuple(out["pixel_values"].shape),
        out["image_pooling"].tolist(),
    )


def fast_renders(encoder, tok, prompt) -> int:
    """Renders of one encode, the role sequence's layout already learned."""
    outcome(encoder, prompt)
    tok.renders = 0
    outcome(encoder, prompt)
    return tok.renders


CHECKS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------ the fast path
@pytest.mark.parametrize("template", [QWEN_1_5_TEMPLATE, SEPARATED], ids=["qwen_1_5", "separated"])
@pytest.mark.parametrize("system_prompt", ["You are a helpful assistant.", None], ids=["system", "none"])
@CHECKS
@given(prompt=prompts(system=True))
def test_verbatim_templates_take_one_render(tokenizer, template, system_prompt, prompt):
    fast, tok, reference = encoders(tokenizer, template, system_prompt)
    assert outcome(fast, prompt) == outcome(reference, prompt)
    answers_images = any(t["role"] == "assistant" and "<image>" in t["content"] for t in prompt.conversation)
    if not answers_images:
        assert fast_renders(fast, tok, prompt) == 1


@CHECKS
@given(prompt=prompts(system=True))
def test_system_prompt_default_in_the_template(tokenizer, prompt):
    fast, tok, reference = encoders(tokenizer, SYSTEM_DEFAULT, None)
    assert outcome(fast, prompt) == outcome(reference, prompt)
    if not any(t["role"] == "assistant" and "<image>" in t["content"] for t in prompt.conversation):
        assert fast_renders(fast, tok, prompt) == 1


# ------------------------------------------------------------------------------ the fallback
@CHECKS
@given(prompt=prompts(system=True))
def test_trimming_template_falls_back_only_on_edge_whitespace(tokenizer, prompt):
    fast, tok, reference = encoders(tokenizer, TRIM, None)
    assert outcome(fast, prompt) == outcome(reference, prompt)
    if any(t["role"] == "assistant" and "<image>" in t["content"] for t in prompt.conversation):
        return
    trimmed = any(t["content"] != t["content"].strip() for t in prompt.conversation)
    renders = fast_renders(fast, tok, prompt)
    assert (renders > 1) == trimmed


@CHECKS
@given(prompt=prompts(system=True))
@example(  # contents as long as their sentinels: the layout holds, one render
    prompt=Prompt(
        "sample",
        "test",
        "task",
        [{"role": "system", "content": " ? "}, {"role": "user", "content": " ? "}],
        [],
        [],
    )
)
def test_content_dependent_template_falls_back(tokenizer, prompt):
    fast, tok, reference = encoders(tokenizer, LENGTH, "You are a helpful assistant.")
    got = outcome(fast, prompt)
    assert got == outcome(reference, prompt)
    assert got[0] != "raised" or got[2] == "image_in_answer"
    if any(t["role"] == "assistant" and "<image>" in t["content"] for t in prompt.conversation):
        return
    ref_tok = reference.tokenizer
    ref_tok.renders = 0
    outcome(reference, prompt)
    # a content whose length is not its sentinel's fails the check and the reference runs; where
    # every length matches (" ? " is as long as the first sentinel), the layout is exact as it is
    messages = fast._messages(prompt.conversation)
    layout_holds = all(len(m["content"]) == len(turn_layout.sentinel(j)) for j, m in enumerate(messages))
    assert fast_renders(fast, tok, prompt) == (1 if layout_holds else 1 + ref_tok.renders)


@CHECKS
@given(prompt=prompts())
def test_template_that_breaks_prefixes_raises_as_before(tokenizer, prompt):
    fast, _, reference = encoders(tokenizer, LAST_MARKER, "You are a helpful assistant.")
    got = outcome(fast, prompt)
    assert got == outcome(reference, prompt)
    assert got[0] == "raised"


def test_layout_is_learned_once_per_role_sequence(tokenizer):
    fast, tok, _ = encoders(tokenizer, QWEN_1_5_TEMPLATE, "You are a helpful assistant.")
    for k in range(5):
        conversation = [
            {"role": "user", "content": f"question {k}"},
            {"role": "assistant", "content": f"answer {k}"},
        ]
        fast.encode(Prompt(f"s{k}", "test", "task", conversation, [], []))
    # one probe (system, user, assistant: 1 + 1 + 2 renders), then one checking render per sample
    assert tok.renders == 4 + 5
    assert list(fast._layouts.values())[0] is not None


def test_sentinels_are_filled_verbatim():
    layout = ((("<a>", 0, "</a>"), ()), (("<b>",), (1, "</b>\n")))
    assert turn_layout.fill(layout, [" x ", "y \n"]) == [("<a> x </a>", "", ""), ("<b>", "y \n</b>", "\n")]

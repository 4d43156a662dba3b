"""Where a chat template puts each message's text, learned once per sequence of roles.

The encoder's reference (``PromptEncoder._prefix_pieces``) finds assistant spans by rendering
growing prefixes of the conversation: two renders per assistant turn, one per other turn. Its
pieces for any conversation with the same roles follow from one run of it on a *probe*: the same
roles with sentinel contents. The real contents are substituted for the sentinels, and each
body is split into target and trailing context exactly as the reference splits it.

That holds for templates that paste contents verbatim and whose layout depends only on the
roles and positions (the probe has the same ones). The encoder checks the first half per sample
(one render of the whole conversation must equal the assembled text) and falls back to the
reference when it does not: templates that trim, rewrite or test the contents.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# Private-use code points: no whitespace for ``trim`` to strip, nothing a template prints itself.
_OPEN, _CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")

# A message's pieces as the reference cuts them: context before, target (labelled), context after.
Pieces = tuple[str, str, str]
# Text with contents left out: literal strings and indices of the message whose content goes there.
Template = tuple[str | int, ...]
# Per message: the context before its body, and the body (target + trailing context).
Layout = tuple[tuple[Template, Template], ...]


def sentinel(index: int) -> str:
    return f"{_OPEN}{index}{_CLOSE}"


def probe(roles: Sequence[str]) -> list[dict[str, str]]:
    """Messages with these roles whose contents are sentinels."""
    return [{"role": role, "content": sentinel(j)} for j, role in enumerate(roles)]


def _parse(text: str) -> Template:
    parts = _SENTINEL.split(text)  # literal, index, literal, index, ..., literal
    return tuple(int(p) if k % 2 else p for k, p in enumerate(parts) if k % 2 or p)


def learn(
    roles: Sequence[str], reference: Callable[[list[dict[str, str]]], list[Pieces]], template: str
) -> Layout | None:
    """The layout of conversations with these roles, or None where the probe cannot tell it."""
    if _OPEN in template or _CLOSE in template:
        return None
    try:
        pieces = reference(probe(roles))
    except Exception:  # noqa: BLE001 - no layout; the reference will raise its own error per sample
        return None
    return tuple((_parse(head), _parse(target + tail)) for head, target, tail in pieces)


def _fill(template: Template, contents: Sequence[str]) -> str:
    return "".join(contents[p] if isinstance(p, int) else p for p in template)


def fill(layout: Layout, contents: Sequence[str]) -> list[Pieces]:
    """The reference's pieces for a conversation with these contents (if the template is verbatim)."""
    out = []
    for head, body in layout:
        text = _fill(body, contents)
        target = text.rstrip()  # content + end-of-turn marker; the trailing newline is context
        out.append((_fill(head, contents), target, text[len(target) :]))
    return out

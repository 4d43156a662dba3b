"""The pre-tokenized form of a sample: its prompts' token ids stored in the shard beside the media.

``mmscene data tokenize`` (:mod:`mmscene.data.tools.pretokenize`) adds one member,
``KEY.tokens.json``, to each sample: for every conversation its plugin can format
(:meth:`~mmscene.scenario.Scenario.prompt_variants`), the ids and target span of each message,
keyed by a hash of the messages (system turn included). Each image is one :data:`IMAGE_MARK`,
expanded to its positions when the sample is encoded, so the form does not depend on the
model's image geometry. The member names the tokenizer it was made with by a fingerprint of the
tokenizer and its chat template; under any other tokenizer it is ignored.

A prompt the member does not hold (plugin options changed since, a formatter drawing variants
it did not list) is tokenized in the loop as before; the encoder counts hits and misses.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

MEMBER = "tokens.json"  # the suffix: KEY.tokens.json
VERSION = 1
IMAGE_MARK = -1  # one per image in stored ids

# Per message: ids with images as IMAGE_MARK, and the [start, end) of its target ids.
StoredTurn = tuple[list[int], tuple[int, int]]


def tokenizer_fingerprint(tokenizer: Any, template: str) -> str:
    """A hash of everything that decides a text's ids: vocabulary, merges, normalisation, added
    tokens (the fast tokenizer's whole definition, less its runtime padding and truncation) and
    the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
    else:  # a slow tokenizer: its vocabulary and added tokens
        definition = {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "added": sorted(str(t) for t in tokenizer.added_tokens_decoder.values()),
        }
    blob = json.dumps({"v": VERSION, "tokenizer": definition, "template": template}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def messages_key(messages: list[dict[str, str]]) -> str:
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def dump(fingerprint: str, variants: dict[str, list[StoredTurn]]) -> bytes:
    """The member's bytes for ``{messages key: per-message (ids, target span)}``."""
    doc = {
        "version": VERSION,
        "tokenizer": fingerprint,
        "variants": {
            key: {"ids": [ids for ids, _ in turns], "target": [list(span) for _, span in turns]}
            for key, turns in variants.items()
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def lookup(
    member: bytes, fingerprint: str, messages: list[dict[str, str]]
) -> tuple[list[StoredTurn] | None, str]:
    """The stored turns of these messages and ``"hit"``, or None and why not (``"stale"``: made
    with another tokenizer or template; ``"miss"``: no such conversation; ``"bad"``: unreadable)."""
    try:
        doc = json.loads(member)
        if doc.get("version") != VERSION or doc.get("tokenizer") != fingerprint:
            return None, "stale"
        variant = doc["variants"].get(messages_key(messages))
        if variant is None:
            return None, "miss"
        turns = [
            (ids, (int(span[0]), int(span[1])))
            for ids, span in zip(variant["ids"], variant["target"], strict=True)
        ]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None, "bad"
    if len(turns) != len(messages):
        return None, "bad"
    return turns, "hit"

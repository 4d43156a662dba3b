"""What ``mmscene data convert`` did: counts per scenario, skip reasons, and automatic fixes.

The report is plain JSON (``OUT/report.json``) so that scripts and the mixer can read it; the skip
reason slugs are stable and documented in ``docs/data-format.md``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

# slug -> meaning. The converter only ever uses these; the docs table is generated from this dict.
SKIP_REASONS: dict[str, str] = {
    "bad_json": "the line (JSONL) is not valid JSON",
    "bad_record": "valid JSON but not a usable record: not an object, wrong field types, bad poses",
    "no_conversation": "no conversation turns (missing, empty, or only a system turn)",
    "bad_roles": "turns do not alternate human/gpt starting with human (optional system first), "
    "end on a human turn, or use an unknown role",
    "no_media": "no image, video or mesh (text-only samples are not converted)",
    "mixed_media": "more than one of image / video / mesh in one record",
    "unsupported_media": "a video or mesh file type the converter cannot store or check",
    "placeholder_mismatch": "number of <image> placeholders differs from the number of images "
    "(video / mesh: more than one placeholder)",
    "path_escapes_root": "a media path (or a mesh's side file) is absolute or leaves --media-root via ..",
    "missing_media": "a media file, or a .mtl / texture / buffer a mesh refers to, does not exist",
    "corrupt_media": "media bytes that do not decode (image, video, mesh or texture)",
    "bomb": "an image claiming more than 178,956,970 pixels (2x PIL's default limit)",
}

# Automatic repairs, counted per written sample.
FIXES: dict[str, str] = {
    "placeholders_prepended": "image record without any <image>: one per image put before the first human turn",
    "question_type_defaulted": "metadata.question_type missing or unknown: set to open-ended",
}

UNKNOWN_SCENARIO = "unknown"


class ConvertReport:
    """Accumulates counts while converting; :meth:`as_dict` is the ``report.json`` document."""

    def __init__(self) -> None:
        self.written: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.skipped_by_scenario: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.fixed: Counter[str] = Counter({name: 0 for name in FIXES})
        self.total = 0

    def add_written(self, scenario: str, fixes: Iterable[str] = ()) -> None:
        self.total += 1
        self.written[scenario] += 1
        self.fixed.update(fixes)

    def add_skipped(self, scenario: str | None, reason: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"undocumented skip reason {reason!r}")
        self.total += 1
        self.skipped[reason] += 1
        self.skipped_by_scenario[scenario or UNKNOWN_SCENARIO][reason] += 1

    def as_dict(self, **extra: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "written": dict(sorted(self.written.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_by_scenario": {
                scenario: dict(sorted(reasons.items()))
                for scenario, reasons in sorted(self.skipped_by_scenario.items())
            },
            "fixed": dict(sorted(self.fixed.items())),
            "total": self.total,
        }
        doc.update(extra)
        return doc

"""The HTML contact sheet of an inspection: self-contained, thumbnails in place of ``<image>``."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from mmscene.data.tools.inspection import (
    THUMB_SIDE,
    Inspection,
    Shown,
    image_captions,
    listed_of,
    media_summary,
    meta_line,
    stats_notes,
    stats_rows,
)
from mmscene.scenario import IMAGE_PLACEHOLDER

# ---------------------------------------------------------------------------------- html
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { margin-top: 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; vertical-align: top; }
td.l, th.l { text-align: left; }
.sample { border: 1px solid #bbb; border-radius: 6px; margin: 1em 0; padding: 0.5em 1em; }
.sample h3 { margin: 0.2em 0; font-size: 1em; } .sample h3 span { font-weight: normal; color: #666; }
.media, .meta { color: #555; font-size: 0.85em; margin: 0.2em 0; }
.turn { display: flex; margin: 0.4em 0; }
.role { min-width: 6em; font-weight: bold; }
.user .role { color: #06c; } .assistant .role { color: #080; } .system .role { color: #a0a; }
.content { white-space: pre-wrap; }
figure { display: inline-block; margin: 2px 4px; vertical-align: middle; text-align: center; }
figure img { height: 128px; border: 1px solid #999; }
figcaption { font-size: 0.7em; color: #555; }
"""


def thumbnail_uri(image: Image.Image, side: int = THUMB_SIDE) -> str:
    """A base64 data URI of a thumbnail: PNG or JPEG, whichever is smaller (flat synthetic
    images compress better as PNG, photos as JPEG)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    candidates = []
    for fmt, mime, kwargs in (
        ("PNG", "image/png", {"optimize": True}),
        ("JPEG", "image/jpeg", {"quality": 85}),
    ):
        buf = io.BytesIO()
        thumb.save(buf, fmt, **kwargs)
        candidates.append((len(buf.getvalue()), mime, buf.getvalue()))
    _, mime, data = min(candidates)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(result: Inspection) -> str:
    e = html.escape
    out = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>mmscene inspect: {e(result.path)}</title><style>{_CSS}</style></head><body>",
        f"<h1>mmscene data inspect: {e(result.path)}</h1>",
        f"<p>{len(result.shards)} shard(s); each sample formatted by its scenario plugin with "
        "<code>random.Random(0)</code>; images stand where their <code>&lt;image&gt;</code> placeholders are.</p>",
        "<h2>Scenarios</h2>",
        _stats_html(result),
    ]
    out += [f"<p class='meta'>{e(note)}</p>" for note in stats_notes(result)]
    out.append("<h2>Samples</h2>")
    for scenario, items in sorted(result.shown.items()):
        for item in items:
            out.append(_sample_html(scenario, item))
    total = sum(sum(s.skipped.values()) for s in result.stats.values())
    out.append(f"<h2>Skipped samples ({listed_of(len(result.skipped), total)})</h2>")
    if result.skipped:
        out.append(
            "<table class='skipped'><tr><th class='l'>key</th><th class='l'>shard</th>"
            "<th class='l'>scenario</th><th class='l'>reason</th><th class='l'>detail</th></tr>"
        )
        for s in result.skipped:
            out.append(
                f"<tr class='skip' data-key='{e(s.key)}' data-reason='{e(s.reason)}'>"
                f"<td class='l'>{e(s.key)}</td><td class='l'>{e(Path(s.shard).name)}</td>"
                f"<td class='l'>{e(s.scenario)}</td><td class='l'>{e(s.reason)}</td><td class='l'>{e(s.detail)}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>none</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _stats_html(result: Inspection) -> str:
    e = html.escape
    cols = (
        "scenario",
        "samples",
        "checked",
        "skipped",
        "measure",
        "min",
        "median",
        "mean",
        "p95",
        "max",
        "tasks",
    )
    rows = ["<table class='stats'><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for row in stats_rows(result):
        cells = []
        for c in cols:
            value = row[c]
            text = (
                f"{value:.1f}" if c == "mean" else f"{value:.0f}" if isinstance(value, float) else str(value)
            )
            cls = " class='l'" if c in ("scenario", "measure", "tasks") else ""
            cells.append(f"<td{cls}>{e(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _sample_html(scenario: str, item: Shown) -> str:
    e = html.escape
    p = item.prompt
    captions = image_captions(item)
    parts = [
        f"<section class='sample' data-scenario='{e(scenario)}' data-key='{e(p.key)}' data-images='{len(p.images)}'>",
        f"<h3>{e(p.key)} <span>{e(scenario)} · {e(p.task)} · {e(p.question_type)} · {e(Path(item.shard).name)}</span></h3>",
        f"<p class='media'>{e(media_summary(item))}</p>",
    ]
    meta = meta_line(item)
    if meta:
        parts.append(f"<p class='meta'>{e(meta)}</p>")
    index = 0
    for turn in p.conversation:
        pieces = turn["content"].split(IMAGE_PLACEHOLDER)
        content = []
        for j, piece in enumerate(pieces):
            content.append(e(piece))
            if j < len(pieces) - 1:
                caption = captions[index]
                content.append(
                    f"<figure><img src='{thumbnail_uri(p.images[index])}' alt='image {index + 1}' "
                    f"title='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>"
                )
                index += 1
        parts.append(
            f"<div class='turn {e(turn['role'])}'><div class='role'>{e(turn['role'])}</div>"
            f"<div class='content'>{''.join(content)}</div></div>"
        )
    parts.append("</section>")
    return "\n".join(parts)

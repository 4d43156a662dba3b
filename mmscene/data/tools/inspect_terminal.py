"""The terminal report of an inspection: conversations, media summaries, statistics (Rich)."""

from __future__ import annotations

from pathlib import Path

from mmscene.data.tools.inspection import (
    Inspection,
    image_captions,
    listed_of,
    media_summary,
    meta_line,
    stats_notes,
    stats_rows,
)
from mmscene.scenario import IMAGE_PLACEHOLDER


# ---------------------------------------------------------------------------------- terminal
def print_report(result: Inspection, console=None) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=140)  # piped output: do not squeeze tables to 80 columns
    console.print(Text(f"{result.path}: {len(result.shards)} shard(s)", style="bold"))
    for scenario, items in sorted(result.shown.items()):
        for item in items:
            p = item.prompt
            body = Text()
            body.append("media: ", style="bold")
            body.append(media_summary(item) + "\n")
            meta = meta_line(item)
            if meta:
                body.append("meta: ", style="bold")
                body.append(meta + "\n")
            captions = iter(image_captions(item))
            for turn in p.conversation:
                style = {"user": "bold cyan", "assistant": "bold green"}.get(turn["role"], "bold magenta")
                body.append(f"\n{turn['role']}: ", style=style)
                parts = turn["content"].split(IMAGE_PLACEHOLDER)
                for j, part in enumerate(parts):
                    body.append(part)
                    if j < len(parts) - 1:
                        body.append(f"[image {next(captions)}]", style="black on yellow")
            title = f"{p.key} · {scenario} · {p.task} · {p.question_type}"
            console.print(Panel(body, title=title, title_align="left", subtitle=Path(item.shard).name))
    if result.skipped:
        total = sum(sum(s.skipped.values()) for s in result.stats.values())
        table = Table(title=f"skipped samples ({listed_of(len(result.skipped), total)})")
        for col in ("key", "shard", "scenario", "reason", "detail"):
            table.add_column(col, overflow="fold")
        for s in result.skipped:
            table.add_row(s.key, Path(s.shard).name, s.scenario, s.reason, s.detail)
        console.print(table)
    console.print(stats_table(result))
    for note in stats_notes(result):
        console.print(note)


def stats_table(result: Inspection):
    from rich.table import Table

    table = Table(title="per scenario: samples and lengths per sample")
    cols = ("scenario", "samples", "checked", "skipped", "measure", "min", "median", "mean", "p95", "max")
    for col in cols:
        table.add_column(col, justify="left" if col in ("scenario", "measure") else "right", no_wrap=True)
    table.add_column("tasks", overflow="fold")
    for row in stats_rows(result):
        table.add_row(
            *(str(row[c]) for c in cols[:5]),
            *(f"{row[c]:.0f}" if c != "mean" else f"{row[c]:.1f}" for c in cols[5:]),
            row["tasks"],
        )
    return table

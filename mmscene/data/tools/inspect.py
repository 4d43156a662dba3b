"""``mmscene data inspect``: look at shard samples the way the model will see them.

Every sample goes through its scenario plugin (``load`` then ``format`` with ``random.Random(0)``),
so what is shown is the interleaved conversation the prompt encoder receives: roles, text and
where each image, video frame or rendered 3D view stands. The terminal gets the conversations
and a media summary; ``--html`` writes a self-contained contact sheet with thumbnails in place of
the ``<image>`` placeholders. Samples a plugin refuses are listed with their skip reason.

For every scenario found, counts and length statistics are computed over up to
``--stats-samples`` samples: text tokens with ``--tokenizer`` (characters without one), plus
image positions at ``--tokens-per-image`` (729 for SigLIP-so400m at 384 px) so that the totals
are what the model's context holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mmscene.data.tools.inspect_html import render_html, thumbnail_uri
from mmscene.data.tools.inspect_terminal import print_report
from mmscene.data.tools.inspection import (
    DEFAULT_TOKENS_PER_IMAGE,
    Inspection,
    image_captions,
    inspect_path,
    media_summary,
    summarize,
)


# ---------------------------------------------------------------------------------- CLI
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="a shard .tar, or a folder of shards (searched recursively)")
    parser.add_argument("--n", type=int, default=2, help="samples shown per scenario (default 2)")
    parser.add_argument("--html", type=Path, help="write a self-contained HTML contact sheet here")
    parser.add_argument(
        "--tokenizer", help="tokenizer folder for token counts (default: the --config's, else characters)"
    )
    parser.add_argument(
        "--scenario", help="read every sample with this plugin instead of the record's own scenario"
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="training YAML: take plugin options (data.scenarios) and data.tokenizer from it",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="SCENARIO.KEY=VALUE",
        help="plugin option, e.g. 3d.num_views=4 (YAML value; repeatable; overrides --config)",
    )
    parser.add_argument(
        "--tokens-per-image", type=int, default=DEFAULT_TOKENS_PER_IMAGE, help="image positions per image"
    )
    parser.add_argument(
        "--tokens-per-pooled-image",
        type=int,
        help="positions per pooled video frame (default: --tokens-per-image)",
    )
    parser.add_argument(
        "--stats-samples",
        type=int,
        default=1000,
        help="samples per scenario decoded for the length statistics (0: all)",
    )


def _parse_options(config: Path | None, pairs: list[str]) -> tuple[dict[str, dict[str, Any]], str | None]:
    import yaml

    options: dict[str, dict[str, Any]] = {}
    tokenizer = None
    if config is not None:
        doc = yaml.safe_load(config.read_text()) or {}
        data = doc.get("data") or {}
        for name, opts in (data.get("scenarios") or {}).items():
            options[str(name)] = dict(opts or {})
        tokenizer = data.get("tokenizer")
    for pair in pairs:
        lhs, sep, value = pair.partition("=")
        name, dot, key = lhs.partition(".")
        if not sep or not dot or not name or not key:
            raise ValueError(f"--option {pair!r}: expected SCENARIO.KEY=VALUE")
        options.setdefault(name, {})[key] = yaml.safe_load(value)
    return options, tokenizer


def inspect_main(args: argparse.Namespace) -> int:
    if args.n < 0 or args.tokens_per_image < 1 or args.stats_samples < 0:
        print("error: --n and --stats-samples must be >= 0, --tokens-per-image >= 1", file=sys.stderr)
        return 2
    try:
        options, config_tokenizer = _parse_options(args.config, args.option)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = None
    tokenizer_path = args.tokenizer or config_tokenizer
    if tokenizer_path:
        # transformers directly: the training data module would pull in Lightning (seconds)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=False)
        except (OSError, ValueError) as err:
            print(f"error: cannot load tokenizer {tokenizer_path}: {err}", file=sys.stderr)
            return 2
    try:
        result = inspect_path(
            args.path,
            n=args.n,
            scenario=args.scenario,
            options=options,
            tokenizer=tokenizer,
            tokens_per_image=args.tokens_per_image,
            tokens_per_pooled_image=args.tokens_per_pooled_image,
            stats_samples=args.stats_samples or None,
        )
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(result)
    if args.html is not None:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(render_html(result), encoding="utf-8")
        print(f"wrote {args.html}")
    usable = sum(len(s.text) for s in result.stats.values())
    return 0 if usable else 1  # nothing usable at all is worth a failing exit status in scripts


__all__ = [
    "Inspection",
    "add_inspect_arguments",
    "image_captions",
    "inspect_main",
    "inspect_path",
    "media_summary",
    "print_report",
    "render_html",
    "summarize",
    "thumbnail_uri",
]

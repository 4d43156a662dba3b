"""``mmscene data inspect``: conversations with their images in place, stats, skipped samples."""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
from mmscene.data.tools.demo import make_demo
from mmscene.data.tools.inspect import add_inspect_arguments, inspect_main, inspect_path, summarize
from mmscene.registry import get_scenario
from mmscene.scenario import IMAGE_PLACEHOLDER
from mmscene.schema import make_record

SCENARIOS = ("3d", "multi_image", "single_image", "video")
PLUGIN_OPTIONS = {"3d": {"num_views": 4, "view_size": 48}}
OPTION_ARGS = ["--option", "3d.num_views=4", "--option", "3d.view_size=48"]
BAD_KEY = "broken-png"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "demo"
    make_demo(out, n_train_per_scenario=4, n_val_per_scenario=2, progress=False)
    # One extra single_image shard: a good sample and one whose PNG is cut in half.
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good, "PNG")
    with wds.TarWriter(str(out / "train" / "single_image" / "shard-000099.tar")) as sink:
        for key, png in (("extra-good", good.getvalue()), (BAD_KEY, good.getvalue()[:60])):
            record = make_record(
                id=key,
                scenario="single_image",
                task="extra",
                question_type="open-ended",
                conversations=[
                    {"role": "user", "content": "<image>\nWhat colour?"},
                    {"role": "assistant", "content": "red"},
                ],
                media=[{"member": "0.png", "type": "image"}],
            )
            sink.write({"__key__": key, "json": json.dumps(record).encode(), "0.png": png})
    return out


def main(argv: list[str]) -> int:
    """``mmscene data inspect ARGS`` through this module's own parser (see the wiring test)."""
    assert argv[:2] == ["data", "inspect"]
    parser = argparse.ArgumentParser()
    add_inspect_arguments(parser)
    return inspect_main(parser.parse_args(argv[2:]))


def test_wired_into_mmscene_cli(demo, capsys):
    from mmscene.cli import main as mmscene_main

    assert mmscene_main(["data", "inspect", str(demo / "val" / "single_image"), "--n", "1"]) == 0
    assert "demo-val-single_image-00000" in capsys.readouterr().out


def _raw_samples(folder: Path) -> dict[str, dict]:
    samples = {}
    for shard in sorted(folder.rglob("*.tar")):
        with open(shard, "rb") as f:
            files = ({**x, "__url__": str(shard)} for x in wds.tariterators.tar_file_iterator(f))
            for sample in wds.tariterators.group_by_keys(files):
                samples[sample["__key__"]] = sample
    return samples


def _expected_prompt(sample: dict):
    """The formatted prompt, computed here without the inspect module."""
    scenario = json.loads(sample["json"])["scenario"]
    plugin = get_scenario(scenario, **PLUGIN_OPTIONS.get(scenario, {}))
    return plugin.format(plugin.load(sample), random.Random(0))


class _Sheet(HTMLParser):
    """Sections of the contact sheet: turns with text and an ``<image>`` where each <img> is."""

    def __init__(self):
        super().__init__()
        self.sections: list[dict] = []
        self.skipped: list[dict] = []
        self._in_content = False
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "")
        if tag == "section" and cls == "sample":
            self.sections.append({**a, "turns": [], "srcs": []})
        elif tag == "div" and cls.startswith("turn ") and self.sections:
            self.sections[-1]["turns"].append({"role": cls.split(" ", 1)[1], "content": ""})
        elif tag == "div" and cls == "content":
            self._in_content = True
        elif tag == "img" and self._in_content:
            self.sections[-1]["turns"][-1]["content"] += IMAGE_PLACEHOLDER
            self.sections[-1]["srcs"].append(a["src"])
        elif tag == "figcaption":
            self._in_caption = True
        elif tag == "tr" and cls == "skip":
            self.skipped.append(a)

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._in_caption = False
        elif tag == "div" and self._in_content and not self._in_caption:
            self._in_content = False

    def handle_data(self, data):
        if self._in_content and not self._in_caption:
            self.sections[-1]["turns"][-1]["content"] += data


def _decode(src: str) -> Image.Image:
    header, payload = src.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64")
    img = Image.open(io.BytesIO(base64.b64decode(payload)))
    img.load()
    return img


def test_html_puts_every_image_in_place_of_its_placeholder(demo, tmp_path, capsys):
    sheet_path = tmp_path / "sheet.html"
    code = main(["data", "inspect", str(demo / "train"), "--n", "2", "--html", str(sheet_path), *OPTION_ARGS])
    assert code == 0
    sheet = _Sheet()
    sheet.feed(sheet_path.read_text(encoding="utf-8"))
    raw = _raw_samples(demo / "train")

    by_scenario: dict[str, list[dict]] = {}
    for section in sheet.sections:
        by_scenario.setdefault(section["data-scenario"], []).append(section)
    assert sorted(by_scenario) == list(SCENARIOS)
    assert all(len(v) == 2 for v in by_scenario.values())

    for section in sheet.sections:
        expected = _expected_prompt(raw[section["data-key"]])
        n_placeholders = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in expected.conversation)
        assert len(section["srcs"]) == n_placeholders == len(expected.images) > 0
        # the same conversation, text for text, with each <img> exactly where its placeholder is
        assert [t["role"] for t in section["turns"]] == [t["role"] for t in expected.conversation]
        assert [t["content"] for t in section["turns"]] == [t["content"] for t in expected.conversation]
        thumbs = [_decode(src) for src in section["srcs"]]
        for thumb, image in zip(thumbs, expected.images):
            # demo media are below the thumbnail size: each thumbnail is its image, in its place
            assert thumb.size == image.size and max(thumb.size) <= 192
            diff = np.abs(np.asarray(thumb.convert("RGB"), float) - np.asarray(image, float))
            assert diff.mean() < 2.0

    # the video's sampled frames (the demo clips have 6) and the 3d sample's 4 rendered views
    for section in by_scenario["video"]:
        assert len(section["srcs"]) == 6
    for section in by_scenario["3d"]:
        views = [_decode(src).convert("RGB") for src in section["srcs"]]
        assert len(views) == 4
        for view in views:
            # the solid is drawn: many pixels differ from the first (background) pixel
            background = view.getpixel((0, 0))
            drawn = sum(px != background for px in view.getdata())
            assert drawn > 0.05 * view.width * view.height


def test_corrupt_sample_is_listed_with_its_reason(demo, tmp_path, capsys):
    sheet_path = tmp_path / "sheet.html"
    assert main(["data", "inspect", str(demo / "train" / "single_image"), "--html", str(sheet_path)]) == 0
    out = capsys.readouterr().out
    assert BAD_KEY in out and "corrupt_media" in out
    sheet = _Sheet()
    sheet.feed(sheet_path.read_text(encoding="utf-8"))
    assert [(s["data-key"], s["data-reason"]) for s in sheet.skipped] == [(BAD_KEY, "corrupt_media")]
    assert BAD_KEY not in {s["data-key"] for s in sheet.sections}

    result = inspect_path(demo / "train" / "single_image", n=10)
    stats = result.stats["single_image"]
    assert (stats.samples, stats.checked, dict(stats.skipped)) == (6, 6, {"corrupt_media": 1})
    assert [s.prompt.key for s in result.shown["single_image"]][-1] == "extra-good"


def test_stats_per_scenario_with_a_tokenizer(demo, capsys):
    tok_dir = demo / "tokenizer"
    args = ["data", "inspect", str(demo / "train"), "--n", "0", "--tokenizer", str(tok_dir)]
    args += ["--tokens-per-image", "16", "--tokens-per-pooled-image", "4", *OPTION_ARGS]
    assert main(args) == 0
    out = capsys.readouterr().out
    for scenario in SCENARIOS:
        assert scenario in out
    assert "text tokens" in out and "characters" not in out

    # the printed figures are those of the prompt encoder, recomputed here
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    image_id = tok.convert_tokens_to_ids("<image>")
    encoder = PromptEncoder(tok, ImageGeometry(32, image_id, 16, 4))
    result = inspect_path(
        demo / "train",
        n=0,
        options=PLUGIN_OPTIONS,
        tokenizer=tok,
        tokens_per_image=16,
        tokens_per_pooled_image=4,
    )
    raw = _raw_samples(demo / "train")
    for scenario in SCENARIOS:
        totals, images = [], []
        for sample in raw.values():
            if json.loads(sample["json"])["scenario"] != scenario or sample["__key__"] == BAD_KEY:
                continue
            prompt = _expected_prompt(sample)
            totals.append(int(encoder.encode(prompt)["input_ids"].numel()))
            images.append(len(prompt.images))
        stats = result.stats[scenario]
        assert sorted(stats.totals) == sorted(totals)
        assert sorted(stats.images) == sorted(images)
        row = summarize(stats.totals)
        line = next(ln for ln in out.splitlines() if "total" in ln and f"{row['mean']:.1f}" in ln)
        assert f"{row['min']:.0f}" in line and f"{row['max']:.0f}" in line
    assert result.stats["video"].image_tokens == [6 * 4] * 4  # pooled frames
    assert result.stats["3d"].image_tokens == [4 * 16] * 4
    assert result.stats["single_image"].samples == 6


def test_without_tokenizer_lengths_are_characters_and_say_so(demo, capsys):
    assert main(["data", "inspect", str(demo / "val" / "video"), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "text chars" in out and "no --tokenizer given" in out
    result = inspect_path(demo / "val" / "video", n=1)
    stats = result.stats["video"]
    assert stats.image_tokens == [6 * 729] * 2  # the default: SigLIP-so400m's 729 per image
    prompt = result.shown["video"][0].prompt
    chatml = "".join(
        f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n"
        for t in [{"role": "system", "content": "You are a helpful assistant."}, *prompt.conversation]
    )
    assert stats.text[0] == len(chatml) - 6 * len(IMAGE_PLACEHOLDER)


def test_single_shard_forced_scenario_and_errors(demo, tmp_path, capsys):
    shard = demo / "val" / "multi_image" / "shard-000000.tar"
    assert main(["data", "inspect", str(shard), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "multi_image" in out and "placement=interleaved" in out

    # --scenario overrides the record's scenario, like a training source's `scenario:`
    assert main(["data", "inspect", str(shard), "--scenario", "no_such_plugin"]) == 1  # nothing usable
    out = capsys.readouterr().out
    assert "no_plugin" in out
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert main(["data", "inspect", str(shard), "--option", "novalue"]) == 2


def test_summarize():
    assert summarize([5, 1, 3, 2, 4]) == {"min": 1.0, "median": 3.0, "mean": 3.0, "p95": 4.8, "max": 5.0}
    assert summarize([])["max"] == 0.0


def test_broken_shards_are_reported_under_the_training_streams_reasons(demo_data, tmp_path):
    import bad_corpus

    folders = bad_corpus.build(demo_data, tmp_path / "corpus")
    expected = {k.split("/", 1)[1]: n for k, n in bad_corpus.EXPECTED.items() if k.startswith("tars/")}
    counts: dict[str, int] = {}
    for folder in folders["tars"]:
        result = inspect_path(folder, n=2, scenario="single_image")
        for skipped in result.skipped:
            counts[skipped.reason] = counts.get(skipped.reason, 0) + 1
    # one report per defect (a cut shard is one report, however many samples it lost)
    assert {reason for reason in counts} == set(expected)
    assert counts["link_member"] == 2 and counts["unsafe_member_name"] == 2 and counts["empty_shard"] == 2

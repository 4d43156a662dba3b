"""A third-party scenario plugin, pip-installed at test time, is found and used by unchanged mmscene.

The plugin is the ``mmscene-doc-pages`` package of ``docs/writing-a-plugin.md``: its files are
copied from the page's code blocks (``<!-- file: PATH -->`` before each), so the guide and this
test cannot drift apart.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from mmscene import registry
from mmscene.data.ingest.convert import convert
from mmscene.data.pipeline.collate import pad_collate
from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
from mmscene.data.pipeline.mixer import MixedBatches, Source
from mmscene.data.tools.local_tokenizer import train_tokenizer
from mmscene.model.core import IGNORE_INDEX
from mmscene.scenario import Scenario

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"
DIST = "mmscene-doc-pages"
TOKENS_PER_IMAGE = 16
# (pages, question, answer); the last document is over the plugin's default max_pages of 8
DOCS = [
    (2, "<image>\n<image>\nWhat is the title?", "Annual report"),
    (3, "<image>\n<image>\n<image>\nWho signed the letter?", "The treasurer"),
    (1, "<image>\nWhat is the total?", "42 euros"),
    (10, "<image>\n" * 10 + "How many pages?", "ten"),
]


def guide_files() -> dict[str, str]:
    blocks = re.findall(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```", GUIDE.read_text(), re.S)
    return dict(blocks)


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _forget_plugin() -> None:
    for name in [m for m in sys.modules if m == "mmscene_doc_pages" or m.startswith("mmscene_doc_pages.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    registry.refresh()


@pytest.fixture(scope="module")
def plugin_package(tmp_path_factory) -> Path:
    """The guide's package, pip-installed into this interpreter for the module's tests."""
    files = guide_files()
    assert {"pyproject.toml", "mmscene_doc_pages/scenario.py", "tests/test_doc_pages.py"} <= set(files)
    pkg = tmp_path_factory.mktemp("plugin") / DIST
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    _forget_plugin()
    if "doc_pages" in registry.available():
        pytest.skip(f"{DIST} is already installed in this environment; not touching it")
    try:
        done = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(pkg))
        assert done.returncode == 0, done.stdout + done.stderr
        _forget_plugin()
        yield pkg
    finally:
        _pip("uninstall", "--yes", DIST)
        _forget_plugin()


@pytest.fixture(scope="module")
def doc_shards(tmp_path_factory) -> Path:
    """LLaVA-style annotations + page images converted by mmscene's own converter."""
    root = tmp_path_factory.mktemp("docs")
    media = root / "media"
    with open(root / "docs.jsonl", "w") as f:
        for d, (n_pages, question, answer) in enumerate(DOCS):
            pages = []
            for p in range(n_pages):
                page = Image.new("RGB", (48 + 8 * p, 64), "white")
                ImageDraw.Draw(page).text((3, 3), f"doc {d}\npage {p + 1}", fill="black")
                rel = f"doc{d}/p{p + 1}.png"
                (media / rel).parent.mkdir(parents=True, exist_ok=True)
                page.save(media / rel)
                pages.append(rel)
            turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            meta = {"dataset": "toy_docvqa", "question_type": "open-ended"}
            f.write(
                json.dumps({"id": f"doc-{d}", "image": pages, "conversations": turns, "metadata": meta})
                + "\n"
            )
    report = convert(
        root / "docs.jsonl", media, root / "shards", scenario="doc_pages", shard_size=10, progress=False
    )
    assert report["written"] == {"doc_pages": len(DOCS)}
    return root / "shards" / "doc_pages"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [
        f"<|im_start|>user\nPage 1: {q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for _, q, a in DOCS
    ]
    return train_tokenizer(texts * 20, vocab_size=400)


def _shard_samples(folder: Path) -> dict[str, dict]:
    samples = {}
    for shard in sorted(folder.glob("*.tar")):
        with open(shard, "rb") as f:
            files = ({**x, "__url__": str(shard)} for x in wds.tariterators.tar_file_iterator(f))
            samples.update({s["__key__"]: s for s in wds.tariterators.group_by_keys(files)})
    return samples


def test_the_guides_package_is_discovered_after_pip_install(plugin_package):
    cls = registry.scenario_class("doc_pages")
    assert issubclass(cls, Scenario) and cls.__module__ == "mmscene_doc_pages.scenario"
    # imported from the installed distribution, not from the folder it was built from
    assert plugin_package not in Path(sys.modules[cls.__module__].__file__).parents
    assert registry.available()["doc_pages"].dist.name == DIST
    for builtin in ("single_image", "multi_image", "video", "3d"):
        assert builtin in registry.available()


def test_mmscene_plugins_lists_it(plugin_package):
    done = subprocess.run(
        [sys.executable, "-m", "mmscene.cli", "plugins"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("doc_pages "))
    assert "mmscene_doc_pages:DocPagesScenario" in line and f"[{DIST}]" in line
    assert "one image per page" in line  # its description, so the class itself was loaded


def test_load_format_and_encode_a_shard_sample(plugin_package, doc_shards, tokenizer):
    plugin = registry.get_scenario("doc_pages")
    sample = _shard_samples(doc_shards)["doc-1"]
    prompt = plugin.format(plugin.load(sample), random.Random(0))
    assert prompt.conversation[0]["content"] == (
        "Page 1: <image>\nPage 2: <image>\nPage 3: <image>\nWho signed the letter?"
    )
    assert [img.size for img in prompt.images] == [(48, 64), (56, 64), (64, 64)]

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    encoder = PromptEncoder(tokenizer, ImageGeometry(32, image_id, TOKENS_PER_IMAGE, 4))
    out = encoder.encode(prompt)
    ids, labels = out["input_ids"], out["labels"]
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    assert int((ids == image_id).sum()) == 3 * TOKENS_PER_IMAGE
    labelled = labels != IGNORE_INDEX
    assert tokenizer.decode(ids[labelled]) == "The treasurer<|im_end|>"
    assert not (labels == image_id).any()


def test_options_and_metrics_come_from_the_plugin(plugin_package):
    plugin = registry.get_scenario("doc_pages", max_pages=4, page_labels=False)  # as data.scenarios does
    assert plugin.options() == {"max_pages": 4, "page_labels": False, "max_pixels": None}
    with pytest.raises(ValueError, match="bad options for scenario 'doc_pages'"):
        registry.get_scenario("doc_pages", max_page=4)
    metric = plugin.metrics("toy_docvqa", "open-ended")["anls"]
    metric.update(
        ["annual report", "The Treasurer ", "41 euros"], ["Annual report", "The treasurer", "42 euros"]
    )
    assert float(metric.compute()) == pytest.approx((1 + 1 + (1 - 1 / 8)) / 3)
    assert "accuracy" in plugin.metrics("toy_docvqa", "multi-choice")


def test_mixed_batches_stream_its_shards(plugin_package, doc_shards, tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    encoder = PromptEncoder(tokenizer, ImageGeometry(32, image_id, TOKENS_PER_IMAGE, 4))
    stream = MixedBatches(
        [Source(shards=str(doc_shards), scenario="doc_pages")],
        {"doc_pages": registry.get_scenario("doc_pages")},
        encoder.encode,
        partial(pad_collate, pad_id=tokenizer.pad_token_id),
        batch_size=2,
    )
    pages = {f"doc-{d}": n for d, (n, _, _) in enumerate(DOCS)}
    batches = [b for b, _ in zip(stream, range(4))]
    for batch in batches:
        keys = [m["key"] for m in batch["meta"]]
        assert {m["scenario"] for m in batch["meta"]} == {"doc_pages"}
        assert "doc-3" not in keys  # 10 pages > max_pages
        assert batch["pixel_values"].shape[0] == sum(pages[k] for k in keys)
        assert int((batch["input_ids"] == image_id).sum()) == TOKENS_PER_IMAGE * sum(pages[k] for k in keys)
    skips = batches[-1]["_data_state"]["state"]["skips"]
    assert skips.get("doc_pages/too_many_pages", 0) >= 1


def test_inspect_shows_its_pages(plugin_package, doc_shards):
    from mmscene.data.tools.inspect import inspect_path, render_html

    result = inspect_path(doc_shards, n=3)
    assert sorted(s.prompt.key for s in result.shown["doc_pages"]) == ["doc-0", "doc-1", "doc-2"]
    assert [(s.key, s.reason) for s in result.skipped] == [("doc-3", "too_many_pages")]
    html = render_html(result)
    assert html.count("<img ") == 2 + 3 + 1 and "Page 3: <figure>" in html


def test_the_plugins_own_tests_pass(plugin_package):
    path = plugin_package / "tests" / "test_doc_pages.py"
    spec = importlib.util.spec_from_file_location("doc_pages_guide_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ran = 0
    for name, fn in vars(module).items():
        if not name.startswith("test_"):
            continue
        marks = getattr(fn, "pytestmark", [])
        cases = [m.args for m in marks if m.name == "parametrize"]
        if cases:  # the guide uses one @pytest.mark.parametrize(("a", "b"), [...])
            ((argnames, values),) = cases
            names = [argnames] if isinstance(argnames, str) else list(argnames)
            for value in values:
                fn(**dict(zip(names, value)))
                ran += 1
        else:
            fn()
            ran += 1
    assert ran >= 5

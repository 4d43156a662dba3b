"""Shard sample → plugin → PromptEncoder → tensors, for every built-in scenario, checked by position.

The data is the tiny demo dataset (real png / mp4 / glb files converted to shards by the real
converter) and the demo tokenizer; the geometry is a 32 px tower with 16 positions per image and
4 per pooled video frame. Corrupt media in shards must be skipped at load time and counted while
the stream goes on.
"""

from __future__ import annotations

import io
import json
import os
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from mmscene_plugins.multi_image import MultiImageScenario
from mmscene_plugins.scene3d import Scene3DScenario
from mmscene_plugins.single_image import SingleImageScenario
from mmscene_plugins.video import VideoScenario
from PIL import Image
from transformers import AutoTokenizer

from mmscene.data.ingest.convert import convert
from mmscene.data.pipeline.chat_template import (
    DEFAULT_SYSTEM_PROMPT,
    QWEN_1_5_TEMPLATE,
    render_chat,
    with_system_prompt,
)
from mmscene.data.pipeline.collate import pad_collate
from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
from mmscene.data.pipeline.mixer import MixedBatches, Source
from mmscene.data.tools.demo import make_demo
from mmscene.data.tools.demo_media import COLOURS, NEUTRAL
from mmscene.data.tools.demo_tasks import ORDINALS
from mmscene.model.core import IGNORE_INDEX
from mmscene.scenario import SkipSample
from mmscene.schema import make_record

SIZE, PER_IMAGE, PER_POOLED = 32, 16, 4
DEMO_FRAMES = 6  # make_demo's default clip length
PLUGINS = {
    "single_image": SingleImageScenario(),
    "multi_image": MultiImageScenario(placement="interleaved"),
    "video": VideoScenario(num_frames=16),  # more than the clip has: every frame once
    "3d": Scene3DScenario(num_views=3, view_size=32),
}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("roundtrip") / "demo"
    make_demo(out, n_train_per_scenario=4, n_val_per_scenario=2, progress=False)
    return out


@pytest.fixture(scope="module")
def tok(demo):
    return AutoTokenizer.from_pretrained(str(demo / "tokenizer"))


@pytest.fixture(scope="module")
def encoder(tok) -> PromptEncoder:
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id != tok.unk_token_id
    return PromptEncoder(tok, ImageGeometry(SIZE, image_id, PER_IMAGE, PER_POOLED))


@pytest.fixture(scope="module")
def multi_turn(demo, tmp_path_factory) -> dict[str, dict]:
    """Multi-turn records converted to shards: images in two user turns; a video with a system turn."""
    folder = tmp_path_factory.mktemp("multi_turn")
    mi = [f"train/multi_image/demo-train-multi_image-00000.{j}.png" for j in range(3)]
    records = [
        {
            "id": "mt-images",
            "image": mi,
            "conversations": [
                {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\nDo they match?"},
                {"from": "gpt", "value": "No, they differ."},
                {"from": "human", "value": "Image 3: <image>\nAnd this one?"},
                {"from": "gpt", "value": "It matches the first."},
            ],
            "metadata": {"dataset": "mt", "question_type": "open-ended"},
        },
        {
            "id": "mt-video",
            "video": "train/video/demo-train-video-00000.mp4",
            "conversations": [
                {"from": "system", "value": "Answer briefly."},
                {"from": "human", "value": "<image>\nWhich way does it move?"},
                {"from": "gpt", "value": "down"},
                {"from": "human", "value": "What shape moves?"},
                {"from": "gpt", "value": "a square"},
                {"from": "human", "value": "Is it fast?"},
                {"from": "gpt", "value": "yes"},
            ],
            "metadata": {"dataset": "mt", "question_type": "open-ended"},
        },
    ]
    ann = folder / "mt.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = convert(ann, demo / "raw" / "media", folder / "shards", progress=False)
    assert report["written"] == {"multi_image": 1, "video": 1}
    return read_samples(folder / "shards")


# ------------------------------------------------------------------------------ helpers
def read_samples(folder: Path) -> dict[str, dict]:
    samples = {}
    for shard in sorted(Path(folder).rglob("*.tar")):
        with open(shard, "rb") as f:
            files = ({**x, "__url__": str(shard)} for x in wds.tariterators.tar_file_iterator(f))
            samples.update({s["__key__"]: s for s in wds.tariterators.group_by_keys(files)})
    return samples


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True as ``[start, end)``."""
    out, start = [], None
    for i, flag in enumerate(mask.tolist() + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i))
            start = None
    return out


def turn_spans(ids: torch.Tensor, tok) -> list[tuple[str, int, int]]:
    """``(role, content start, content end)`` of every ChatML turn, as positions in ``ids``."""
    start_id, end_id = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids = ids.tolist()
    spans = []
    for s, token in enumerate(ids):
        if token != start_id:
            continue
        k = s + 1
        while not tok.decode(ids[s + 1 : k]).endswith("\n"):
            k += 1
        role = tok.decode(ids[s + 1 : k]).strip()
        spans.append((role, k, ids.index(end_id, k)))
    return spans


def collapse_images(ids: torch.Tensor, image_id: int) -> list[int]:
    """input_ids with each run of image positions replaced by one ``<image>`` token."""
    out, prev = [], None
    for token in ids.tolist():
        if not (token == image_id and prev == image_id):
            out.append(token)
        prev = token
    return out


def chatml(conversation: list[dict[str, str]]) -> str:
    turns = list(conversation)
    if not turns or turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    return "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)


def is_text(tok, token: int) -> bool:
    return bool(tok.decode([token]).strip())


def check_roundtrip(prompt, out, tok, image_id) -> None:
    """Everything the encoder promises about one encoded prompt."""
    ids, labels = out["input_ids"], out["labels"]
    n = len(prompt.images)
    per = [PER_POOLED if p else PER_IMAGE for p in prompt.pooled]
    # one run of positions per image, of the image's size, in order; pixels for each image
    assert [e - s for s, e in runs(ids == image_id)] == per
    assert int((ids == image_id).sum()) == sum(per)
    assert out["pixel_values"].shape == (n, 3, SIZE, SIZE)
    assert out["image_pooling"].tolist() == prompt.pooled
    # the text around the images is the chat-templated conversation, token for token
    assert tok.decode(collapse_images(ids, image_id)) == chatml(prompt.conversation)
    # only assistant turns are targets: their content and end-of-turn marker, nothing else
    answers = [t["content"] for t in prompt.conversation if t["role"] == "assistant"]
    labelled = runs(labels != IGNORE_INDEX)
    assert [tok.decode(ids[s:e]) for s, e in labelled] == [a + "<|im_end|>" for a in answers]
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    assistant = [(s, e + 1) for role, s, e in turn_spans(ids, tok) if role == "assistant"]
    assert labelled == assistant
    assert not (labels == image_id).any()


def has_colour(pixels: torch.Tensor, rgb: tuple[int, int, int], tol: float = 40.0) -> bool:
    """Whether the normalised image holds a patch of this colour (mean = std = 0.5 undone)."""
    img = (pixels.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255.0
    close = np.abs(img - np.array(rgb, dtype=np.float32)).max(axis=-1) < tol
    return close.mean() > 0.03


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("scenario", list(PLUGINS))
def test_every_plugin_round_trips_its_shard_samples(demo, tok, encoder, scenario):
    image_id = encoder.geometry.image_token_id
    samples = read_samples(demo / "train" / scenario)
    assert len(samples) == 4
    plugin = PLUGINS[scenario]
    for sample in samples.values():
        record = json.loads(sample["json"])
        prompt = plugin.format(plugin.load(sample), random.Random(0))
        out = encoder.encode(prompt)
        check_roundtrip(prompt, out, tok, image_id)
        expected = {"single_image": 1, "multi_image": 3, "video": DEMO_FRAMES, "3d": 3}[scenario]
        assert len(prompt.images) == expected
        assert prompt.pooled == [scenario == "video"] * expected  # only video frames are pooled
        assert int((out["input_ids"] == image_id).sum()) == expected * (
            PER_POOLED if scenario == "video" else PER_IMAGE
        )
        # the media reached the pixels: the shape's colour is in the tensors
        meta = record["metadata"]
        pixels = out["pixel_values"]
        if scenario in ("single_image", "video"):
            assert all(has_colour(p, COLOURS[meta["colour"]]) for p in pixels)
        elif scenario == "multi_image":  # the odd one out has the odd colour, in image order
            odd = [has_colour(p, COLOURS[meta["odd_colour"]]) for p in pixels]
            palette = {**COLOURS, NEUTRAL[0]: NEUTRAL[1]}
            common = [has_colour(p, palette[meta["colour"]]) for p in pixels]
            assert odd.index(True) == ORDINALS.index(meta["label"]) and sum(odd) == 1
            assert common == [not x for x in odd]
        else:  # rendered views of a shaded solid: not blank, and differently lit from view to view
            assert all(float(p.std()) > 0.05 for p in pixels)


@pytest.mark.parametrize("placement", ["front", "interleaved"])
def test_multi_image_placement_by_position(demo, tok, encoder, placement):
    image_id = encoder.geometry.image_token_id
    plugin = MultiImageScenario(placement=placement)
    for sample in read_samples(demo / "train" / "multi_image").values():
        prompt = plugin.format(plugin.load(sample), random.Random(0))
        assert prompt.meta["placement"] == placement
        out = encoder.encode(prompt)
        check_roundtrip(prompt, out, tok, image_id)
        ids = out["input_ids"]
        ((_, start, end),) = [span for span in turn_spans(ids, tok) if span[0] == "user"]
        images = [i for i in range(start, end) if ids[i] == image_id]
        text = [i for i in range(start, end) if ids[i] != image_id and is_text(tok, int(ids[i]))]
        assert len(images) == 3 * PER_IMAGE and text
        if placement == "front":
            assert max(images) < min(text)  # every image position before the first word
        else:
            assert min(text) < min(images)  # "Image 1:" comes first
            assert any(min(images) < t < max(images) for t in text)  # "Image 2:" between images


@pytest.mark.parametrize("placement", ["front", "interleaved"])
def test_multi_turn_labels_every_assistant_turn(multi_turn, tok, encoder, placement):
    image_id = encoder.geometry.image_token_id
    plugin = MultiImageScenario(placement=placement)
    prompt = plugin.format(plugin.load(multi_turn["mt-images"]), random.Random(0))
    out = encoder.encode(prompt)
    check_roundtrip(prompt, out, tok, image_id)  # two labelled runs: both answers
    ids = out["input_ids"]
    users = [(s, e) for role, s, e in turn_spans(ids, tok) if role == "user"]
    per_turn = [int((ids[s:e] == image_id).sum()) // PER_IMAGE for s, e in users]
    assert per_turn == ([3, 0] if placement == "front" else [2, 1])


def test_multi_turn_video_with_its_own_system_turn(multi_turn, tok, encoder):
    image_id = encoder.geometry.image_token_id
    plugin = VideoScenario(num_frames=4)
    prompt = plugin.format(plugin.load(multi_turn["mt-video"]), random.Random(0))
    out = encoder.encode(prompt)
    check_roundtrip(prompt, out, tok, image_id)
    ids, labels = out["input_ids"], out["labels"]
    spans = turn_spans(ids, tok)
    assert [role for role, _, _ in spans] == ["system"] + ["user", "assistant"] * 3
    assert tok.decode(ids[spans[0][1] : spans[0][2]]) == "Answer briefly."  # not the default prompt
    labelled = runs(labels != IGNORE_INDEX)
    assert [tok.decode(ids[s:e]) for s, e in labelled] == [
        "down<|im_end|>",
        "a square<|im_end|>",
        "yes<|im_end|>",
    ]
    assert int((ids == image_id).sum()) == 4 * PER_POOLED


# ------------------------------------------------------------------------------ corrupt media
def _record(key: str, scenario: str, member: str, media_type: str) -> bytes:
    return json.dumps(
        make_record(
            id=key,
            scenario=scenario,
            task="corrupt",
            question_type="open-ended",
            conversations=[
                {"role": "user", "content": "<image>\nWhat is it?"},
                {"role": "assistant", "content": "x"},
            ],
            media=[{"member": member, "type": media_type}],
        )
    ).encode()


def _bad_samples(demo: Path) -> dict[str, dict]:
    media = demo / "raw" / "media" / "train"
    png = Image.open(media / "single_image" / "demo-train-single_image-00000.png").convert("RGB")
    buf = io.BytesIO()
    png.resize((128, 128)).save(buf, "JPEG", quality=90)
    glb = (media / "3d" / "demo-train-3d-00000.glb").read_bytes()
    garbage_mp4 = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + os.urandom(3000)
    return {
        "single_image": {
            "__key__": "bad-jpeg",
            "json": _record("bad-jpeg", "single_image", "0.jpg", "image"),
            "0.jpg": buf.getvalue()[: len(buf.getvalue()) // 2],  # truncated JPEG
        },
        "video": {
            "__key__": "bad-mp4",
            "json": _record("bad-mp4", "video", "mp4", "video"),
            "mp4": garbage_mp4,
        },
        "3d": {
            "__key__": "bad-mesh",
            "json": _record("bad-mesh", "3d", "glb", "mesh"),
            "glb": glb[: len(glb) // 3],
        },
    }


def test_corrupt_media_is_skipped_at_load_and_counted_while_iteration_goes_on(demo, tmp_path, tok, encoder):
    bad = _bad_samples(demo)
    plugins = {name: PLUGINS[name] for name in bad}
    for name, sample in bad.items():  # each fails in its plugin's load, with the media reason
        with pytest.raises(SkipSample) as err:
            plugins[name].load(sample)
        assert err.value.reason == "corrupt_media"

    good_keys = set()
    around = {}  # scenario -> keys of the good samples just before and just after the bad one
    sources = []
    for name, bad_sample in bad.items():
        good = list(read_samples(demo / "train" / name).values())[:3]
        good_keys |= {s["__key__"] for s in good}
        around[name] = (good[0]["__key__"], good[1]["__key__"])
        folder = tmp_path / name
        folder.mkdir()
        with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
            # the bad sample sits between good ones: the stream must read on past it
            for sample in [good[0], bad_sample, good[1], good[2]]:
                sink.write({k: v for k, v in sample.items() if k != "__url__"})
        sources.append(Source(shards=str(folder), scenario=name))

    stream = MixedBatches(
        sources,
        plugins,
        encoder.encode,
        partial(pad_collate, pad_id=tok.pad_token_id),
        batch_size=3,
        seed=1,
        shuffle_buffer=0,  # in shard order, so that each read's skip can be told apart below
    )
    seen = []
    batches = []
    for batch, _ in zip(stream, range(12)):
        batches.append(batch)
        seen += [m["key"] for m in batch["meta"]]
        assert batch["pixel_values"].shape[0] == int(batch["image_pooling"].numel())
    assert len(seen) == 36  # full batches throughout: skips are replaced by the next samples
    assert set(seen) == good_keys  # every good sample came through, no bad one did
    skips = batches[-1]["_data_state"]["state"]["skips"]
    assert set(skips) == {"single_image/corrupt_media", "video/corrupt_media", "3d/corrupt_media"}
    # counts grow as the streams come round to the bad samples again, never shrink
    counts = [sum(b["_data_state"]["state"]["skips"].values()) for b in batches]
    assert counts == sorted(counts) and counts[-1] >= 3
    # counted exactly once per read: the stream reads the bad sample after every read of the good
    # one before it, and reads it before every read of the good one after it
    for name, (before, after) in around.items():
        assert seen.count(after) <= skips[f"{name}/corrupt_media"] <= seen.count(before)


def test_render_chat_is_the_encoders_template(tok):
    """Tools that measure or train on chat text without a tokenizer see what the encoder tokenizes."""
    conversations = [
        [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    for conversation in conversations:
        for generation in (False, True):
            messages = with_system_prompt(conversation, DEFAULT_SYSTEM_PROMPT)
            expected = tok.apply_chat_template(
                messages, chat_template=QWEN_1_5_TEMPLATE, tokenize=False, add_generation_prompt=generation
            )
            assert render_chat(conversation, add_generation_prompt=generation) == expected
            assert expected == chatml(conversation) + ("<|im_start|>assistant\n" if generation else "")
    assert render_chat(conversations[1]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")

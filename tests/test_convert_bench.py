"""``mmscene data convert`` on LLaVA-Interleave-Bench rows (skimage photos), in JSONL, JSON and Parquet."""

from __future__ import annotations

import argparse
import ast
import base64
import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from fixtures_media import write_photo, write_truncated_jpeg

from mmscene.data.ingest.annotations import PARQUET_BATCH_ROWS, iter_annotations
from mmscene.data.ingest.convert import add_convert_arguments, convert, convert_main
from mmscene.data.ingest.interleave_bench import (
    MULTI_VIEW_SUB_TASKS,
    bench_record,
    bench_scenario,
    is_bench_row,
)
from mmscene.data.tar_reader import Defect, read_shard
from mmscene.registry import get_scenario
from mmscene.scenario import IMAGE_PLACEHOLDER, SkipSample
from mmscene.schema import validate_record

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CORRUPT = b"\xff\xd8\xff\xe0 not a jpeg at all " * 8
# (sample_id, sub_task, question, answer, question_type, {slot: image path}); the last ones are bad
ROWS = [
    (
        "spot_0",
        "Spot-the-Diff",
        "Image 1: <image>\nImage 2: <image>\nWhat changed?",
        "A car left.",
        "open-ended",
        {0: "photos/a.jpg", 1: "photos/b.png"},
    ),
    (
        "nlvr_0",
        "NLVR2_Mantis",
        "Is the left one brighter?\nA. yes\nB. no",
        "A",
        "multi-choice",
        {0: "photos/a.jpg", 1: "photos/c.jpg"},
    ),
    (
        "qbench_0",
        "QBench",
        "<image>\nHow is the quality?\nA. good\nB. bad",
        "B",
        "multi-choice",
        {0: "photos/c.jpg"},
    ),
    (
        "scanqa_0",
        "ScanQA",
        "Where is the chair?",
        "Next to the table.",
        "open-ended",
        {0: "scans/v0.jpg", 2: "scans/v1.jpg", 3: "scans/v2.png"},
    ),
    (
        "birds_0",
        "Birds-to-Words",
        "<image> <image> <image> How do the birds differ?",
        "Colour.",
        "open-ended",
        {0: "photos/c.jpg", 1: "photos/a.jpg", 2: "photos/b.png"},
    ),
    ("missing_0", "QBench", "<image>\nSharp?", "yes", "open-ended", {0: "photos/gone.jpg"}),
    (
        "corrupt_0",
        "Spot-the-Diff",
        "What changed?",
        "nothing",
        "open-ended",
        {0: "photos/a.jpg", 1: "bad/truncated.jpg"},
    ),
    ("escape_0", "NLVR2_Mantis", "True?", "yes", "open-ended", {0: "../outside.jpg"}),
    ("qtype_0", "QBench", "<image>\nGood?", "A", "yes-no", {0: "photos/a.jpg"}),
    ("empty_0", "Spot-the-Diff", "What changed?", "nothing", "open-ended", {}),
    ("count_0", "QBench", "<image> <image> Which?", "A", "multi-choice", {0: "photos/c.jpg"}),
]
GOOD = {"spot_0": "multi_image", "nlvr_0": "multi_image", "qbench_0": "multi_image",
        "scanqa_0": "3d", "birds_0": "multi_image"}  # fmt: skip
REJECTED = [
    ("missing_0", "missing_media"),
    ("corrupt_0", "corrupt_media"),
    ("escape_0", "path_escapes_root"),
    ("qtype_0", "bad_record"),
    ("empty_0", "no_media"),
    ("count_0", "placeholder_mismatch"),
]
FORMS = ["jsonl-paths", "json-paths", "parquet-bytes", "parquet-paths"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "media"
    write_photo(root / "photos/a.jpg", "astronaut")
    write_photo(root / "photos/b.png", "chelsea")
    write_photo(root / "photos/c.jpg", "coffee")
    write_photo(root / "scans/v0.jpg", "camera")
    write_photo(root / "scans/v1.jpg", "rocket")
    write_photo(root / "scans/v2.png", "coffee")
    write_truncated_jpeg(root / "bad/truncated.jpg")
    write_photo(root.parent / "outside.jpg", "astronaut")  # real, but outside the root
    return root


def base_row(row: tuple) -> dict:
    sample_id, sub_task, question, answer, question_type, _ = row
    out = {"sample_id": sample_id, "sub_task": sub_task, "question": question, "answer": answer}
    out["question_type"] = question_type
    if sub_task == "ScanQA":  # multi_view rows carry more fields; they go to metadata
        out["conversations"] = [{"from": "human", "value": question}]
    return out


def slot_value(form: str, root: Path, sample_id: str, path: str):
    if form == "parquet-bytes":
        if sample_id == "corrupt_0" and path.startswith("bad/"):
            return {"bytes": CORRUPT, "path": "corrupt.jpg"}
        if sample_id in ("missing_0", "escape_0"):  # a path, as HF datasets keeps non-embedded images
            return {"bytes": None, "path": path}
        return {"bytes": (root / path).read_bytes(), "path": path}
    if form == "json-paths" and sample_id == "corrupt_0" and path.startswith("bad/"):
        return {"bytes": "this is not base64!"}
    if form == "json-paths" and sample_id == "qbench_0":  # JSON's embedded form: base64
        return {"bytes": base64.b64encode((root / path).read_bytes()).decode(), "path": path}
    return path


def write_bench(form: str, root: Path, path: Path, rows=ROWS, row_group_size: int | None = None) -> Path:
    dicts = []
    for row in rows:
        doc = base_row(row)
        for slot, image in row[5].items():
            doc[f"image_{slot}"] = slot_value(form, root, row[0], image)
        if row[0] == "scanqa_0":
            doc["image_1"] = None  # an empty slot between views
        if row[0] == "empty_0":
            doc["image_0"] = None
        dicts.append(doc)
    if form == "jsonl-paths":
        path.write_text("".join(json.dumps(d) + "\n" for d in dicts))
    elif form == "json-paths":
        path.write_text(json.dumps(dicts, indent=1))
    else:
        image_type = (
            pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            if form == "parquet-bytes"
            else pa.string()
        )
        convs = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
        fields = [
            (name, pa.string()) for name in ("sample_id", "sub_task", "question", "answer", "question_type")
        ]
        fields += [(f"image_{i}", image_type) for i in range(16)] + [("conversations", convs)]
        columns = {name: [d.get(name) for d in dicts] for name, _ in fields}
        table = pa.table(columns, schema=pa.schema(fields))
        pq.write_table(table, path, row_group_size=row_group_size)
    return path


def expected_images(row: tuple, root: Path) -> list[bytes]:
    return [(root / row[5][slot]).read_bytes() for slot in sorted(row[5])]


def read_out(out: Path) -> dict[str, tuple[str, dict, dict]]:
    """id -> (scenario folder, record, sample), through the trainer's own shard reader."""
    found = {}
    for shard in sorted(out.glob("*/shard-*.tar")):
        for _, sample in read_shard(str(shard)):
            assert not isinstance(sample, Defect), sample
            record = json.loads(sample["json"])
            validate_record(record)
            assert record["id"] not in found
            found[record["id"]] = (shard.parent.name, record, sample)
    return found


def convert_form(form: str, root: Path, tmp: Path, **kw) -> tuple[dict, Path]:
    suffix = {"jsonl-paths": ".jsonl", "json-paths": ".json"}.get(form, ".parquet")
    bench = write_bench(form, root, tmp / f"bench{suffix}")
    out = tmp / f"out-{form}"
    return convert(bench, root, out, shard_size=2, progress=False, **kw), out


@pytest.mark.parametrize("form", FORMS)
def test_bench_rows_convert(form, root, tmp_path):
    report, out = convert_form(form, root, tmp_path)
    assert report["written"] == {"3d": 1, "multi_image": 4}
    assert report["skipped"] == dict(sorted(Counter(r for _, r in REJECTED).items()))
    assert report["total"] == len(ROWS)
    assert report["fixed"] == {"placeholders_prepended": 2, "question_type_defaulted": 0}
    assert json.loads((out / "report.json").read_text()) == report

    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejected] == REJECTED
    by_id = {r["id"]: r for r in rejected}
    assert by_id["qtype_0"]["scenario"] == "multi_image" and "yes-no" in by_id["qtype_0"]["detail"]
    assert by_id["empty_0"]["record"]["sample_id"] == "empty_0"
    if form == "parquet-bytes":
        assert by_id["corrupt_0"]["detail"].startswith("image_1: ")
        # embedded bytes are not copied into rejected.jsonl, only their size
        assert by_id["corrupt_0"]["record"]["image_1"]["bytes"] == f"<{len(CORRUPT)} bytes, not kept>"
    if form == "json-paths":
        assert "base64" in by_id["corrupt_0"]["detail"]

    found = read_out(out)
    assert {k: v[0] for k, v in found.items()} == GOOD
    rows = {row[0]: row for row in ROWS}
    for sample_id, (folder, record, sample) in found.items():
        row = rows[sample_id]
        assert record["scenario"] == folder
        assert record["task"] == row[1] == record["metadata"]["sub_task"] == record["metadata"]["dataset"]
        assert record["metadata"]["sample_id"] == sample_id
        assert record["question_type"] == row[4]
        user, assistant = record["conversations"]
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": row[3]}
        n = len(row[5])
        if IMAGE_PLACEHOLDER in row[2]:
            assert user["content"] == row[2]
        else:  # placeholders put in front, whatever separator the converter uses between them
            assert user["content"].endswith(row[2])
            assert user["content"][: -len(row[2])].split() == [IMAGE_PLACEHOLDER] * n
        assert user["content"].count(IMAGE_PLACEHOLDER) == n
        got = [sample[m["member"]] for m in record["media"]]
        assert got == expected_images(row, root), sample_id  # byte for byte, in slot order
        paths = [row[5][slot] for slot in sorted(row[5])]
        assert [m["member"] for m in record["media"]] == [
            f"{i}.{'png' if path.endswith('.png') else 'jpg'}" for i, path in enumerate(paths)
        ]
        assert [m["source"] for m in record["media"]] == paths
    assert found["scanqa_0"][1]["metadata"]["conversations"] == [
        {"from": "human", "value": "Where is the chair?"}
    ]
    assert "conversations" not in found["spot_0"][1]["metadata"]  # null Parquet cells are dropped


def test_forms_give_identical_records(root, tmp_path):
    results = {}
    for form in FORMS:
        _, out = convert_form(form, root, tmp_path)
        found = read_out(out)
        results[form] = {
            k: ({**rec, "source": None}, {m: d for m, d in s.items() if m not in ("json", "__key__")})
            for k, (_, rec, s) in found.items()
        }
        sources = {rec["source"]["index"] for _, rec, _ in found.values()}
        assert sources == {i for i, row in enumerate(ROWS) if row[0] in GOOD}
    first = results["jsonl-paths"]
    for form in FORMS[1:]:
        assert results[form] == first, form


def test_keep_order_and_shuffle_agree(root, tmp_path):
    """The shuffle's spill carries Parquet bytes (as base64) and gives them back exactly."""
    bench = write_bench("parquet-bytes", root, tmp_path / "bench.parquet")
    shuffled_report = convert(bench, root, tmp_path / "s", progress=False, seed=3)
    kept_report = convert(bench, root, tmp_path / "k", progress=False, keep_order=True)
    assert kept_report["options"]["order"] == "annotations"
    assert shuffled_report["options"]["order"] == "shuffled (seed 3)"

    def content(out: Path) -> dict:
        return {
            k: (rec, {m: d for m, d in s.items() if m != "__key__"})
            for k, (_, rec, s) in read_out(out).items()
        }

    assert content(tmp_path / "s") == content(tmp_path / "k")
    convert(bench, root, tmp_path / "w", progress=False, seed=3, workers=2)  # rows pickled to workers
    assert content(tmp_path / "w") == content(tmp_path / "s")
    assert (tmp_path / "s/rejected.jsonl").read_bytes() == (tmp_path / "k/rejected.jsonl").read_bytes()
    assert not list(tmp_path.glob("*/.records.part"))
    # one shard per scenario, samples in annotation order when kept
    order = [
        json.loads(s["json"])["id"] for _, s in read_shard(str(tmp_path / "k/multi_image/shard-000000.tar"))
    ]
    assert order == [row[0] for row in ROWS if GOOD.get(row[0]) == "multi_image"]


def test_parquet_is_streamed_in_batches(root, tmp_path, monkeypatch):
    rows = [(f"q{i}", "QBench", "<image>\nOk?", "A", "multi-choice", {0: "photos/c.jpg"}) for i in range(70)]
    bench = write_bench("parquet-bytes", root, tmp_path / "many.parquet", rows=rows, row_group_size=25)
    assert pq.ParquetFile(bench).metadata.num_row_groups == 3 and len(rows) > 2 * PARQUET_BATCH_ROWS
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kw):
        for batch in real(self, *args, **kw):
            seen.append(batch.num_rows)
            yield batch

    def whole(*args, **kw):
        raise AssertionError("the whole Parquet file was read at once")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    items = list(iter_annotations(bench))
    assert [item.index for item in items] == list(range(70))
    assert max(seen) <= PARQUET_BATCH_ROWS and sum(seen) == 70
    assert items[-1].offset == bench.stat().st_size
    assert items[5].record["image_0"]["bytes"] == (root / "photos/c.jpg").read_bytes()
    report = convert(bench, root, tmp_path / "out", progress=False, shard_size=30)
    assert report["written"] == {"multi_image": 70}
    assert len(list((tmp_path / "out/multi_image").glob("shard-*.tar"))) == 3


def test_plugins_load_bench_samples(root, tmp_path):
    _, out = convert_form("parquet-bytes", root, tmp_path)
    loaded = 0
    for folder, record, sample in read_out(out).values():
        n = len(record["media"])
        plugin = get_scenario("multi_image") if folder == "multi_image" else get_scenario("3d", num_views=n)
        example = plugin.load(sample)
        assert len(example.images) == n
        prompt = plugin.format(example, random.Random(0))
        assert len(prompt.images) == n, record["id"]
        loaded += 1
    assert loaded == len(GOOD)
    # a 3d scene shown in fewer views keeps evenly spaced ones
    (_, _, sample) = read_out(out)["scanqa_0"]
    assert len(get_scenario("3d", num_views=2).load(sample).images) == 2


def test_auto_layout_per_row_and_forced_layouts(root, tmp_path):
    llava = {
        "id": "llava_0",
        "image": ["photos/a.jpg", "photos/b.png"],
        "conversations": [
            {"from": "human", "value": "<image><image>\nSame?"},
            {"from": "gpt", "value": "No."},
        ],
        "metadata": {"dataset": "Mantis", "question_type": "open-ended"},
    }
    bench = {"sample_id": 7, "sub_task": "scannet_task", "question": "Go?", "answer": "Left.",
             "question_type": "Open_Ended", "image_0": "scans/v0.jpg", "image_1": "scans/v1.jpg"}  # fmt: skip
    ann = tmp_path / "mixed.jsonl"
    ann.write_text(json.dumps(llava) + "\n" + json.dumps(bench) + "\n")
    report = convert(ann, root, tmp_path / "auto", progress=False)
    assert report["written"] == {"3d": 1, "multi_image": 1} and report["options"]["layout"] == "auto"
    found = read_out(tmp_path / "auto")
    assert found["7"][1]["metadata"]["sample_id"] == 7 and found["7"][1]["question_type"] == "open-ended"
    assert found["7"][1]["task"] == "scannet_task" and found["7"][0] == "3d"  # sub_task matched in any case

    report = convert(ann, root, tmp_path / "llava", progress=False, layout="llava")
    assert report["written"] == {"multi_image": 1} and report["skipped"] == {"no_conversation": 1}
    report = convert(ann, root, tmp_path / "bench", progress=False, layout="interleave-bench")
    assert report["written"] == {"3d": 1} and report["skipped"] == {"bad_record": 1}
    with pytest.raises(ValueError, match="layout"):
        convert(ann, root, tmp_path / "x", progress=False, layout="m4")


def test_row_mapping():
    row = {"sample_id": "a", "sub_task": "ALFRED", "question": "q", "answer": "x", "question_type": "open-ended",
           "image_0": "v.jpg", "image_1": None, "image_2": {"bytes": b"raw", "path": None}, "image_3": b"b",
           "image_4": {"bytes": None, "path": "w.jpg"}, "image_5": {"bytes": None, "path": None}, "other": 1}  # fmt: skip
    assert is_bench_row(row) and bench_scenario(row) == "3d"
    record = bench_record(row)
    images = record["image"]
    assert images[0] == "v.jpg" and images[3] == "w.jpg" and len(images) == 4
    assert (images[1].data, images[1].source, images[2].data, images[2].source) == (
        b"raw",
        "image_2",
        b"b",
        "image_3",
    )
    assert record["metadata"] == {
        "other": 1, "dataset": "ALFRED", "sub_task": "ALFRED", "sample_id": "a", "question_type": "open-ended"
    }  # fmt: skip
    assert not is_bench_row({k: v for k, v in row.items() if not k.startswith("image_")})
    assert not is_bench_row({"id": 1, "image": "a.jpg", "conversations": []})
    assert bench_scenario({**row, "sub_task": "BLINK"}) == "multi_image"
    for bad, reason in [
        ({"image_0": "not base64"}, None),
        ({"image_0": {"bytes": "%%%"}}, "corrupt_media"),
        ({"image_0": 5}, "bad_record"),
        ({"image_0": {"pixels": [1]}}, "bad_record"),
        ({"image_16": "x.jpg"}, "bad_record"),
        ({"question_type": None}, "bad_record"),
        ({"sub_task": 3}, "bad_record"),
    ]:
        try:
            bench_record({**row, **bad})
        except SkipSample as skip:
            assert skip.reason == reason, bad
        else:
            assert reason is None, bad  # a plain string is a path, never guessed to be base64


def test_multi_view_sub_tasks_are_lmms_evals():
    # read from the source, not imported: importing lmms_eval sets PIL's LOAD_TRUNCATED_IMAGES
    # for the whole process, which the media checks of later tests refuse
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lmms-eval is installed by `make test`")
    utils = Path(spec.submodule_search_locations[0]) / "tasks/llava_interleave_bench/utils.py"
    lists = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(utils.read_text()).body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.List)
        and isinstance(node.targets[0], ast.Name)
    }
    names = ("scan_qa", "alfred", "nuscenes", "scannet_chat", "scannet_task")
    assert {sub_task for name in names for sub_task in lists[name]} == MULTI_VIEW_SUB_TASKS
    every = {sub_task for values in lists.values() for sub_task in values}
    assert len(every) > 30 and {"Spot-the-Diff", "NLVR2_Mantis", "QBench"} <= every
    assert {
        sub_task for sub_task in every if bench_scenario({"sub_task": sub_task}) == "3d"
    } == MULTI_VIEW_SUB_TASKS


def test_cli_parquet_and_missing_pyarrow(root, tmp_path, monkeypatch, capsys):
    bench = write_bench("parquet-bytes", root, tmp_path / "bench.parquet")
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    args = parser.parse_args(
        [
            str(bench),
            "--media-root",
            str(root),
            "--out",
            str(tmp_path / "out"),
            "--layout",
            "auto",
            "--no-progress",
        ]
    )
    assert convert_main(args) == 0
    assert json.loads((tmp_path / "out/report.json").read_text())["written"] == {"3d": 1, "multi_image": 4}

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        convert(bench, root, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()  # refused before OUT is made
    args.out = tmp_path / "none2"
    assert convert_main(args) == 2
    assert "pip install pyarrow" in capsys.readouterr().err
    # JSON input needs no pyarrow
    ann = write_bench("jsonl-paths", root, tmp_path / "bench.jsonl")
    assert convert(ann, root, tmp_path / "json", progress=False)["written"] == {"3d": 1, "multi_image": 4}

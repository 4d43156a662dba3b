"""Property-based fuzzing of everything that reads untrusted bytes.

- annotation records through ``mmscene data convert``: a written sample or a rejected line with a
  reason slug, never another exception, and nothing read outside the media root;
- random and mutated media bytes through the load-time decoders and every plugin's ``load``:
  a sample or :class:`SkipSample`, never another exception or a hang;
- random and mutated shards through :func:`read_shard` and :class:`ShardStream`: samples or
  counted defects, never another exception, indices strictly increasing.

CI runs a small, derandomized profile; ``MMSCENE_SLOW=1`` runs many more examples with a random
seed (hypothesis prints the failing example and the ``@reproduce_failure`` blob).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import random
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from fixtures_media import (
    write_glb,
    write_obj,
    write_photo,
    write_ply,
    write_png_bomb,
    write_truncated_jpeg,
    write_video,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmscene_plugins.multi_image import MultiImageScenario
from mmscene_plugins.scene3d import Scene3DScenario
from mmscene_plugins.single_image import SingleImageScenario
from mmscene_plugins.video import VideoScenario

import mmscene.data.ingest.records as records_mod
from mmscene.data.ingest.annotations import MAX_NESTING
from mmscene.data.ingest.convert import convert
from mmscene.data.ingest.shard_writer import ShardWriter
from mmscene.data.media import decode as media
from mmscene.data.pipeline.stream import ShardStream
from mmscene.data.tar_reader import Defect, read_shard
from mmscene.scenario import SkipSample
from mmscene.skips import SkipCounter

SLOW = os.environ.get("MMSCENE_SLOW") == "1"
settings.register_profile(
    "mmscene-fuzz",
    max_examples=20,
    deadline=5000,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "mmscene-fuzz-slow", parent=settings.get_profile("mmscene-fuzz"), deadline=20000, derandomize=False
)
PROFILE = settings.get_profile("mmscene-fuzz-slow" if SLOW else "mmscene-fuzz")
SLOW_FACTOR = 25
# a skip's reason: a stable slug that reports count by
SLUG = re.compile(r"^[a-z][a-z0-9_]*$")
# a decoder that takes longer than this on one input is hung: dump every thread and exit
HANG_S = 120


def fuzz(examples: int) -> settings:
    """The profile with ``examples`` examples (times SLOW_FACTOR under MMSCENE_SLOW=1)."""
    return settings(PROFILE, max_examples=examples * (SLOW_FACTOR if SLOW else 1))


@contextlib.contextmanager
def no_hang():
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# -- shared inputs -----------------------------------------------------------------------------
class Blob(bytes):
    """Bytes that hypothesis reports by size, not content, in a falsifying example."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


class Real(dict):
    def __repr__(self) -> str:
        return f"<real media: {sorted(self)}>"


class Files:
    """Real media written once per module; ``root`` is the media root, ``outside`` lies beside it."""

    def __init__(self, base: Path):
        self.base = base
        self.root = base / "root"
        self.outside = base / "outside"
        root = self.root
        write_photo(root / "img/a.jpg", "astronaut", (32, 32))
        write_photo(root / "img/b.png", "chelsea", (24, 16))
        write_photo(root / "img/png_named.jpg", "rocket", (16, 16))
        write_truncated_jpeg(root / "img/trunc.jpg")
        write_png_bomb(root / "img/bomb.png")
        (root / "img/empty.jpg").write_bytes(b"")
        (root / "img/junk.png").write_bytes(os.urandom(300))
        write_video(root / "vid/clip.mp4")
        (root / "vid/junk.mp4").write_bytes(os.urandom(500))
        write_obj(root / "mesh", "model", "tex.png")
        write_glb(root / "mesh/ball.glb")
        write_ply(root / "mesh/cyl.ply")
        (root / "mesh/list.gltf").write_text("[1, 2]")
        (root / "mesh/num.gltf").write_text('{"buffers": 5}')
        (root / "mesh/deep.gltf").write_text("[" * 5000 + "]" * 5000)
        (root / "mesh/esc.gltf").write_text('{"buffers": [{"uri": "../../outside/secret.bin"}]}')
        (root / "mesh/esc.obj").write_text(
            "mtllib ../../outside/secret.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"
        )
        (root / "mesh/abs.obj").write_text(f"mtllib {self.outside / 'secret.mtl'}\nv 0 0 0\n")
        (root / "mesh/esc.mtl").write_text("newmtl m\nmap_Kd ../../outside/secret.png\n")
        (root / "mesh/esc2.obj").write_text("mtllib esc.mtl\nusemtl m\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
        (root / "mesh/esc.ply").write_text(
            "ply\nformat ascii 1.0\ncomment TextureFile ../../outside/secret.png\n"
            "element vertex 1\nproperty float x\nproperty float y\nproperty float z\nend_header\n0 0 0\n"
        )
        (root / "mesh/junk.stl").write_bytes(os.urandom(200))
        (root / "mesh/huge.off").write_text("OFF\n1000000000 1000000000 0\n0 0 0\n")
        # the media a record must never reach
        write_photo(self.outside / "secret.png", "coffee", (20, 20))
        (self.outside / "secret.mtl").write_text("newmtl m\nKd 1 0 0\n")
        (self.outside / "secret.bin").write_bytes(b"\0" * 64)
        self.secrets = [p.read_bytes() for p in self.outside.iterdir()]
        self.media = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        self.hostile = [
            "../outside/secret.png",
            "img/../../outside/secret.png",
            str(self.outside / "secret.png"),
            "/etc/passwd",
            "img/a.jpg\x00.png",
            "img/\x00",
            "C:\\Windows\\win.ini",
            "\\\\server\\share\\x.jpg",
            "./img/a.jpg",
            "img//b.png",
            "img/",
            ".",
            "..",
            "~/x.jpg",
            "img/a.jpg/..",
            "mesh/../img/a.jpg",
            "\ud800.jpg",
            "img/A.JPG",
        ]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("fuzz"))


# -- 1. annotation records through the converter -------------------------------------------------
REASONS = {
    "bad_json",
    "bad_record",
    "no_conversation",
    "bad_roles",
    "no_media",
    "mixed_media",
    "unsupported_media",
    "placeholder_mismatch",
    "path_escapes_root",
    "missing_media",
    "corrupt_media",
    "bomb",
}
ODD_TEXT = ["<image>", "<image><image>", "\ud800", "\x00", "é", "\u202e", "\ufeff", "<IMAGE>", "<image", "\n"]
text = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(ODD_TEXT)), max_size=4).map("".join)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), text
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=8,
)


def paths(files: Files):
    one = st.one_of(st.sampled_from(files.media), st.sampled_from(files.hostile), text)
    return st.one_of(one, st.lists(one, max_size=4), junk)


roles = st.one_of(
    st.sampled_from(["human", "gpt", "system", "user", "assistant", "Human", "GPT", "bot"]), junk
)


def turn():
    return st.one_of(
        st.fixed_dictionaries({"from": roles, "value": st.one_of(text, junk)}),
        st.fixed_dictionaries({"role": roles, "content": text}),
        junk,
    )


def well_formed_turns():
    """Mostly valid conversations (so records get as far as the media checks)."""
    return st.integers(1, 3).flatmap(
        lambda n: st.tuples(st.booleans(), st.lists(text, min_size=2 * n, max_size=2 * n)).map(
            lambda sv: (
                ([{"from": "system", "value": "be brief"}] if sv[0] else [])
                + [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(sv[1])]
            )
        )
    )


def records(files: Files):
    media_field = st.sampled_from(["image", "video", "mesh"])
    fields = {
        "id": st.one_of(text, junk),
        "sample_id": junk,
        "conversations": st.one_of(well_formed_turns(), st.lists(turn(), max_size=4), junk),
        "metadata": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "dataset": st.one_of(st.sampled_from(["ScanQA", "nuscenes", "x"]), junk),
                    "question_type": st.one_of(
                        st.sampled_from(["mcq", "multiple_choice", "Open Ended"]), junk
                    ),
                    "up_axis": junk,
                },
            ),
            junk,
        ),
        "poses": junk,
        "extra": junk,
    }

    def build(parts):
        base, kinds, values = parts
        record = dict(base)
        for kind, value in zip(kinds, values):
            record[kind] = value
        return record

    base = st.fixed_dictionaries({}, optional=fields)
    kinds = st.lists(media_field, max_size=2, unique=True)
    record = st.tuples(base, kinds, st.lists(paths(files), min_size=2, max_size=2)).map(build)
    return st.one_of(record, record, junk)


def _check_conversion(files: Files, out: Path, n_records: int, report: dict, reads: list[str]) -> None:
    root = os.path.realpath(files.root)
    for path in reads:
        assert os.path.realpath(path).startswith(root + os.sep), f"read {path!r} outside the media root"
    assert report["total"] == n_records
    # JSON Lines end at "\n" only (str.splitlines would also split at U+0085, U+2028 ...)
    lines = (out / "rejected.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    rejected = [json.loads(line.decode("utf-8")) for line in lines[:-1]]
    assert len(rejected) == sum(report["skipped"].values())
    assert sorted(r["index"] for r in rejected) == [r["index"] for r in rejected]
    for entry in rejected:
        assert entry["reason"] in REASONS, entry
    written = 0
    for shard in out.glob("*/shard-*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                assert data not in files.secrets, f"{member.name} holds a file from outside the media root"
                if member.name.endswith(".json"):
                    written += 1
                    record = json.loads(data)
                    for item in record["media"]:
                        source = item["source"]
                        assert not os.path.isabs(source) and ".." not in source.split("/"), source
                        assert (files.root / source).is_file()
    assert written == sum(report["written"].values())


def _run_convert(files: Files, lines: list[bytes], as_array: bool, keep_order: bool):
    work = Path(tempfile.mkdtemp(dir=files.base))
    try:
        ann = work / ("a.json" if as_array else "a.jsonl")
        ann.write_bytes(b"[" + b",\n".join(lines) + b"]" if as_array else b"\n".join(lines) + b"\n")
        reads: list[str] = []
        real_read = records_mod.read_file

        def recording_read(path: str) -> bytes:
            reads.append(path)
            return real_read(path)

        with mock.patch.object(records_mod, "read_file", recording_read), no_hang():
            report = convert(ann, files.root, work / "out", progress=False, keep_order=keep_order, seed=1)
        _check_conversion(files, work / "out", len(lines), report, reads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _encode(value) -> bytes:
    return json.dumps(value).encode("ascii")  # escapes keep lone surrogates representable


@given(data=st.data(), as_array=st.booleans(), keep_order=st.booleans())
@fuzz(60)
def test_convert_only_writes_or_rejects_with_a_reason(files, data, as_array, keep_order):
    recs = data.draw(st.lists(records(files), min_size=1, max_size=5))
    lines = [_encode(r) for r in recs]
    if not as_array:
        # JSON Lines may also hold lines that are not JSON at all
        raw = st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b and b.strip())
        lines += data.draw(st.lists(raw.filter(lambda b: not b.lstrip().startswith(b"[")), max_size=2))
        if lines[0].lstrip(b"\xef\xbb\xbf \t").startswith(b"["):
            return  # a file whose first character is '[' is a JSON array by definition
    _run_convert(files, lines, as_array, keep_order)


@pytest.mark.parametrize(
    "record",
    [
        {"id": "surrogate", "image": "img/a.jpg", "metadata": {"k": "\ud800"}},
        {"id": "\ud800" * 70, "image": "img/a.jpg"},
        {"id": "\ud800"},
        {"id": "list-gltf", "mesh": "mesh/list.gltf"},
        {"id": "num-gltf", "mesh": "mesh/num.gltf"},
        {"id": "deep-gltf", "mesh": "mesh/deep.gltf"},
    ],
    ids=[
        "surrogate-in-metadata",
        "long-surrogate-id",
        "surrogate-id-rejected",
        "gltf-list",
        "gltf-number",
        "gltf-deep",
    ],
)
def test_convert_regressions(files, record):
    record = {**record, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    _run_convert(files, [_encode(record)], as_array=False, keep_order=False)
    _run_convert(files, [_encode(record)], as_array=True, keep_order=True)


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 5000])
def test_convert_rejects_records_nested_too_deeply(files, tmp_path, depth):
    line = b'{"id": "deep", "metadata": {"k": ' + b"[" * depth + b"]" * depth + b"}}"
    ann = tmp_path / "a.jsonl"
    ann.write_bytes(line + b"\n")
    report = convert(ann, files.root, tmp_path / "out", progress=False)
    assert report["skipped"] == {"bad_json": 1}
    ann = tmp_path / "a.json"  # read past without being built: the next element still converts
    ann.write_bytes(b"[" + line + b", " + _encode({"id": "after"}) + b"]")
    report = convert(ann, files.root, tmp_path / "out2", progress=False)
    assert report["skipped"] == {"bad_json": 1, "no_conversation": 1}
    rejected = [json.loads(x) for x in (tmp_path / "out2" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in rejected] == [(0, "bad_json"), (1, "no_conversation")]


# -- 2. media bytes through the decoders and the plugins -------------------------------------------
def mutated(data: bytes):
    """Truncations, bit flips, overwritten runs and cut-out spans of ``data``."""
    n = len(data)
    head = min(n, 4096)  # headers live here: mutate them more often

    def flip(args):
        b = bytearray(data)
        for pos, bit in args:
            b[pos % n] ^= 1 << bit
        return bytes(b)

    def overwrite(args):
        pos, chunk = args
        return data[:pos] + chunk + data[pos + len(chunk) :]

    def splice(args):
        a, k = args
        return data[:a] + data[a + k :]

    return st.one_of(
        st.integers(0, n).map(lambda k: data[:k]),
        st.integers(0, n // 512).map(lambda k: data[: 512 * k]),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=16).map(flip),
        st.lists(st.tuples(st.integers(0, head - 1), st.integers(0, 7)), min_size=1, max_size=8).map(flip),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=64)).map(overwrite),
        st.tuples(st.integers(0, n), st.integers(1, max(1, n // 4))).map(splice),
    )


def hostile(data: bytes):
    return st.one_of(st.binary(max_size=2048), mutated(data), mutated(data))


@pytest.fixture(scope="module")
def real(files) -> dict[str, bytes]:
    root = files.root
    out = {
        "jpg": (root / "img/a.jpg").read_bytes(),
        "png": (root / "img/b.png").read_bytes(),
        "mp4": (root / "vid/clip.mp4").read_bytes(),
        "glb": (root / "mesh/ball.glb").read_bytes(),
        "obj": (root / "mesh/model.obj").read_bytes(),
        "mtl": (root / "mesh/model.mtl").read_bytes(),
        "tex": (root / "mesh/tex.png").read_bytes(),
        "ply": (root / "mesh/cyl.ply").read_bytes(),
    }
    import trimesh

    box = trimesh.creation.box()
    out["off"] = box.export(file_type="off").encode()
    out["stl"] = box.export(file_type="stl")
    out["gltf"] = trimesh.Scene(box).export(file_type="gltf")
    return Real(out)


@given(data=st.data(), kind=st.sampled_from(["jpg", "png"]))
@fuzz(80)
def test_decode_image_gives_an_rgb_image_or_a_skip(real, data, kind):
    blob = data.draw(hostile(real[kind]))
    with no_hang():
        try:
            img = media.decode_image(blob)
        except SkipSample as skip:
            assert SLUG.match(skip.reason), skip.reason
            return
    assert img.mode == "RGB" and img.width * img.height <= media.MAX_IMAGE_PIXELS


@given(data=st.data(), num_frames=st.integers(1, 4), fps=st.sampled_from([None, 0.5, 30.0]))
@fuzz(15)
def test_decode_video_gives_frames_or_a_skip(real, data, num_frames, fps):
    blob = data.draw(hostile(real["mp4"]))
    with no_hang():
        try:
            frames, times = media.decode_video(blob, num_frames, fps, max_frames=4)
        except SkipSample as skip:
            assert SLUG.match(skip.reason), skip.reason
            return
    assert 1 <= len(frames) <= 4 and len(times) == len(frames)
    assert all(f.mode == "RGB" for f in frames)


def test_decode_video_bounds_memory_before_decoding_the_batch(real, monkeypatch):
    import decord

    asked: list[int] = []
    real_get_batch = decord.VideoReader.get_batch

    def get_batch(self, indices):
        asked.append(len(indices))
        return real_get_batch(self, indices)

    monkeypatch.setattr(decord.VideoReader, "get_batch", get_batch)
    frames, _ = media.decode_video(real["mp4"], 2, None)  # 1280x720
    assert len(frames) == 2 and asked == [2]
    monkeypatch.setattr(media, "MAX_VIDEO_PIXELS", 3 * 1280 * 720)
    with pytest.raises(SkipSample, match="bomb"):
        media.decode_video(real["mp4"], 4, None)
    assert asked == [2], "the frames were decoded before their size was checked"


MESH_HEADERS = st.one_of(
    st.integers(0, 2**40).map(
        lambda n: (
            f"ply\nformat ascii 1.0\nelement vertex {n}\nproperty float x\nproperty float y\n"
            f"property float z\nelement face {n}\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n"
            "3 0 0 0\n".encode()
        )
    ),
    st.integers(0, 2**40).map(
        lambda n: (
            f"ply\nformat binary_little_endian 1.0\nelement vertex {n}\nproperty float x\n"
            f"property float y\nproperty float z\nend_header\n".encode()
            + b"\0" * 24
        )
    ),
    st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)).map(
        lambda vf: f"OFF\n{vf[0]} {vf[1]} 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n".encode()
    ),
    st.integers(0, 2**32 - 1).map(lambda n: b"\0" * 80 + n.to_bytes(4, "little") + b"\0" * 100),
)


@given(data=st.data(), kind=st.sampled_from(["glb", "obj", "ply", "off", "stl", "gltf"]))
@fuzz(60)
def test_load_mesh_gives_geometry_or_a_skip(real, data, kind):
    assets: dict[str, bytes] = {}
    if kind == "obj":
        assets = {"model.mtl": data.draw(hostile(real["mtl"])), "tex.png": data.draw(hostile(real["tex"]))}
    if kind == "gltf":
        source = real["gltf"]
        (doc_name,) = [k for k in source if k.endswith(".gltf")]
        assets = {k: v for k, v in source.items() if k != doc_name}
        blob = data.draw(hostile(source[doc_name]))
    else:
        blob = data.draw(st.one_of(hostile(real[kind]), MESH_HEADERS))
    with no_hang():
        try:
            geometry = media.load_mesh(blob, kind, assets)
        except SkipSample as skip:
            assert SLUG.match(skip.reason), skip.reason
            return
    assert media._vertex_count(geometry) > 0


def test_load_mesh_refuses_faces_past_the_vertex_buffer(real):
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=1)
    glb = trimesh.Scene(mesh).export(file_type="glb")
    # the face accessor's bytes hold uint8/16/32 indices: make one point past the 42 vertices
    faces = mesh.faces.astype(np.uint32).tobytes()
    start = (
        glb.find(faces[:12])
        if glb.find(faces[:12]) >= 0
        else glb.find(mesh.faces.astype(np.uint16).tobytes()[:6])
    )
    assert start > 0
    broken = glb[:start] + b"\xff" + glb[start + 1 :]
    with pytest.raises(SkipSample, match="corrupt_media"):
        media.load_mesh(broken, "glb")


@pytest.mark.parametrize("texture", ["truncated", "bomb", "junk"])
def test_mesh_textures_are_checked_when_the_mesh_is_loaded(real, tmp_path, texture):
    if texture == "bomb":
        tex = write_png_bomb(tmp_path / "bomb.png", 12_000, 12_000).read_bytes()  # < 2x PIL's own limit
    elif texture == "truncated":
        tex = real["tex"][: len(real["tex"]) // 2]
    else:
        tex = b"\x89PNG\r\n\x1a\n" + b"x" * 40
    assets = {"model.mtl": real["mtl"], "tex.png": tex}
    if texture == "junk":  # PIL cannot open it: trimesh drops the texture, the mesh stays usable
        assert media._vertex_count(media.load_mesh(real["obj"], "obj", assets)) > 0
        return
    with pytest.raises(SkipSample, match="bomb" if texture == "bomb" else "corrupt_media"):
        media.load_mesh(real["obj"], "obj", assets)


def _record(scenario: str, media_items: list[dict], **extra) -> dict:
    return {
        "schema_version": 1,
        "id": "k",
        "scenario": scenario,
        "task": "t",
        "question_type": "open-ended",
        "conversations": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}],
        "media": media_items,
        "metadata": {},
        **extra,
    }


def _plugin_samples(real):
    """(plugin, a valid sample) for each plugin and media kind."""
    image = [{"member": "0.jpg", "type": "image"}]
    two = [{"member": "0.jpg", "type": "image"}, {"member": "1.png", "type": "image"}]
    obj = [{"member": "obj", "type": "mesh", "assets": {"model.mtl": "asset0.mtl", "tex.png": "asset1.png"}}]
    views = {"num_views": 2, "view_size": 16}
    return {
        "single_image": (
            SingleImageScenario(),
            {"json": _record("single_image", image), "0.jpg": real["jpg"]},
        ),
        "multi_image": (
            MultiImageScenario(),
            {"json": _record("multi_image", two), "0.jpg": real["jpg"], "1.png": real["png"]},
        ),
        "video": (
            VideoScenario(num_frames=2),
            {"json": _record("video", [{"member": "mp4", "type": "video"}]), "mp4": real["mp4"]},
        ),
        "3d_views": (
            Scene3DScenario(**views),
            {"json": _record("3d", two), "0.jpg": real["jpg"], "1.png": real["png"]},
        ),
        "3d_glb": (
            Scene3DScenario(**views),
            {"json": _record("3d", [{"member": "glb", "type": "mesh"}]), "glb": real["glb"]},
        ),
        "3d_obj": (
            Scene3DScenario(**views),
            {
                "json": _record("3d", obj),
                "obj": real["obj"],
                "asset0.mtl": real["mtl"],
                "asset1.png": real["tex"],
            },
        ),
    }


PLUGIN_CASES = ["single_image", "multi_image", "video", "3d_views", "3d_glb", "3d_obj"]
record_junk = st.dictionaries(
    st.sampled_from(
        ["id", "task", "question_type", "conversations", "media", "metadata", "poses", "schema_version"]
    ),
    junk,
    max_size=2,
)


@pytest.mark.parametrize("case", PLUGIN_CASES)
@given(data=st.data())
@fuzz(25)
def test_plugin_load_gives_an_example_or_a_skip(real, case, data):
    plugin, template = _plugin_samples(real)[case]
    sample = {"__key__": "k"}
    for member, value in template.items():
        if member == "json":
            record = {**value, **data.draw(record_junk)}
            hostile_media = isinstance(record["media"], list) and all(
                isinstance(m, dict) for m in record["media"]
            )
            if hostile_media and data.draw(st.booleans()):  # odd members, assets, types
                record["media"] = [
                    {
                        **m,
                        **data.draw(
                            st.dictionaries(st.sampled_from(["member", "type", "assets"]), junk, max_size=1)
                        ),
                    }
                    for m in record["media"]
                ]
            encoded = _encode(record)
            sample["json"] = data.draw(st.one_of(st.just(encoded), st.just(encoded), mutated(encoded)))
        elif member == "mp4" or data.draw(st.booleans()):
            sample[member] = data.draw(hostile(value))
        else:
            sample[member] = value
    if data.draw(st.booleans()):
        sample.pop(data.draw(st.sampled_from(sorted(sample))))
    with no_hang():
        try:
            example = plugin.load(sample)
        except SkipSample as skip:
            assert SLUG.match(skip.reason), skip.reason
            return
    assert example.images or example.frames


@pytest.mark.parametrize("case", PLUGIN_CASES)
def test_plugin_load_accepts_the_untouched_sample(real, case):
    """The fuzzer's templates are valid: a fuzzer that only ever saw skips would test nothing."""
    plugin, template = _plugin_samples(real)[case]
    sample = {"__key__": "k", **{k: _encode(v) if k == "json" else v for k, v in template.items()}}
    example = plugin.load(sample)
    assert example.images or example.frames


@pytest.mark.parametrize(
    "patch",
    [
        {"metadata": "zz"},
        {"media": [{"member": "obj", "type": "mesh", "assets": {"model.mtl": ["x"]}}]},
        {"json": b"[" * 100_000},
    ],
    ids=["metadata-not-object", "asset-member-not-string", "deep-json"],
)
def test_plugin_regressions(real, patch):
    plugin, template = _plugin_samples(real)["3d_obj"]
    sample = {"__key__": "k", **template}
    sample["json"] = patch["json"] if "json" in patch else _encode({**template["json"], **patch})
    with pytest.raises(SkipSample):
        plugin.load(sample)


# -- 3. shards through the tar reader and the stream ---------------------------------------------
@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("shard")
    with ShardWriter(folder, 100) as writer:
        rng = random.Random(0)
        for i in range(6):
            members = [("json", b'{"i": %d}' % i), ("0.jpg", rng.randbytes(100 + 700 * i)), ("txt", b"x" * i)]
            writer.write(f"s{i}", members)
    return Blob((folder / "shard-000000.tar").read_bytes())


NAMES = st.one_of(
    st.sampled_from(["a.json", "a.jpg", "b.json", "a.JSON", "dir/c.json", "noext", ".hidden", "a.", "a..b"]),
    st.sampled_from(["../a.json", "/abs.json", "x/../../a.json", "C:/a.json", "..\\a.json", "a/./b.txt"]),
    st.text(min_size=1, max_size=120),
)
TYPES = st.sampled_from(
    [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE]
    + [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.CONTTYPE]
)


def built_tars():
    """Tars written member by member: random names (``../``, absolute, unicode), links, special files."""
    member = st.tuples(
        NAMES, TYPES, st.binary(max_size=300), st.sampled_from(["a.json", "../x", "/etc/passwd"])
    )

    def build(args):
        fmt, members = args
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, kind, data, target in members:
                if fmt == tarfile.USTAR_FORMAT and len(name.encode("utf-8", "replace")) > 100:
                    continue  # USTAR cannot hold long names (GNU and PAX can)
                info = tarfile.TarInfo(name)
                info.type = kind
                if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = target
                if info.isreg():
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                else:
                    tar.addfile(info)
        return buf.getvalue()

    fmts = st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
    return st.tuples(fmts, st.lists(member, max_size=8)).map(build)


def shards(base: bytes):
    return st.one_of(
        mutated(base), mutated(base), built_tars(), built_tars().flatmap(mutated), st.binary(max_size=2048)
    )


def _write_tar(folder: Path, data: bytes) -> str:
    path = folder / "shard-000000.tar"
    path.write_bytes(data)
    return str(path)


@given(data=st.data(), start=st.integers(0, 3))
@fuzz(150)
def test_read_shard_gives_samples_or_defects_in_order(shard, tmp_path_factory, data, start):
    blob = data.draw(shards(shard))
    folder = tmp_path_factory.mktemp("rs", numbered=True)
    path = _write_tar(folder, blob)
    last = start - 1
    with no_hang():
        for index, item in read_shard(path, start):
            assert index > last, (index, last)
            last = index
            if isinstance(item, Defect):
                assert item.reason
                continue
            assert isinstance(item["__key__"], str)
            assert all(isinstance(v, bytes) for k, v in item.items() if k != "__key__")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("cut", [512, 1536])  # in the data of s0.json, of s0.0.jpg
def test_read_shard_cut_among_skipped_samples_loses_nothing_before_start(shard, tmp_path, cut):
    path = _write_tar(tmp_path, shard[:cut])
    items = list(read_shard(path, start=2))
    assert [(i, d.reason, d.fatal) for i, d in items] == [(2, "truncated_shard", True)]


@given(data=st.data(), shuffle=st.booleans(), n_slices=st.integers(1, 3))
@fuzz(40)
def test_shard_stream_gives_samples_or_counted_skips(shard, tmp_path_factory, data, shuffle, n_slices):
    folder = tmp_path_factory.mktemp("ss", numbered=True)
    with ShardWriter(folder, 3) as writer:  # an index (shards.json), so cut shards count their losses
        for i in range(6):
            writer.write(f"s{i}", [("json", b"{}"), ("txt", b"x" * i)])
    paths = sorted(str(p) for p in folder.glob("shard-*.tar"))
    for p in paths:
        if data.draw(st.booleans()):
            Path(p).write_bytes(data.draw(shards(Path(p).read_bytes())))
    if data.draw(st.booleans()):
        extra = folder / "extra.tar"
        extra.write_bytes(data.draw(shards(shard)))
        paths.append(str(extra))
    skips = SkipCounter()
    stream = ShardStream(paths, 0, n_slices, seed=0, name="s", skips=skips, shuffle=shuffle, buffer_size=4)
    got = 0
    with no_hang():
        try:
            for sample in stream:
                assert isinstance(sample["__key__"], str) and sample["__shard__"] in paths
                got += 1
                if got >= 20:
                    break
        except RuntimeError as err:  # every shard unreadable: the stream says so rather than spin
            assert "no readable samples" in str(err)
            assert skips.total > 0
    shutil.rmtree(folder, ignore_errors=True)

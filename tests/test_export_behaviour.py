"""An exported Llava behaves like the trained core: same pixels, same <image> expansion, same answers.

mmscene's side is its own data path (``PromptEncoder`` with the model's ``ImageGeometry``, then
``MultimodalLM.generate``); the exported side is transformers alone (``LlavaProcessor`` and
``LlavaForConditionalGeneration`` loaded from the export directory). Both get the same raw PIL
images: scikit-image photos cropped to non-square shapes, a grayscale one and a transparent one.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import skimage.data
import torch
from helpers import tiny_text_config, tiny_vision_config
from PIL import Image
from transformers import CLIPVisionConfig, LlavaForConditionalGeneration, LlavaProcessor

from mmscene import CheckpointError, MultimodalConfig, MultimodalLM
from mmscene.data.media.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalisation
from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT
from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
from mmscene.data.tools.local_tokenizer import train_tokenizer
from mmscene.model import save_pretrained
from mmscene.model.config import hf_config_dict
from mmscene.model.export_hf import DROPPED_POOLING_FIELD
from mmscene.scenario import Prompt

SIZE = 42  # a 3x3 patch grid at patch 14
NEW_TOKENS = 8


def tiny_clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=14,
        projection_dim=16,
    )


TOWERS = {  # name -> (vision config, vision_feature_select, positions per image)
    "siglip-full": (lambda: tiny_vision_config(image_size=SIZE), "full", 9),
    "siglip-default": (lambda: tiny_vision_config(image_size=SIZE), "default", 8),
    "clip-default": (tiny_clip_config, "default", 9),  # CLS dropped
    "clip-full": (tiny_clip_config, "full", 10),  # CLS kept
}


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["What differs between these pictures?", "A cat, a cup of coffee and a rocket."] * 20
    return train_tokenizer(corpus, vocab_size=320)  # ChatML template, <image> among its specials


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    cat = Image.fromarray(skimage.data.chelsea())  # 451x300, landscape
    portrait = Image.fromarray(np.ascontiguousarray(skimage.data.astronaut()[:, 120:360]))  # 240x512
    gray = Image.fromarray(skimage.data.camera()[100:400, :])  # mode L, 512x300
    rgba = np.dstack(
        [skimage.data.coffee()[::4, ::4], np.tile(np.linspace(0, 255, 150, dtype=np.uint8), (100, 1))]
    )
    return [cat, portrait, gray, Image.fromarray(rgba, "RGBA")]  # the last: 150x100, half transparent


def build(tower: str, tokenizer, **kw) -> MultimodalLM:
    vision, select, _ = TOWERS[tower]
    torch.manual_seed(0)
    cfg = MultimodalConfig(
        vision=hf_config_dict(vision()),
        text=hf_config_dict(tiny_text_config()),
        vision_feature_select=select,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **kw,
    )
    model = MultimodalLM(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero and logits flat; make answers depend on input
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.tokenizer = tokenizer
    return model


def prompt_of(images: list[Image.Image]) -> Prompt:
    text = "".join(f"Image {i + 1}: <image>\n" for i in range(len(images))) + "What differs?"
    return Prompt(
        key="k",
        scenario="multi_image",
        task="t",
        conversation=[{"role": "user", "content": text}],
        images=list(images),
        pooled=[False] * len(images),
    )


def chatml_text(processor: LlavaProcessor, prompt: Prompt) -> str:
    """The prompt rendered by the exported processor's own chat template, one <image> per image."""
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *prompt.conversation]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("pad", [True, False], ids=["pad", "no-pad"])
@pytest.mark.parametrize("tower", list(TOWERS))
def test_exported_llava_answers_like_mmscene(tmp_path, tokenizer, images, tower, pad):
    model = build(tower, tokenizer)
    assert model.tokens_per_image() == TOWERS[tower][2]
    save_pretrained(model, tmp_path, format="llava-hf", pad_to_square=pad)

    # mmscene: the training data path
    encoder = PromptEncoder(tokenizer, ImageGeometry.of(model, pad_to_square=pad))
    prompt = prompt_of(images)
    ours = encoder.encode_for_generation(prompt)
    ids, pixels = ours["input_ids"][None], ours["pixel_values"]

    # transformers: only what the export directory holds
    processor = LlavaProcessor.from_pretrained(tmp_path, backend="pil")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    theirs = processor(text=chatml_text(processor, prompt), images=images, return_tensors="pt")

    torch.testing.assert_close(theirs["pixel_values"], pixels, atol=1e-5, rtol=0)
    assert theirs["input_ids"].tolist() == ids.tolist()  # <image> expanded to the core's count
    image_id = model.config.image_token_id
    assert int((ids == image_id).sum()) == len(images) * model.tokens_per_image()

    with torch.no_grad():
        torch.testing.assert_close(hf(**theirs).logits, model(ids, pixels).logits, atol=1e-5, rtol=0)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = model.generate(ids, pixels, **greedy)[0].tolist()
    exported = hf.generate(**theirs, **greedy)[0, ids.shape[1] :].tolist()
    assert exported == answer and len(answer) == NEW_TOKENS


def test_padding_and_normalisation_reach_the_pixels(tokenizer, images):
    """The settings the comparison above relies on are not no-ops: padding shows the mean colour
    at the borders of a landscape photo, and CLIP towers normalise with OpenAI's mean/std."""
    clip = build("clip-default", tokenizer)
    assert normalisation(clip.config.vision_config.model_type) == {
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    }
    siglip = build("siglip-full", tokenizer)
    prompt = prompt_of(images[:1])  # 451x300: padded rows at top and bottom
    for model in (clip, siglip):
        padded = PromptEncoder(tokenizer, ImageGeometry.of(model, True)).encode_for_generation(prompt)
        plain = PromptEncoder(tokenizer, ImageGeometry.of(model, False)).encode_for_generation(prompt)
        mean = torch.tensor(normalisation(model.config.vision_config.model_type)["image_mean"])
        std = torch.tensor(normalisation(model.config.vision_config.model_type)["image_std"])
        pad_value = (torch.tensor([int(m * 255) for m in mean.tolist()]) / 255 - mean) / std
        torch.testing.assert_close(padded["pixel_values"][0, :, 0, SIZE // 2], pad_value, atol=1e-5, rtol=0)
        assert not torch.allclose(plain["pixel_values"][0, :, 0, SIZE // 2], pad_value, atol=1e-2)


def test_unknown_tower_has_no_silent_normalisation():
    with pytest.raises(ValueError, match="no image normalisation known for vision tower model_type 'dinov2'"):
        normalisation("dinov2")


def test_frame_pooling_is_refused_unless_dropped_loudly(tmp_path, tokenizer, images, caplog):
    model = build("siglip-full", tokenizer, frame_pool_stride=2)
    with pytest.raises(CheckpointError, match=r"frame_pool_stride=2.*--drop-frame-pooling"):
        save_pretrained(model, tmp_path / "refused", format="llava-hf")
    assert not (tmp_path / "refused" / "config.json").exists()

    with caplog.at_level(logging.WARNING, logger="mmscene.model.export_hf"):
        save_pretrained(model, tmp_path / "hf", format="llava-hf", drop_frame_pooling=True)
    assert "WITHOUT FRAME POOLING" in caplog.text
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config[DROPPED_POOLING_FIELD] == 2
    # Images that are not video frames are untouched by pooling: the export answers as trained.
    processor = LlavaProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    encoder = PromptEncoder(tokenizer, ImageGeometry.of(model))
    prompt = prompt_of(images[:2])
    ours = encoder.encode_for_generation(prompt)
    theirs = processor(text=chatml_text(processor, prompt), images=images[:2], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            hf(**theirs).logits,
            model(ours["input_ids"][None], ours["pixel_values"]).logits,
            atol=1e-5,
            rtol=0,
        )

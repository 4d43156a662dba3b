"""Small models and inputs shared by the tests."""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

IMAGE_TOKEN = 500
VOCAB = 512


def tiny_vision_config(**kw) -> SiglipVisionConfig:
    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        vision_use_head=False,
    )
    return SiglipVisionConfig(**{**values, **kw})


def tiny_text_config(**kw) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        **kw,
    )


def tiny_llava(tie: bool = False) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(tie_word_embeddings=tie),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=4,
        tie_word_embeddings=tie,
    )
    model = LlavaForConditionalGeneration(config).eval()
    # Random init leaves biases at zero; perturb every tensor so that a swapped key shows.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def interleaved_input(tokens_per_image: int = 4, n_images: int = 2, seed: int = 1):
    """Text, image, text, image, text: images interleaved where their placeholders stand."""
    g = torch.Generator().manual_seed(seed)
    pieces = []
    for _ in range(n_images):
        pieces.append(torch.randint(0, 400, (5,), generator=g))
        pieces.append(torch.full((tokens_per_image,), IMAGE_TOKEN))
    pieces.append(torch.randint(0, 400, (6,), generator=g))
    input_ids = torch.cat(pieces).unsqueeze(0)
    pixel_values = torch.randn(n_images, 3, 28, 28, generator=g)
    return input_ids, pixel_values


def encoded_sample(n_text: int, seed: int, n_images: int = 0, scenario: str = "x") -> dict:
    """An encoded training sample: ``n_images`` images (4 positions each) in front of ``n_text``
    random tokens, the last ``n_text - 2`` of them labelled (what the prompt encoder gives)."""
    from mmscene.constants import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n_images * 4,), IMAGE_TOKEN), torch.randint(0, 400, (n_text,), generator=g)])
    labels = ids.clone()
    labels[: n_images * 4 + 2] = IGNORE_INDEX
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.randn(n_images, 3, 28, 28, generator=g),
        "image_pooling": torch.zeros(n_images, dtype=torch.bool),
        "image_positions": n_images * 4,
        "key": str(seed),
        "scenario": scenario,
    }

"""Image preprocessing for the vision tower, shared by training and the exported processor.

Optionally pad to a square with the mean colour (as LLaVA does, so that aspect ratio survives the
resize), resize to the tower's square size (bicubic), rescale by 1/255, normalise with the tower's
own mean and std. Multi-image sets and video frames use no anyres tiling.

The normalisation table below is the one source of truth: the training data path and the
``LlavaImageProcessor`` written by ``mmscene export hf`` both read it. This module imports no
transformers code, so that data loader workers can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN, STD = SIGLIP_MEAN, SIGLIP_STD  # the paper's tower

# Vision config model_type -> (mean, std) of the image processor the tower was trained with.
NORMALISATION = {
    "siglip_vision_model": (SIGLIP_MEAN, SIGLIP_STD),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
    "siglip2_vision_model": (SIGLIP_MEAN, SIGLIP_STD),
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


def normalisation(vision_model_type: str) -> dict[str, tuple[float, ...]]:
    """``{"image_mean": ..., "image_std": ...}`` of a vision tower, by its config's model_type."""
    if vision_model_type not in NORMALISATION:
        raise ValueError(
            f"no image normalisation known for vision tower model_type {vision_model_type!r}; known: "
            f"{', '.join(sorted(NORMALISATION))} (add its mean/std to mmscene.data.media.preprocess.NORMALISATION)"
        )
    mean, std = NORMALISATION[vision_model_type]
    return {"image_mean": mean, "image_std": std}


def pad_colour(mean: Sequence[float]) -> tuple[int, ...]:
    # Truncated, not rounded: LLaVA's expand2square and transformers' LlavaImageProcessor both
    # use int(m * 255) (127 for SigLIP's 0.5).
    return tuple(int(m * 255) for m in mean)


def pad_to_square(image: Image.Image, mean: Sequence[float] = MEAN) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), pad_colour(mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (what transformers' processors do too)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_images(
    images: Sequence[Image.Image],
    size: int,
    pad: bool = True,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> torch.Tensor:
    """``[N, 3, size, size]`` float32 pixel values."""
    if not images:
        return torch.zeros(0, 3, size, size)
    arrays = []
    for image in images:
        image = to_rgb(image)
        if pad:
            image = pad_to_square(image, mean)
        image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()


def image_processor_settings(model, pad_to_square: bool = True) -> dict:
    """Keyword arguments for transformers' ``LlavaImageProcessor`` (either backend) that give
    ``preprocess_images``' steps: pad with the mean colour, bicubic resize, no crop, rescale,
    the tower's normalisation."""
    size = model.image_size
    norm = normalisation(model.config.vision_config.model_type)
    return dict(
        do_convert_rgb=True,
        do_pad=pad_to_square,
        do_resize=True,
        size={"height": size, "width": size},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=False,
        crop_size={"height": size, "width": size},  # read by the processor's token count
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(norm["image_mean"]),
        image_std=list(norm["image_std"]),
    )

"""Image preprocessing for the vision tower: the interleave recipe's SigLIP settings.

Resize to the tower's square size (bicubic), rescale by 1/255, normalise with mean = std = 0.5.
Multi-image sets and video frames use no anyres tiling. Optionally pad to a square first (with
the mean colour, as LLaVA does) so that aspect ratio survives the resize.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def pad_to_square(image: Image.Image, mean: Sequence[float] = MEAN) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    fill = tuple(int(round(m * 255)) for m in mean)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


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
        image = image.convert("RGB")
        if pad:
            image = pad_to_square(image, mean)
        image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()


def image_processor_settings(model) -> dict:
    """Keyword arguments for a transformers SiglipImageProcessor that matches ``preprocess_images``."""
    size = model.image_size
    return dict(
        do_resize=True,
        size={"height": size, "width": size},
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(MEAN),
        image_std=list(STD),
    )

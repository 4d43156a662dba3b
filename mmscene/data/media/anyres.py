"""AnyRes geometry of LLaVA-NeXT single images (data side and model side): which grid an image is cut into, and how many
LLM positions its features take after ``spatial_unpad`` and ``image_newline``.

Sizes are ``(height, width)`` and pinpoints ``(height, width)`` too, transformers' order
(LLaVA-NeXT's own code writes ``(width, height)``; the original checkpoints' lists are symmetric
in the cases that matter, and :func:`pinpoints_from_llava` swaps them).

* The best resolution maximises the image's effective area once downscaled to fit a pinpoint
  (capped at its own area); ties go to less wasted area, then to the first listed.
* The image is resized into it keeping its aspect, centre-padded, and cut into ``crop`` x
  ``crop`` tiles row-major; a squashed ``crop`` x ``crop`` base image comes first.
* Features of the tiles form a ``(gh * side, gw * side)`` map (``side`` = patches per crop
  side); ``unpad`` removes the rows or columns that the padding became, and ``image_newline``
  ends every remaining row. The base image's ``side**2`` positions come first.

``rounding``: ``transformers`` (``int(round(x, 7))`` in unpad, :class:`LlavaNextForConditionalGeneration`)
or ``llava`` (``int(x)``, LLaVA-NeXT's ``unpad_image``). They differ only where the scaled side
lands within 1e-7 below an integer; mmscene uses transformers' rule by default so that an
exported model computes the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence

ROUNDINGS = ("transformers", "llava")


def best_resolution(size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` an image of ``size`` is resized into."""
    height, width = size
    best, best_key = None, None
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        key = (effective, -(ph * pw - effective))  # more effective area, then less waste
        if best_key is None or key > best_key:  # strict: the first listed wins a full tie
            best, best_key = (int(ph), int(pw)), key
    if best is None:
        raise ValueError("AnyRes needs at least one grid pinpoint")
    return best


def grid_shape(size: tuple[int, int], pinpoints: Sequence[Sequence[int]], crop: int) -> tuple[int, int]:
    """Tiles ``(rows, columns)`` of the image's best resolution."""
    ph, pw = best_resolution(size, pinpoints)
    return ph // crop, pw // crop


def num_crops(size: tuple[int, int], pinpoints: Sequence[Sequence[int]], crop: int) -> int:
    """Tower inputs of one AnyRes image: the base image and the tiles."""
    rows, cols = grid_shape(size, pinpoints, crop)
    return 1 + rows * cols


def unpadded_shape(
    size: tuple[int, int], grid_h: int, grid_w: int, rounding: str = "transformers"
) -> tuple[int, int]:
    """The feature map ``(rows, cols)`` left of ``(grid_h, grid_w)`` once padding is removed."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    height, width = size
    rnd = (lambda x: int(round(x, 7))) if rounding == "transformers" else int
    if width / height > grid_w / grid_h:  # wider than the grid: padding above and below
        new_h = rnd(height * (grid_w / width))
        pad = (grid_h - new_h) // 2
        return grid_h - 2 * pad, grid_w
    new_w = rnd(width * (grid_h / height))
    pad = (grid_w - new_w) // 2
    return grid_h, grid_w - 2 * pad


def num_positions(
    size: tuple[int, int],
    pinpoints: Sequence[Sequence[int]],
    crop: int,
    side: int,
    rounding: str = "transformers",
) -> int:
    """LLM positions of one AnyRes image: base ``side**2``, then each unpadded row + newline."""
    rows, cols = grid_shape(size, pinpoints, crop)
    h, w = unpadded_shape(size, rows * side, cols * side, rounding)
    return side * side + h * (w + 1)


def pinpoints_from_llava(pinpoints: Sequence[Sequence[int]]) -> list[list[int]]:
    """LLaVA-NeXT's ``(width, height)`` pinpoints in mmscene's (and transformers') order."""
    return [[int(h), int(w)] for w, h in pinpoints]


def crop_images(image, pinpoints: Sequence[Sequence[int]], crop: int) -> list:
    """An image's AnyRes crops as transformers' ``LlavaNextImageProcessor`` cuts them (before
    normalisation): the whole image squashed to ``crop`` x ``crop``, then the tiles row-major of
    the image resized into its best resolution (aspect kept, sides rounded up) and centre-padded
    with black."""
    import math

    from PIL import Image

    width, height = image.size
    target_h, target_w = best_resolution((height, width), pinpoints)
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    tiles = [
        canvas.crop((x, y, x + crop, y + crop))
        for y in range(0, target_h, crop)
        for x in range(0, target_w, crop)
    ]
    return [image.resize((crop, crop), Image.Resampling.BICUBIC), *tiles]

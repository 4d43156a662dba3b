"""AnyRes on the model side: an image's crop features packed into its LLM positions, as
transformers' ``LlavaNextModel.pack_image_features`` does (geometry in
:mod:`mmscene.data.media.anyres`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mmscene.data.media.anyres import grid_shape, unpadded_shape


def pack_features(
    crops: torch.Tensor,
    size: tuple[int, int],
    pinpoints: Sequence[Sequence[int]],
    crop: int,
    newline: torch.Tensor,
    rounding: str = "transformers",
) -> torch.Tensor:
    """One AnyRes image's positions from its crops' features ``[1 + rows * cols, side**2, D]``:
    the base image's, then the tiles' map unpadded with ``newline`` ending every row."""
    rows, cols = grid_shape(size, pinpoints, crop)
    side = math.isqrt(crops.shape[1])
    if crops.shape[0] != 1 + rows * cols or side * side != crops.shape[1]:
        raise ValueError(
            f"an AnyRes image of {size[1]}x{size[0]} takes 1 + {rows}x{cols} crops of a square patch grid, "
            f"got features {tuple(crops.shape)}"
        )
    base, tiles = crops[0], crops[1:]
    grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * side, cols * side)
    h, w = unpadded_shape(size, rows * side, cols * side, rounding)
    top, left = (rows * side - h) // 2, (cols * side - w) // 2
    grid = grid[:, top : top + h, left : left + w]
    grid = torch.cat([grid, newline[:, None, None].expand(-1, h, 1).to(grid)], dim=-1)
    return torch.cat([base, grid.flatten(1).T], dim=0)

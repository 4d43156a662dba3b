"""Projectors map vision features into the LLM's embedding space.

A new projector is one class registered with ``@register_projector("name")``; its constructor
takes ``(vision_dim, text_dim, bias)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PROJECTORS: dict[str, type[nn.Module]] = {}


def register_projector(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered ({PROJECTORS[name].__qualname__})")
        PROJECTORS[name] = cls
        return cls

    return wrap


def build_projector(name: str, vision_dim: int, text_dim: int, bias: bool = True) -> nn.Module:
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; registered: {', '.join(sorted(PROJECTORS))}")
    return PROJECTORS[name](vision_dim, text_dim, bias)


@register_projector("mlp2x_gelu")
class MLP2xGelu(nn.Module):
    """Linear(vision→text) · GELU · Linear(text→text): LLaVA-1.5/NeXT's ``mlp2x_gelu``."""

    def __init__(self, vision_dim: int, text_dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


@register_projector("linear")
class LinearProjector(nn.Module):
    """One Linear(vision→text), the original LLaVA projector."""

    def __init__(self, vision_dim: int, text_dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(features)

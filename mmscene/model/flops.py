"""Model FLOPs of a training step, counted the two ways the field reports MFU.

* **LM only** (verl's ``FlopsCounter``, which lmms-engine reports): ``6 · N · T`` for the LLM's
  dense weights (attention and MLP projections of every layer, plus embedding and LM head:
  ``2 · V · h``) over the T tokens the LLM reads, plus the attention scores
  ``12 · L · heads · head_dim · Σ sᵢ²`` over each *sample's* length sᵢ (a packed row's samples
  do not attend to each other, so they are counted apart). Image positions are LLM tokens too.
* **With the vision tower** (VeOmni's count for VLMs): the above, plus the tower's dense
  weights over its patches and its attention per image (``Σ pⱼ²``), plus the projector's weights
  over the image positions it feeds. A frozen tower runs forward only and is counted at
  ``2 · N`` instead of ``6 · N`` per patch (no backward through the first module of the graph).

Counted from the configs, as those frameworks do, not traced: the numbers are comparable with
theirs. Biases, norms and activations are left out (each under 1% at these sizes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mmscene.model.core import CLS_TOWERS


@dataclasses.dataclass(frozen=True)
class FlopCounts:
    lm_dense: int  # N of the LLM (per token: 6 N)
    lm_attention: int  # 12 · L · heads · head_dim (per Σ s²)
    vit_dense: int  # N of the tower's layers (per patch)
    vit_attention: int  # 4 · L · hidden of the tower: forward only (per Σ p²; training: 3x)
    projector: int  # N of the projector (per image position)
    patches_per_image: int
    vit_trains: bool

    @classmethod
    def of(cls, model) -> FlopCounts:
        """From a :class:`~mmscene.model.core.MultimodalLM` (its configs and which parts train)."""
        text, vision = model.config.text_config, model.config.vision_config
        h, layers = text.hidden_size, text.num_hidden_layers
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or h // heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        attn_linear = h * (2 * heads * head_dim + 2 * kv * head_dim)  # q, o and k, v
        mlp = 3 * h * text.intermediate_size  # gate, up, down
        lm_dense = (attn_linear + mlp) * layers + 2 * text.vocab_size * h
        hv = vision.hidden_size
        vit_layers = vision.num_hidden_layers  # all run, also those above the feature layer
        vit_dense = (4 * hv * hv + 2 * hv * vision.intermediate_size) * vit_layers
        projector = sum(p.numel() for p in model.projector.parameters() if p.ndim >= 2)
        grid = model.patch_grid
        return cls(
            lm_dense=lm_dense,
            lm_attention=12 * layers * heads * head_dim,
            vit_dense=vit_dense,
            vit_attention=4 * vit_layers * hv,
            projector=projector,
            patches_per_image=grid * grid + int(vision.model_type in CLS_TOWERS),
            vit_trains=any(p.requires_grad for p in model.vision_tower.parameters()),
        )

    def lm(self, sample_lengths: Sequence[int]) -> int:
        """LM-only FLOPs of one step over samples of these lengths (tokens the LLM reads)."""
        tokens = sum(sample_lengths)
        return 6 * self.lm_dense * tokens + self.lm_attention * sum(s * s for s in sample_lengths)

    def with_vit(self, sample_lengths: Sequence[int], images: int, image_positions: int) -> int:
        """The LM count plus the tower over ``images`` images and the projector."""
        patches = images * self.patches_per_image
        passes = 3 if self.vit_trains else 1  # forward + backward (2x forward), or forward only
        attention = self.vit_attention * images * self.patches_per_image**2
        vit = passes * (2 * self.vit_dense * patches + attention)
        return self.lm(sample_lengths) + vit + 6 * self.projector * image_positions

"""The model core: vision tower → projector → features scattered into the LLM's embeddings.

``input_ids`` arrive with every ``<image>`` already expanded to ``tokens_per_image`` positions
holding ``config.image_token_id`` (the convention of transformers' Llava). Image features fill
those positions in order: first image of the batch first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmscene.constants import IGNORE_INDEX
from mmscene.data.media import anyres as anyres_geometry
from mmscene.model import anyres, attention
from mmscene.model.config import MultimodalConfig
from mmscene.model.projector import build_projector
from mmscene.model.token_loss import summed_token_loss

CLS_TOWERS = ("clip_vision_model",)  # towers whose first token is a CLS token


class MultimodalLM(nn.Module):
    def __init__(self, config: MultimodalConfig, attn_implementation: str | None = None):
        """``attn_implementation``: one of :data:`mmscene.model.attention.CHOICES` for both the tower
        and the LLM (None / ``auto``: flash-attention 2 where installed on a GPU, else SDPA)."""
        super().__init__()
        self.config = config
        vision_config = config.vision_config
        text_config = config.text_config
        if getattr(vision_config, "vision_use_head", False):
            # The pooling head is never used for features and would get no gradient under FSDP.
            vision_config.vision_use_head = False
        kwargs = {"attn_implementation": attention.resolve(attn_implementation)}
        self.vision_tower = AutoModel.from_config(vision_config, **kwargs)
        self.projector = build_projector(
            config.projector, vision_config.hidden_size, text_config.hidden_size, config.projector_bias
        )
        self.language_model = AutoModelForCausalLM.from_config(text_config, **kwargs)
        if config.patch_merge == "spatial_unpad":
            # LLaVA-NeXT's learned row end; held by the projector, so it trains and freezes with it
            hidden = text_config.hidden_size
            self.projector.register_parameter(
                "image_newline", nn.Parameter(torch.randn(hidden) / hidden**0.5)
            )
        self.tokenizer = None  # attached by callers that have one; saved alongside the weights
        self.freeze_unused()

    def freeze_unused(self) -> None:
        """Stop gradients for tower weights that never reach the features (DDP/FSDP would wait on them).

        Hidden states are taken before the tower's final layer norm (SigLIP, CLIP), and a feature
        layer below the last leaves the layers above it unused.
        """
        for name in ("post_layernorm", "head"):
            part = getattr(self.vision_tower, name, None)
            if isinstance(part, nn.Module):
                part.requires_grad_(False)
        layers = getattr(getattr(self.vision_tower, "encoder", None), "layers", None)
        layer = self.config.vision_feature_layer
        if layers is not None and layer < -1:
            for block in list(layers)[len(layers) + layer + 1 :]:
                block.requires_grad_(False)

    def blocks(self) -> list[nn.Module]:
        """The repeated layers of the tower and the LLM: the units of sharding and compiling."""
        blocks = list(getattr(getattr(self.vision_tower, "encoder", None), "layers", []))
        return blocks + list(self.language_model.model.layers)

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` each block's ``forward`` (torchtitan's per-block compile, which
        reuses one graph for all same-shaped layers). The forward method is compiled, not the
        module wrapped, so parameter names, state dicts and FSDP2's hooks (around ``forward``)
        stay as they are. Generation runs eagerly (see :meth:`_generate`)."""
        for block in self.blocks():
            block.forward = torch.compile(block.forward, **options)

    # ------------------------------------------------------------------ geometry
    @property
    def image_size(self) -> int:
        return int(self.config.vision_config.image_size)

    @property
    def patch_grid(self) -> int:
        cfg = self.config.vision_config
        return int(cfg.image_size) // int(cfg.patch_size)

    def tokens_per_image(self, pooled: bool = False) -> int:
        """How many ``image_token_id`` positions one image (or one pooled video frame) takes."""
        grid = self.patch_grid
        if pooled and self.config.frame_pool_stride > 1:
            side = grid // self.config.frame_pool_stride
            return side * side + int(self.config.patch_merge == "spatial_unpad")
        has_cls = self.config.vision_config.model_type in CLS_TOWERS
        n = grid * grid + int(has_cls)
        n = n - 1 if self.config.vision_feature_select == "default" else n
        return n + int(self.config.patch_merge == "spatial_unpad")  # the image_newline after it

    # ------------------------------------------------------------------ features
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        image_pooling: torch.Tensor | None = None,
        pooling_flags: list[bool] | None = None,
        image_sizes: list[tuple[int, int] | None] | None = None,
    ) -> torch.Tensor:
        """Projected features of each image, flattened to ``[total_positions, hidden]`` in order.
        ``pooling_flags``: ``image_pooling`` as a host list (read without a device sync).
        ``image_sizes``: per image, its original ``(height, width)`` when it comes as AnyRes crops
        (base image, then the tiles row-major; :mod:`mmscene.model.anyres`), else None (one crop)."""
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be [num_images, channels, H, W], got shape {tuple(pixel_values.shape)}"
            )
        size = self.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but the vision tower takes "
                f"{size}x{size} images; preprocess images to the tower's size"
            )
        dtype = next(self.vision_tower.parameters()).dtype
        layer = self.config.vision_feature_layer
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=layer, return_dict=True)
        feats = out.hidden_states[layer]
        if self.config.vision_feature_select == "default":
            feats = feats[:, 1:]
        feats = self.projector(feats)
        if pooling_flags is None:
            pooling_flags = [] if image_pooling is None else image_pooling.tolist()
        pooling = any(pooling_flags) and self.config.frame_pool_stride > 1
        if self.config.patch_merge == "flat" and not pooling and not any(image_sizes or ()):
            return feats.reshape(-1, feats.shape[-1])
        return torch.cat(self._per_image(feats, pooling_flags if pooling else [], image_sizes), dim=0)

    def _per_image(self, feats, pooling_flags, image_sizes) -> list[torch.Tensor]:
        """Each image's positions: AnyRes crops packed, pooled frames pooled, and under
        ``spatial_unpad`` an ``image_newline`` after every single-crop image."""
        cfg = self.config
        sizes = list(image_sizes or [])
        crops = [
            anyres_geometry.num_crops(s, cfg.image_grid_pinpoints, self.image_size) if s is not None else 1
            for s in sizes
        ]
        crops += [1] * (feats.shape[0] - sum(crops))
        if sum(crops) != feats.shape[0] or (sizes and not cfg.image_grid_pinpoints and any(sizes)):
            raise ValueError(
                f"{feats.shape[0]} crops for images needing {sum(crops)}"
                + (
                    ""
                    if cfg.image_grid_pinpoints
                    else " (image sizes given, but the model has no AnyRes pinpoints)"
                )
            )
        newline = getattr(self.projector, "image_newline", None)
        out, start = [], 0
        for i, n in enumerate(crops):
            f = feats[start : start + n]
            start += n
            if n > 1 or (i < len(sizes) and sizes[i] is not None):
                out.append(
                    anyres.pack_features(
                        f, sizes[i], cfg.image_grid_pinpoints, self.image_size, newline, cfg.anyres_rounding
                    )
                )
                continue
            f = self._pool(f[0]) if i < len(pooling_flags) and pooling_flags[i] else f[0]
            out.append(f if newline is None else torch.cat([f, newline[None].to(f)], dim=0))
        return out

    def _pool(self, feats: torch.Tensor) -> torch.Tensor:
        grid, stride = self.patch_grid, self.config.frame_pool_stride
        if feats.shape[0] != grid * grid:
            raise ValueError(
                "frame pooling needs a pure patch grid; use vision_feature_select='default' for CLS towers"
            )
        x = feats.T.reshape(1, -1, grid, grid)
        x = F.avg_pool2d(x, kernel_size=stride, stride=stride)
        return x.flatten(2)[0].T

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_pooling: torch.Tensor | None = None,
        host: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """LLM input embeddings with image features scattered into the image positions.

        ``host``: what the collate counted on the host (``image_positions``,
        ``image_pooling_flags``), so that no count is read back from the device."""
        host = host or {}
        image_mask = input_ids == self.config.image_token_id
        embed_tokens = self.language_model.get_input_embeddings()
        # The image id may lie outside the vocabulary (original checkpoints use none): embed a
        # harmless id there, it is overwritten below.
        embeds = embed_tokens(input_ids.masked_fill(image_mask, 0))
        n_positions = host.get("image_positions")
        if n_positions is None:
            n_positions = int(image_mask.sum())
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        if n_images == 0:
            if n_positions:
                raise ValueError(
                    f"input_ids hold {n_positions} image positions but no pixel_values were given"
                )
            return embeds
        feats = self.encode_images(
            pixel_values, image_pooling, host.get("image_pooling_flags"), host.get("image_sizes")
        )
        if feats.shape[0] != n_positions:
            per_sample = image_mask.sum(dim=1).tolist()
            raise ValueError(
                f"image positions and image features do not match: input_ids hold {n_positions} image positions "
                f"(per sample {per_sample}) but {n_images} images give {feats.shape[0]} feature vectors "
                f"({self.tokens_per_image()} per image); expand each <image> to exactly that many tokens"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), feats.to(embeds.dtype))

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_pooling: torch.Tensor | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        summed_loss: dict[str, Any] | None = None,
        host: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (and the mean token loss when ``labels`` are given); with ``generate_kwargs``,
        the new tokens of :meth:`generate`; with ``summed_loss`` (``{kernel, chunk_tokens}`` and optionally
        ``{groups, num_groups}``, see :func:`mmscene.model.token_loss.summed_token_loss`) and
        ``labels``, the summed token loss and the labelled token count (and per-group sums),
        computed from the last hidden states without full-vocabulary logits.

        Generation enters here, through ``__call__``, so that a sharded (FSDP2) root sees one
        forward around the whole of it: its pre-forward hook gathers the parameters the root
        holds (patch embedding, projector, final norm, tied embeddings) before ``embed`` and the
        LLM's decoding loop use them.
        """
        if generate_kwargs is not None:
            return self._generate(
                input_ids, pixel_values, attention_mask, image_pooling, generate_kwargs, host
            )
        rows = input_ids.shape
        if (
            attention_mask is None
            and position_ids is not None
            and rows[0] > 1
            and attention.needs_single_row(self.language_model.config._attn_implementation)
        ):
            # Packed rows under flash attention: one row whose position ids restart per sample
            # is what its varlen path detects (row padding is a sample of its own). Images keep
            # their order, row after row.
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
            labels = labels.reshape(1, -1) if labels is not None else None
            if summed_loss is not None and summed_loss.get("groups") is not None:
                summed_loss = {**summed_loss, "groups": summed_loss["groups"].reshape(1, -1)}
        starts = (host or {}).get("sample_starts")
        split = (
            starts is not None and self.language_model.config._attn_implementation == attention.SDPA_VARLEN
        )
        if split:
            kwargs["sample_starts"] = starts  # the samples of the (flattened) packed rows, from the host
        inputs_embeds = self.embed(input_ids, pixel_values, image_pooling, host)
        if labels is not None:
            labels = self.loss_labels(labels, input_ids)
        if summed_loss is not None and labels is None:
            raise ValueError("summed_loss needs labels")
        # the summed loss reads the decoder's last hidden states (no logits); else the LM's own loss
        lm = self.language_model if summed_loss is None else self.language_model.get_decoder()
        own_loss = {"labels": labels} if summed_loss is None else {}
        with attention.host_starts(split):
            out = lm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **own_loss,
                **kwargs,
            )
        if summed_loss is not None:
            return summed_token_loss(
                out.last_hidden_state, self.language_model.get_output_embeddings(), labels, **summed_loss
            )
        if out.logits is not None and out.logits.shape[:2] != rows:
            out.logits = out.logits.reshape(*rows, -1)
        return out

    def loss_labels(self, labels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Image positions never carry loss, whatever the caller's labels say."""
        return labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_pooling: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        image_sizes: list | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """New tokens only, ``[batch, new_len]``, with KV cache (greedy, sampling, any GenerationConfig).

        Batches mix samples with different numbers of images; pad on the left. Sharded ranks pass
        ``synced_gpus=True`` so that they keep stepping together until every rank is done.
        """
        if attention_mask is not None and input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "batched generation needs left padding: the last position of every row must be real"
            )
        return self(
            input_ids,
            pixel_values,
            attention_mask,
            image_pooling=image_pooling,
            generate_kwargs={"generation_config": generation_config, **kwargs},
            host={"image_sizes": image_sizes} if image_sizes else None,
        )

    def _generate(self, input_ids, pixel_values, attention_mask, image_pooling, generate_kwargs, host=None):
        inputs_embeds = self.embed(input_ids, pixel_values, image_pooling, host)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        # Decoding changes shapes every step (and carries a cache): compiled blocks would
        # recompile until dynamo gives up; generation stays eager.
        with torch.compiler.set_stance("force_eager"):
            return self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
            )

    def num_parameters(self) -> dict[str, int]:
        """Unique parameter counts per part (tied weights counted once)."""
        seen: set[int] = set()
        counts = {}
        for part in ("vision_tower", "projector", "language_model"):
            n = 0
            for p in getattr(self, part).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
            counts[part] = n
        counts["total"] = sum(counts.values())
        return counts

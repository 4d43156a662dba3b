"""Bytes one LLM decoder layer keeps for backward, counted per saved tensor, against ``mmscene plan``.

    python bench/layer_activations.py [--tokens 128 --dtype bfloat16]

For each shape, a real ``MultimodalLM`` (transformers' Qwen2 layers, SDPA) runs one forward with
``torch.autograd.graph.saved_tensors_hooks`` recording every distinct storage saved for backward
(parameters excluded). Models with 1 and 3 layers are compared, so the difference over 2 is one
layer's cost, free of embeddings and logits. Printed beside the planner's per-layer figure
(:func:`mmscene.launch.plan.layer_activation_bytes`, Korthikanti et al.'s 34·h bytes per token
without attention scores) as a ratio. CPU kernels: what a GPU step keeps can differ (see
docs/slurm.md for the H200 measurement of the whole step).
"""

from __future__ import annotations

import argparse
import time

import torch

from mmscene.launch.plan import layer_activation_bytes
from mmscene.model.config import MultimodalConfig
from mmscene.model.core import MultimodalLM

SHAPES = [  # hidden, intermediate, heads, kv heads (Qwen1.5-0.5B's ratios, scaled down; GQA)
    (256, 704, 4, 4),
    (512, 1408, 8, 8),
    (512, 1408, 8, 2),
]


def saved_bytes(layers: int, hidden: int, inter: int, heads: int, kv: int, tokens: int, dtype) -> int:
    config = MultimodalConfig(
        vision=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        text=dict(
            model_type="qwen2",
            vocab_size=1000,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            tie_word_embeddings=True,
        ),
        image_token_id=3,
    )
    torch.manual_seed(0)
    model = MultimodalLM(config, attn_implementation="sdpa").to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(10, 1000, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, pixel_values=None, attention_mask=torch.ones_like(ids))
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    act_bytes = torch.tensor([], dtype=dtype).element_size()
    print(
        f"{'h':>5} {'i':>5} {'a':>3} {'kv':>3} {'measured/token':>15} {'planned/token':>14} {'plan/measured':>14}"
    )
    wall, cpu = time.perf_counter(), time.process_time()
    for h, i, a, kv in SHAPES:
        n = args.tokens
        per_layer = (saved_bytes(3, h, i, a, kv, n, dtype) - saved_bytes(1, h, i, a, kv, n, dtype)) / 2
        planned = layer_activation_bytes(n, n, h, a, act_bytes, scores=False)
        print(
            f"{h:>5} {i:>5} {a:>3} {kv:>3} {per_layer / n:>15.0f} {planned / n:>14.0f} {planned / per_layer:>14.2f}"
        )
    print(f"wall {time.perf_counter() - wall:.1f} s, CPU {time.process_time() - cpu:.1f} s")


if __name__ == "__main__":
    main()

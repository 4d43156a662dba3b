"""A tiny model end to end: build, forward with loss, greedy generate, save, reload."""

from __future__ import annotations

import tempfile

import torch

from mmscene.model.config import MultimodalConfig
from mmscene.model.core import MultimodalLM


def main() -> None:
    torch.manual_seed(0)
    model = MultimodalLM(MultimodalConfig(vision="tiny-siglip", text="tiny-qwen2", image_token_id=511)).eval()
    n = model.tokens_per_image()
    ids = torch.tensor([[1, 2, 3] + [511] * n + [4, 5] + [511] * n + [6]])
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    loss = model(ids, pixels, labels=ids).loss
    tokens = model.generate(ids, pixels, max_new_tokens=8, do_sample=False)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        again = MultimodalLM.from_pretrained(tmp).eval()
        same = torch.equal(again.generate(ids, pixels, max_new_tokens=8, do_sample=False), tokens)
    print(f"parameters: {model.num_parameters()}")
    print(f"loss: {loss.item():.4f}  generated: {tokens.tolist()}  reload identical: {same}")


if __name__ == "__main__":
    main()

"""Packed rows must compute exactly what the samples compute alone."""

import torch
from helpers import IMAGE_TOKEN, tiny_llava

from mmscene.data.packing import first_fit, packed_collate
from mmscene.model.core import IGNORE_INDEX
from mmscene.model.formats import load_checkpoint


def _sample(n_images, n_text, seed):
    g = torch.Generator().manual_seed(seed)
    pieces = []
    for _ in range(n_images):
        t = torch.randint(0, 400, (3,), generator=g)
        pieces += [t, torch.full((4,), IMAGE_TOKEN)]
    answer = torch.randint(0, 400, (n_text,), generator=g)
    ids = torch.cat([*pieces, answer]) if pieces else answer
    lab = torch.full_like(ids, IGNORE_INDEX)
    lab[-n_text:] = answer
    return {
        "input_ids": ids,
        "labels": lab,
        "pixel_values": torch.randn(n_images, 3, 28, 28, generator=g),
        "image_pooling": torch.zeros(n_images, dtype=torch.bool),
        "key": str(seed),
    }


def test_first_fit_never_exceeds_budget():
    rows = first_fit([5, 9, 3, 7, 2, 8], 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([5, 9, 3, 7, 2, 8][i] for i in r) <= 10 for r in rows)


def test_packed_logits_and_loss_equal_unpacked(tmp_path):
    tiny_llava().save_pretrained(tmp_path / "hf")
    model = load_checkpoint(tmp_path / "hf").eval()
    samples = [_sample(2, 6, 1), _sample(0, 9, 2), _sample(1, 5, 3), _sample(3, 4, 4)]
    rows = first_fit([s["input_ids"].shape[0] for s in samples], 40)
    assert len(rows) < len(samples)  # something was actually packed
    batch = packed_collate(samples, pad_id=0, rows=rows)
    with torch.no_grad():
        packed = model(
            batch["input_ids"],
            batch["pixel_values"],
            labels=batch["labels"],
            position_ids=batch["position_ids"],
        )
        total_loss, total_tokens = 0.0, 0
        order = [i for row in rows for i in row]
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                s = samples[i]
                n = s["input_ids"].shape[0]
                alone = model(
                    s["input_ids"][None],
                    s["pixel_values"] if len(s["pixel_values"]) else None,
                    labels=s["labels"][None],
                )
                torch.testing.assert_close(
                    packed.logits[r, col : col + n], alone.logits[0], atol=1e-5, rtol=0
                )
                k = int((s["labels"][1:] != IGNORE_INDEX).sum())
                total_loss += alone.loss.item() * k
                total_tokens += k
                col += n
        assert order == [int(m["key"]) - 1 for m in batch["meta"]]
    # same per-token mean as the unpacked samples
    assert abs(packed.loss.item() - total_loss / total_tokens) < 1e-5

"""Packed rows must compute exactly what the samples compute alone."""

import pytest
import torch
from helpers import IMAGE_TOKEN, tiny_llava

from mmscene.data.pipeline.packing import first_fit, packed_collate
from mmscene.model import attention, load_pretrained
from mmscene.model.core import IGNORE_INDEX


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


def _cpu_implementations() -> list[str]:
    found = ["eager", "sdpa", "sdpa_varlen"]
    try:  # flex attention compiles its kernel; machines without a compiler cannot run it
        import torch.nn.attention.flex_attention  # noqa: F401

        found.append("flex_attention")
    except ImportError:
        pass
    return found


def _packed_vs_alone(model, samples, budget, expect_rows):
    rows = first_fit([s["input_ids"].shape[0] for s in samples], budget)
    assert len(rows) == expect_rows and len(rows) < len(samples)  # something was actually packed
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


SAMPLES = [(2, 6, 1), (0, 9, 2), (1, 5, 3), (3, 4, 4)]  # 22, 9, 12, 25 tokens


@pytest.mark.parametrize("implementation", _cpu_implementations())
@pytest.mark.parametrize("budget,rows", [(80, 1), (40, 2)], ids=["1-row", "2-rows"])
def test_packed_logits_and_loss_equal_unpacked(tmp_path, implementation, budget, rows):
    tiny_llava().save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", attn_implementation=implementation).eval()
    resolved = attention.resolve(implementation)
    assert model.language_model.config._attn_implementation == resolved
    assert model.vision_tower.config._attn_implementation == resolved
    _packed_vs_alone(model, [_sample(*a) for a in SAMPLES], budget, rows)


@pytest.mark.parametrize("host_starts", [True, False], ids=["starts-from-host", "starts-from-positions"])
def test_sdpa_varlen_attends_per_sample_and_trains_like_sdpa(tmp_path, monkeypatch, host_starts):
    """The CPU varlen kernel: one SDPA call per sample of a packed row (never a row-sized one),
    and the training step's loss and gradients equal SDPA's with the dense block mask. Given the
    collate's sample starts, the LLM builds no [L, L] mask at all."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    tiny_llava().save_pretrained(tmp_path / "hf")
    dense = load_pretrained(tmp_path / "hf", attn_implementation="sdpa")
    varlen = load_pretrained(tmp_path / "hf", attn_implementation="sdpa_varlen")
    samples = [_sample(*a) for a in SAMPLES]
    rows = first_fit([s["input_ids"].shape[0] for s in samples], 40)
    batch = packed_collate(samples, pad_id=0, rows=rows)
    lengths, masks = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    build_mask = ALL_MASK_ATTENTION_FUNCTIONS[attention.SDPA_VARLEN]

    def recording(q, *args, **kwargs):
        lengths.append(q.shape[2])
        return sdpa(q, *args, **kwargs)

    def recording_mask(*args, **kwargs):
        masks.append(build_mask(*args, **kwargs))
        return masks[-1]

    results = []
    for model in (dense, varlen):
        summed = {"kernel": "chunked", "chunk_tokens": 16, "positions": batch["label_positions"]}
        if model is varlen:
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
            monkeypatch.setitem(
                ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, attention.SDPA_VARLEN, recording_mask
            )
        loss, count = model(
            batch["input_ids"],
            batch["pixel_values"],
            labels=batch["labels"],
            position_ids=batch["position_ids"],
            summed_loss=summed,
            host={"sample_starts": batch["sample_starts"]} if host_starts and model is varlen else None,
        )
        (loss / count).backward()
        results.append(
            (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    # the collate's host list says what the kernel would otherwise read from the position ids
    assert batch["sample_starts"] == attention._sample_starts(batch["position_ids"].reshape(1, -1))
    layers = varlen.config.text_config.num_hidden_layers
    width = batch["input_ids"].shape[1]
    per_row = [[samples[i]["input_ids"].shape[0] for i in row] for row in rows]
    segments = [n for row in per_row for n in (*row, width - sum(row)) if n]  # row padding is one more
    text = [n for n in lengths if n != varlen.tokens_per_image()]  # the tower's calls see patches
    assert text == segments * layers
    flat = batch["input_ids"].numel()
    if host_starts:
        assert masks == [None]  # the row was split where the host said; no mask was built
    else:
        assert len(masks) == 1 and masks[0].shape[-2:] == (flat, flat)  # the block mask, unused
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_become_one_row_for_varlen_attention(tmp_path, monkeypatch):
    """Flash attention finds packed samples from position ids only in a one-row batch: the core
    flattens packed rows for it, and the result is still exact per sample."""
    from mmscene.model import attention

    tiny_llava().save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    monkeypatch.setattr(attention, "needs_single_row", lambda impl: True)
    shapes = []
    model.language_model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    _packed_vs_alone(model, [_sample(*a) for a in SAMPLES], 40, 2)
    assert shapes[0] == (1, 2 * 37), shapes  # two rows of width 37 went in as one
    assert all(s[0] == 1 for s in shapes[1:])  # the samples alone: one row each


def test_flash_attention_refused_without_flash_attn():
    import importlib.util

    from mmscene.model import attention

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match="flash-attn"):
        attention.resolve("flash_attention_2")
    with pytest.raises(ValueError, match="not one of"):
        attention.resolve("flash")
    assert attention.resolve(None) == attention.SDPA_VARLEN  # CPU: the varlen kernel
    assert attention.resolve(attention.SDPA_VARLEN) == attention.SDPA_VARLEN
    assert attention.needs_single_row("flash_attention_2") and attention.needs_single_row("flex_attention")
    assert not attention.needs_single_row("sdpa") and not attention.needs_single_row("eager")
    assert attention.needs_single_row(attention.SDPA_VARLEN)


def test_flex_attention_training_on_cpu_is_refused_before_the_first_step(tmp_path, demo_data):
    """torch's flex attention has no CPU backward: a fit says so up front instead of failing in
    the first backward (and trains where a later torch has one)."""
    from train_helpers import tiny_config, write_config

    from mmscene.train.cli import lightning_main

    cfg = tiny_config(demo_data, tmp_path / "run", max_steps=1)
    cfg["model"]["attn_implementation"] = "flex_attention"
    args = ["fit", "--config", str(write_config(cfg, tmp_path / "c.yaml"))]
    q = torch.zeros(1, 1, 16, 8, requires_grad=True)
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex_attention(q, q, q).sum().backward()
    except NotImplementedError:
        with pytest.raises(ValueError, match="flex_attention cannot train on CPU"):
            lightning_main(args)
        assert not list((tmp_path / "run").rglob("*.ckpt"))
    else:
        lightning_main(args)

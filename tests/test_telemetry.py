"""Telemetry: the FLOP counts behind both MFUs, the per-scenario loss, and what a fit logs."""

import csv
import json

import pytest
import torch
from helpers import encoded_sample, tiny_llava
from torch.utils.flop_counter import FlopCounterMode
from train_helpers import tiny_config

from mmscene.data.pipeline.packing import packed_collate
from mmscene.model import load_pretrained
from mmscene.model.flops import FlopCounts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "hf"
    tiny_llava().save_pretrained(path)
    return load_pretrained(path, attn_implementation="eager")


def _traced(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_lm_count_equals_the_traced_matmuls_of_a_training_step(model):
    """6·N·T + 12·L·heads·d·s² is what forward + backward of the LLM multiply (eager attention
    computes the full s² scores), less the embedding's 6·V·h per token, a lookup the count
    includes by convention (verl)."""
    counts = FlopCounts.of(model)
    text = model.config.text_config
    s = 23
    ids = torch.randint(0, 400, (1, s))
    lm = model.language_model

    def step():
        lm(input_ids=ids, labels=ids).loss.backward()

    embedding = 6 * text.vocab_size * text.hidden_size * s
    assert _traced(step) == counts.lm([s]) - embedding
    # samples of a packed row are counted apart: the quadratic term is per sample
    assert counts.lm([10, 13]) == counts.lm([23]) - counts.lm_attention * (23**2 - 10**2 - 13**2)


def test_tower_count_equals_the_traced_forward_of_a_frozen_tower(model):
    model.vision_tower.requires_grad_(False)
    counts = FlopCounts.of(model)
    assert not counts.vit_trains
    vision = model.config.vision_config
    images = 3
    pixels = torch.randn(images, 3, vision.image_size, vision.image_size)
    traced = _traced(lambda: model.vision_tower(pixels))
    patch_embedding = 2 * 3 * vision.patch_size**2 * vision.hidden_size * counts.patches_per_image * images
    # the tower part of the count: with_vit minus the LM and projector terms
    tower = counts.with_vit([5], images, 0) - counts.lm([5])
    assert traced == tower + patch_embedding
    projector = _traced(lambda: model.projector(torch.randn(1, 7, vision.hidden_size)))
    assert 3 * projector == counts.with_vit([5], 0, 7) - counts.lm([5])  # 6N per position


@pytest.mark.parametrize("kernel", ["chunked", "plain"])
def test_per_scenario_loss_sums_equal_the_samples_alone(model, kernel):
    scenarios = ["3d", "single_image", "video"]
    samples = [
        encoded_sample(9, 1, scenario="video"),
        encoded_sample(6, 2, n_images=1, scenario="3d"),
        encoded_sample(12, 3, scenario="video"),
        encoded_sample(5, 4, n_images=2, scenario="single_image"),
    ]
    batch = packed_collate(samples, pad_id=0, rows=[[0, 1], [2, 3]])
    of_sample = torch.tensor([scenarios.index(m["scenario"]) for m in batch["meta"]] + [0])
    groups = of_sample[batch["sample_index"]]
    summed = {"kernel": kernel, "chunk_tokens": 4, "groups": groups, "num_groups": 3}
    with torch.no_grad():
        loss, count, by_scenario = model(
            batch["input_ids"],
            batch["pixel_values"],
            labels=batch["labels"],
            position_ids=batch["position_ids"],
            summed_loss=summed,
        )
        expected = torch.zeros(3, 2)
        for s in samples:
            alone = model(
                s["input_ids"][None],
                s["pixel_values"] if len(s["pixel_values"]) else None,
                labels=s["labels"][None],
                summed_loss={"kernel": "plain"},
            )
            expected[scenarios.index(s["scenario"])] += torch.stack(alone)
    torch.testing.assert_close(by_scenario, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(by_scenario.sum(0), torch.stack([loss, count]), atol=1e-4, rtol=1e-5)
    assert batch["sample_lengths"] == [9, 10, 12, 13] and batch["real_tokens"] == 44


def test_fit_logs_the_telemetry(tmp_path, demo_data):
    """A short fit writes every telemetry series, and they agree with the batches that went in."""
    from train_helpers import write_config

    from mmscene.train.cli import lightning_main

    record = tmp_path / "batches.jsonl"
    cfg = tiny_config(demo_data, tmp_path / "run", max_steps=4, log_every_n_steps=2)
    cfg["data"]["batching"] = {"mode": "tokens", "max_tokens": 1024, "row_tokens": 512}
    callbacks = cfg["trainer"]["callbacks"]
    (telemetry,) = [c for c in callbacks if c["class_path"] == "mmscene.train.telemetry.Telemetry"]
    telemetry["init_args"] = {"peak_flops": 1.0e9}  # the config's own Telemetry, with its options
    callbacks.append({"class_path": "train_helpers.RecordBatches", "init_args": {"path": str(record)}})
    lightning_main(["fit", "--config", str(write_config(cfg, tmp_path / "c.yaml"))])
    (csv_path,) = (tmp_path / "run" / "logs").glob("*/metrics.csv")
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # after optimizer steps 2 and 4
    batches = [json.loads(line) for line in record.read_text().splitlines()]
    for r, window in zip(rows, ([0, 1], [2, 3])):
        seen = [b for b in batches if b["step"] in window]
        tokens, slots = sum(b["tokens"] for b in seen), sum(b["slots"] for b in seen)
        samples = sum(len(b["keys"]) for b in seen)
        assert float(r["train/padding_efficiency"]) == pytest.approx(tokens / slots)
        rate, sample_rate = float(r["train/tokens_per_s"]), float(r["train/samples_per_s"])
        assert rate / sample_rate == pytest.approx(tokens / samples)
        assert 0 < tokens / rate < 120  # the window's seconds
        assert float(r["train/mfu_lm"]) == pytest.approx(float(r["train/tflops_lm"]) * 1e12 / 1e9)
        assert float(r["train/tflops_with_vit"]) > float(r["train/tflops_lm"]) > 0
        assert 0 <= float(r["train/loader_wait"]) < 1
        assert float(r["train/grad_norm"]) > 0
        per_scenario = {
            k.removeprefix("train/loss/") for k, v in r.items() if k.startswith("train/loss/") and v
        }
        assert per_scenario and per_scenario <= {"single_image", "multi_image", "video", "3d"}
    # warmup: 50 steps linear from 0 to the demo config's 1e-3, logged after steps 2 and 4
    for part in ("llm", "projector", "vision"):
        assert [float(r[f"train/lr/{part}"]) for r in rows] == pytest.approx([1e-3 * 2 / 50, 1e-3 * 4 / 50])

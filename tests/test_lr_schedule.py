"""The LR each part sees over a run: warmup from 0, cosine to ``min_lr_ratio``, per-part LRs kept."""

import math

import pytest
import torch

from mmscene.train.schedule import lr_schedule


def lrs_over(steps: int, warmup: int, total: int | None, min_ratio: float) -> list[list[float]]:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 2e-5}])
    sched = lr_schedule(opt, warmup, total, min_ratio)
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


def test_warmup_then_cosine_to_the_floor():
    seen = lrs_over(101, warmup=10, total=100, min_ratio=0.1)
    vision = [lr for lr, _ in seen]
    assert vision[0] == 0.0 and vision[5] == pytest.approx(0.5e-3) and vision[10] == pytest.approx(1e-3)
    # halfway through the decay: floor + half the way between floor and peak
    assert vision[55] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert vision[100] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(vision[10:], vision[11:]))  # never rises after warmup
    # the second part keeps its own scale at every step
    assert all(llm == pytest.approx(v * 2e-5 / 1e-3) for v, llm in seen)


def test_without_a_step_budget_the_lr_stays_after_warmup():
    seen = lrs_over(30, warmup=4, total=None, min_ratio=0.1)
    assert [round(lr / 1e-3, 6) for lr, _ in seen[:6]] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(lr == pytest.approx(1e-3) for lr, _ in seen[4:])

"""The chunked token loss equals the unfused one (loss and gradients, fp32), and training uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmscene.constants import IGNORE_INDEX
from mmscene.model.token_loss import resolve_kernel, summed_token_loss
from mmscene.train.loss import token_loss_sum


def _case(seed: int, batch=2, length=37, hidden=16, vocab=101, labelled=0.6):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g, dtype=torch.float64).float().requires_grad_()
    head = nn.Linear(hidden, vocab, bias=seed % 2 == 0)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) > labelled] = IGNORE_INDEX
    return h, head, labels


def _grads(h, head, loss):
    params = [h, *head.parameters()]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_equals_unfused_loss_and_gradients(chunk, seed):
    h, head, labels = _case(seed)
    ref, ref_count = token_loss_sum(head(h), labels)
    loss, count = summed_token_loss(h, head, labels, kernel="chunked", chunk_tokens=chunk)
    assert int(count) == int(ref_count) > 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-5)
    for got, want in zip(_grads(h, head, loss), _grads(h, head, ref)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    plain, _ = summed_token_loss(h, head, labels, kernel="plain")
    assert plain.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-5)


def test_nothing_labelled_gives_a_zero_that_reaches_the_parameters():
    h, head, labels = _case(0)
    labels[:] = IGNORE_INDEX
    loss, count = summed_token_loss(h, head, labels, kernel="chunked", chunk_tokens=4)
    assert loss.item() == 0.0 and int(count) == 0
    grads = _grads(h, head, loss)
    assert all(g is not None and not g.any() for g in grads)


def test_no_logits_are_kept_for_backward():
    """The gradients are made chunk by chunk in forward: what autograd keeps for backward is the
    size of the hidden states and the head, never of the logits."""
    h, head, labels = _case(3, batch=1, length=400, labelled=1.0)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = summed_token_loss(h, head, labels, kernel="chunked", chunk_tokens=50)
    vocab = head.out_features
    assert max(sizes) < 399 * vocab / 4  # nothing the size of all the logits is kept for backward
    loss.backward()


def test_kernel_choice():
    cpu = torch.device("cpu")
    assert resolve_kernel("auto", cpu) == "chunked"
    assert resolve_kernel("plain", cpu) == "plain"
    with pytest.raises(ValueError, match="loss kernel must be one of"):
        resolve_kernel("fused", cpu)


def test_the_core_summed_loss_equals_the_loss_of_its_logits():
    """MultimodalLM's summed loss (training's path: hidden states, chunked head) equals the summed
    cross-entropy of its own full logits, image positions excluded, with equal gradients."""
    from helpers import IMAGE_TOKEN, interleaved_input
    from test_core import tiny_model

    model = tiny_model().train()
    input_ids, pixel_values = interleaved_input()
    labels = input_ids.clone()  # image positions too: the core must mask them
    labels[0, :5] = IGNORE_INDEX
    loss, count = model(
        input_ids, pixel_values, labels=labels, summed_loss={"kernel": "chunked", "chunk_tokens": 3}
    )
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    logits = model(input_ids, pixel_values).logits
    ref, ref_count = token_loss_sum(logits, model.loss_labels(labels, input_ids))
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert (
        int(count)
        == int(ref_count)
        == int(((labels[:, 1:] != IGNORE_INDEX) & (input_ids[:, 1:] != IMAGE_TOKEN)).sum())
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_loss_memory_bench_meets_its_target_in_miniature():
    """bench/loss_memory.py at small sizes: chunked peak RSS <= 1/8 of unfused, equal losses."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "loss_memory.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--tokens", "2048", "--vocab", "32000", "--hidden", "64",
         "--chunk", "128", "--rounds", "1"],  # fmt: skip
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "losses equal: True" in run.stdout

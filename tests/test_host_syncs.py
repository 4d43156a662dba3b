"""A training step's forward and backward read nothing back from the device in mmscene's own code:
counts and gather indices come from the collate (host), so a GPU never waits on the host."""

import traceback
from pathlib import Path

import pytest
import torch
from helpers import encoded_sample, tiny_llava
from torch.utils._python_dispatch import TorchDispatchMode

from mmscene.data.pipeline.collate import pad_collate
from mmscene.data.pipeline.packing import packed_collate
from mmscene.model import load_pretrained
from mmscene.train.inputs import core_inputs

PACKAGE = str(Path(__file__).resolve().parents[1] / "mmscene")
TORCH = str(Path(torch.__file__).resolve().parent)
# ops whose result the host must read: a scalar read-back, or an output sized by the data
SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}


class DeviceReads(TorchDispatchMode):
    """Records the mmscene source line behind every op that makes the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = str(func).startswith("aten.index.Tensor") and any(
            getattr(i, "dtype", None) == torch.bool
            for i in (args[1] if len(args) > 1 else ())
            if i is not None
        )
        if str(func) in SYNCING or boolean_index:
            # the innermost caller outside torch: mmscene's line, or a library's (transformers
            # builds its attention masks with a read-back or two: not ours to remove)
            caller = [f for f in traceback.extract_stack() if not f.filename.startswith(TORCH)][-2]
            if caller.filename.startswith(PACKAGE):
                self.lines.append(f"{Path(caller.filename).name}:{caller.lineno} {caller.line}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_training_step_has_no_device_reads_of_its_own(tmp_path, layout):
    tiny_llava().save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    samples = [
        encoded_sample(9, 1),
        encoded_sample(6, 2, n_images=1),
        encoded_sample(12, 3),
        encoded_sample(5, 4, n_images=2),
    ]
    batch = (
        packed_collate(samples, 0, rows=[[0, 1], [2, 3]]) if layout == "packed" else pad_collate(samples, 0)
    )
    summed = {"kernel": "chunked", "chunk_tokens": 4, "positions": batch["label_positions"]}
    groups = torch.zeros_like(batch["sample_index"])
    with DeviceReads() as reads:
        loss, count, by_group = model(
            **core_inputs(batch),
            labels=batch["labels"],
            summed_loss={**summed, "groups": groups, "num_groups": 1},
        )
        (loss / count).backward()
    assert reads.lines == []
    # and the host's gather index gives the device's answer
    with torch.no_grad():
        reference = model(
            **{**core_inputs(batch), "host": None}, labels=batch["labels"], summed_loss={"kernel": "plain"}
        )
    torch.testing.assert_close(
        torch.stack([loss, count]).detach(), torch.stack(reference), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(by_group[0], torch.stack(reference), rtol=1e-5, atol=1e-5)


def test_the_detector_sees_a_device_read(tmp_path):
    """Without the host's counts the core counts image positions on the device: seen."""
    tiny_llava().save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    batch = pad_collate([encoded_sample(6, 2, n_images=1)], 0)
    with DeviceReads() as reads, torch.no_grad():
        model(
            **{**core_inputs(batch), "host": None}, labels=batch["labels"], summed_loss={"kernel": "chunked"}
        )
    assert any("image_mask.sum()" in line for line in reads.lines), reads.lines
    assert any("nonzero" in line for line in reads.lines), reads.lines

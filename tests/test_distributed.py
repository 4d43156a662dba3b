"""Two CPU ranks (gloo): DDP and FSDP2 agree with one process; FSDP2 validates and resumes exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmscene.model import save_pretrained

TESTS = Path(__file__).resolve().parent


def _run(
    out: Path, strategy: str, devices: int, steps: int, data: Path, *extra: str
) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable,
        str(TESTS / "dist_script.py"),
        *("--out", str(out), "--strategy", strategy, "--devices", str(devices)),
        *("--steps", str(steps), "--data", str(data), *extra),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def _telemetry(out: Path) -> list:
    return json.loads((out / "telemetry.json").read_text())


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory, demo_data):
    """One process, the whole global batch of 8 as one micro-batch."""
    out = tmp_path_factory.mktemp("single")
    done = _run(out, "single", 1, 4, demo_data)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single_lora(tmp_path_factory, demo_data):
    """One process with LoRA adapters, the whole global batch as one micro-batch."""
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("single-lora")
    done = _run(out, "single", 1, 4, demo_data, "--lora")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "strategy,devices,accumulate,extra",
    [
        ("single", 1, 2, ()),
        ("ddp", 2, 2, ()),
        ("fsdp2", 2, 2, ()),
        ("fsdp2", 2, 2, ("--compile", "--checkpointing")),
        ("ddp", 2, 2, ("--lora",)),
        ("fsdp2", 2, 2, ("--lora",)),
    ],
    ids=[
        "1proc-2micro",
        "ddp-2x2",
        "fsdp2-2x2",
        "fsdp2-2x2-compiled-checkpointed",
        "ddp-2x2-lora",
        "fsdp2-2x2-lora",
    ],
)
def test_step_is_the_mean_over_all_labelled_tokens(
    tmp_path, demo_data, request, strategy, devices, accumulate, extra
):
    """The same global batch as 1 micro-batch, as 2 micro-batches, and as 2 ranks x 2 micro-batches
    with unequal labelled-token counts (also with compiled blocks and activation checkpointing, and
    with LoRA adapters against one LoRA process): same gradients, same logged loss, same weights."""
    single = request.getfixturevalue("single_lora" if "--lora" in extra else "single")
    done = _run(tmp_path, strategy, devices, 4, demo_data, "--accumulate", str(accumulate), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    ref, got = _steps(single), _steps(tmp_path)
    assert [sorted(s["keys"]) for s in got] == [sorted(s["keys"]) for s in ref]  # same global batches
    counts = [n for s in got for part in s["labels"] for n in part]
    assert len(set(counts)) > 1, counts  # micro-batches really differ in labelled tokens
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (
            a["step"],
            a["loss"],
            b["loss"],
        )
    assert ref[-1]["loss"] < ref[0]["loss"]  # it trains
    compiled = json.loads((tmp_path / "compiled.json").read_text()).get("unique_graphs", 0)
    assert (compiled > 0) == ("--compile" in extra), compiled
    # the telemetry sees the same steps: gradient norm (of sharded gradients under FSDP2) and
    # per-scenario losses summed over ranks
    seen, expected = _telemetry(tmp_path), _telemetry(single)
    assert [step for step, _ in seen] == [step for step, _ in expected] == [0, 1, 2, 3]
    scenarios = set()
    for (_, a), (_, b) in zip(expected, seen):
        names = {k for k in a if k.startswith("train/loss/")}
        assert names == {k for k in b if k.startswith("train/loss/")}
        scenarios |= names
        for name in names | {"train/grad_norm"}:
            assert b[name] == pytest.approx(a[name], rel=1e-4), name
    assert len(scenarios) > 1, scenarios
    ga, gb = _load(single / "grads.pt"), _load(tmp_path / "grads.pt")
    assert sorted(ga) == sorted(gb) and ga
    llm = [n for n in ga if n.startswith("language_model.")]
    assert llm and all((".lora_" in n) == ("--lora" in extra) for n in llm)  # LoRA: only adapters
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-6, rtol=1e-4, msg=name)
    wa, wb = _load(single / "weights.pt"), _load(tmp_path / "weights.pt")
    for name in wa:
        # summation order differs across ranks: float rounding, not data, separates the weights
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_fsdp2_two_rank_exact_resume(tmp_path, demo_data, request, variant):
    """Killed and resumed under FSDP2 == uninterrupted, also with LoRA over a pretrained base
    (whose sharded checkpoint keeps the base: Lightning's sharded load reads every key)."""
    k, total = 3, 6
    stream = ("--mode", "stream")
    if variant == "lora":
        pytest.importorskip("peft")
        stream += (
            "--lora",
            "--freeze-vision",
            "--pretrained",
            str(request.getfixturevalue("tiny_pretrained")),
        )
    full = _run(tmp_path / "full", "fsdp2", 2, total, demo_data, *stream)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(tmp_path / "killed", "fsdp2", 2, total, demo_data, *stream, "--kill-at", str(k + 1))
    assert killed.returncode != 0
    ckpt = next((tmp_path / "killed" / "ckpts").glob(f"*step={k}*"))
    assert ckpt.is_dir()  # a sharded (distributed) checkpoint
    if variant == "lora":
        from mmscene.train.checkpoint import read_training_checkpoint

        saved = read_training_checkpoint(ckpt)["state_dict"]
        assert any(".lora_A." in name for name in saved) and any(".base_layer." in name for name in saved)
    resumed = _run(tmp_path / "resumed", "fsdp2", 2, total, demo_data, *stream, "--ckpt", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = {s["step"]: s["keys"] for s in _steps(tmp_path / "full")}
    got = {s["step"]: s["keys"] for s in _steps(tmp_path / "resumed")}
    assert sorted(got) == list(range(k, total))
    assert got == {s: ref[s] for s in range(k, total)}  # no sample repeated or skipped, on both ranks
    wa = _load(tmp_path / "full" / "weights.pt")
    wb = _load(tmp_path / "resumed" / "weights.pt")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_export_hf_from_sharded_fsdp2_checkpoint(tmp_path, demo_data):
    """A sharded (distributed) checkpoint consolidates and exports to a transformers Llava."""
    from train_helpers import export_hf_and_compare

    done = _run(tmp_path / "run", "fsdp2", 2, 6, demo_data, "--mode", "stream", "--kill-at", "3")
    assert done.returncode != 0  # killed at step 3, after the step-2 checkpoint
    ckpt = next((tmp_path / "run" / "ckpts").glob("*step=2*"))
    export_hf_and_compare(ckpt, tmp_path / "hf")


def test_consolidation_reads_no_optimizer_state(tmp_path, demo_data, monkeypatch):
    """Reading a sharded checkpoint for export plans and reads the model's tensors only."""
    from torch.distributed.checkpoint import FileSystemReader

    from mmscene.train.checkpoint import read_training_checkpoint

    done = _run(tmp_path / "run", "fsdp2", 2, 6, demo_data, "--mode", "stream", "--kill-at", "3")
    assert done.returncode != 0
    ckpt = next((tmp_path / "run" / "ckpts").glob("*step=2*"))
    stored = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert any(k.startswith("optimizer_0.") for k in stored)  # the states are there to be skipped
    read: list[str] = []
    original = FileSystemReader.read_data

    def spy(self, plan, planner):
        read.extend(item.storage_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", spy)
    state = read_training_checkpoint(ckpt)["state_dict"]
    assert read and all(k.startswith("state_dict.") for k in read), sorted(set(read))[:5]
    assert len(state) == len({k for k in stored if k.startswith("state_dict.")})


def _unsharded_answers(out: Path, demo_data: Path, freeze_vision: bool) -> dict[str, str]:
    """Validation answers of the run's final weights, one process, no sharding."""
    import lightning as L
    from train_helpers import tiny_config

    from mmscene.train.datamodule import MMSceneDataModule
    from mmscene.train.module import MMSceneModule

    cfg = tiny_config(demo_data, out / "ref")
    cfg["model"]["model"]["config"]["text"]["tie_word_embeddings"] = False
    module = MMSceneModule(model=cfg["model"]["model"], max_new_tokens=3)
    module.configure_model()
    module.model.load_state_dict(_load(out / "weights.pt"))
    d = cfg["data"]
    dm = MMSceneDataModule(
        tokenizer=d["tokenizer"], val=d["val"], scenarios=d["scenarios"], eval_batch_size=8
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(out / "ref"),
    )
    trainer.validate(module, datamodule=dm)
    rows = [json.loads(line) for line in (out / "ref" / "predictions.jsonl").read_text().splitlines()]
    return {r["key"]: r["prediction"] for r in rows}


@pytest.mark.parametrize(
    "devices,extra",
    [
        (1, ("--freeze-vision",)),
        (2, ()),
        (2, ("--no-reshard-after-forward", "--freeze-vision", "--compile")),
    ],
    ids=["1rank-frozen-tower", "2ranks", "2ranks-no-reshard-frozen-tower-compiled"],
)
def test_fsdp2_fit_validates_like_the_unsharded_model(tmp_path, demo_data, devices, extra):
    """Generation under FSDP2 (the 7B recipe's validation) scores every task, and its answers are
    those of the same weights unsharded; test and predict generate on the sharded weights too."""
    done = _run(tmp_path, "fsdp2", devices, 2, demo_data, "--mode", "stream", "--validate", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "results.json").read_text().splitlines()]
    vals = [r for r in results if r["stage"] == "val"]
    assert [r["step"] for r in vals] == [2]
    scores = vals[0]["scores"]
    for scenario in ("single_image", "multi_image", "video", "3d"):
        assert any(k.startswith(f"{scenario}/") for k in scores), (scenario, sorted(scores))
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    sharded = {r["key"]: r["prediction"] for r in rows}
    assert len(sharded) == 16  # every validation sample once, padding dropped
    tests = [r for r in results if r["stage"] == "test"]  # trainer.test on the same weights
    assert len(tests) == 1 and tests[0]["scores"] == scores
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["id"] for a in answers) == sorted(sharded)  # trainer.predict: one answer per prompt
    assert any(a["answer"] for a in answers)  # generated text, not a row of empty strings
    # generated text (a near-initial model's), not the empty answers any weights could match
    assert all(sharded.values()), sharded
    assert sharded == _unsharded_answers(tmp_path, demo_data, "--freeze-vision" in extra)


def test_fsdp2_ranks_never_hold_the_full_model(tmp_path, demo_data):
    """Two ranks start from a saved checkpoint: only rank 0 builds the full model, every rank's
    parameters are still on meta when the weights are distributed, and training starts from
    exactly the saved weights."""
    from train_helpers import tiny_config

    from mmscene.train.module import MMSceneModule

    cfg = tiny_config(demo_data, tmp_path)
    cfg["model"]["model"]["config"]["text"]["tie_word_embeddings"] = False
    module = MMSceneModule(model=cfg["model"]["model"])
    module.configure_model()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # not a fresh init: a swapped tensor would show
    save_pretrained(module.model, tmp_path / "saved")
    saved = {k: v.clone() for k, v in module.model.state_dict().items()}
    done = _run(
        tmp_path / "run", "fsdp2", 2, 1, demo_data, "--pretrained", str(tmp_path / "saved"), "--probe-loading"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probes = [json.loads((tmp_path / "run" / f"loading-rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["full_builds"] for p in probes] == [1, 0]
    assert [p["meta_before_load"] for p in probes] == [[True], [True]]
    initial = _load(tmp_path / "run" / "initial.pt")
    assert sorted(initial) == sorted(saved)
    for name, value in saved.items():
        assert torch.equal(initial[name], value), name

"""``mmscene plan``: real-size parameter counts and per-GPU memory against a hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mmscene.cli import main as cli_main
from mmscene.data.pipeline.batching import TokenBudget
from mmscene.launch.plan import plan
from mmscene.model.config import MultimodalConfig

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3

# The presets' numbers, written out (Qwen1.5-Chat config.json, SigLIP so400m with 26 layers).
QWEN = {
    "qwen1.5-0.5b-chat": dict(h=1024, i=2816, L=24, a=16, kv_heads=16, V=151936, tied=True),
    "qwen1.5-7b-chat": dict(h=4096, i=11008, L=32, a=32, kv_heads=32, V=151936, tied=False),
}
SIGLIP = dict(h=1152, i=4304, L=26, patch=14, image=384, channels=3)


def hand_counts(llm: str) -> dict[str, int]:
    q, v = QWEN[llm], SIGLIP
    h, kv = q["h"], q["kv_heads"] * (q["h"] // q["a"])
    # q/k/v projections carry biases in Qwen2, o_proj does not; SwiGLU MLP; two RMSNorms
    decoder_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * q["i"] + 2 * h
    embed = q["V"] * h
    lm_head = 0 if q["tied"] else q["V"] * h
    llm_total = q["L"] * decoder_layer + embed + h + lm_head
    vh, positions = v["h"], (v["image"] // v["patch"]) ** 2
    # attention q/k/v/o with biases, fc1/fc2 with biases, two LayerNorms (weight + bias)
    vision_layer = 4 * (vh * vh + vh) + (vh * v["i"] + v["i"]) + (v["i"] * vh + vh) + 2 * 2 * vh
    vision_embed = v["channels"] * v["patch"] ** 2 * vh + vh + positions * vh
    post_layernorm = 2 * vh
    vision_total = v["L"] * vision_layer + vision_embed + post_layernorm
    projector = (vh * h + h) + (h * h + h)
    # Untied embeddings and LM head are FSDP2 units of their own; tied ones stay at the root.
    separate = 0 if q["tied"] else embed + lm_head
    return {
        "vision": vision_total,
        "projector": projector,
        "llm": llm_total,
        "total": vision_total + projector + llm_total,
        "trainable": projector + llm_total,  # vision frozen (the paper's recipe)
        "root": vision_embed + post_layernorm + projector + embed + h + lm_head - separate,
        "root_trainable": projector + embed + h + lm_head - separate,
        "largest_layer": max(decoder_layer, vision_layer, 0 if q["tied"] else embed),
        "extra_units": 0 if q["tied"] else 2,
        "positions": positions,
    }


def test_counts_match_the_architecture_doc():
    # docs/architecture.md's table, itself checked against the closed form in tests/test_core.py
    assert hand_counts("qwen1.5-0.5b-chat")["total"] == 863_965_728
    assert hand_counts("qwen1.5-7b-chat")["total"] == 8_140_576_288
    assert hand_counts("qwen1.5-7b-chat")["projector"] == 21_504_000


@pytest.mark.parametrize("llm", sorted(QWEN))
@pytest.mark.parametrize(("nodes", "gpus"), [(1, 8), (2, 8)])
def test_real_size_plan_matches_hand_computation(llm, nodes, gpus):
    s, b = 4096, 2
    got = plan(
        MultimodalConfig(vision="siglip-so400m-patch14-384-26l", text=llm),
        nodes=nodes,
        gpus_per_node=gpus,
        freeze=["vision"],
        max_length=s,
        micro_batch=b,
        param_dtype="bfloat16",
        reduce_dtype="float32",
    )
    c, q = hand_counts(llm), QWEN[llm]
    for part in ("vision", "projector", "llm", "total"):
        assert got.params[part]["total"] == c[part], part
    assert got.params["vision"]["trainable"] == 0
    assert got.trainable_params == c["trainable"]
    assert got.root_params == c["root"]
    assert got.largest_unit == c["largest_layer"]
    assert got.num_units == q["L"] + SIGLIP["L"] + c["extra_units"]

    n = nodes * gpus
    P, T = c["total"], c["trainable"]
    assert got.fsdp["params"] == math.ceil(4 * P / n)  # fp32 master weights, all parts sharded
    assert got.fsdp["grads"] == math.ceil(4 * T / n)  # fp32 grads of trainable weights only
    assert got.fsdp["optimizer"] == math.ceil(8 * T / n)  # AdamW: two fp32 states
    assert got.fsdp["gathered"] == 2 * (c["root"] + 2 * c["largest_layer"])  # bf16
    assert got.fsdp["unsharded_grads"] == (2 + 4) * max(c["root_trainable"], c["largest_layer"])
    assert got.ddp["total_without_activations"] == 4 * P + 4 * T + 8 * T + 4 * T

    h, a, L, V = q["h"], q["a"], q["L"], q["V"]
    layer = s * b * h * 34 + 5 * a * s * s * b  # = s*b*h*(34 + 5*a*s/h)
    mask = b * s * s  # boolean padding mask of b > 1 rows, shared by the layers
    logits = s * b * V * (2 + 4)
    logits_grad = s * b * V * (4 + 2)  # fp32 loss gradient + bf16 cast, while the logits are held
    acts = got.activations
    assert acts["batching"]["mode"] == "samples" and acts["tokens"] == s * b
    assert acts["full"]["stored"] == L * layer + mask + logits  # frozen tower: nothing kept
    assert acts["full"]["total"] == L * layer + mask + logits + logits_grad
    assert acts["full"]["total_sdpa"] == L * s * b * h * 34 + mask + logits + logits_grad
    assert acts["checkpointed"]["total"] == L * 2 * s * b * h + layer + mask + logits + logits_grad
    assert (
        got.fsdp["total"] == got.fsdp["total_without_activations"] + L * layer + mask + logits + logits_grad
    )


def test_more_gpus_shrink_sharded_bytes_not_replicated_ones():
    cfg = MultimodalConfig(text="qwen1.5-7b-chat")
    one, two = plan(cfg, nodes=1, gpus_per_node=8), plan(cfg, nodes=2, gpus_per_node=8)
    for key in ("params", "grads", "optimizer", "states"):
        assert two.fsdp[key] < one.fsdp[key]
        assert two.fsdp[key] == pytest.approx(one.fsdp[key] / 2, abs=1)
    assert two.fsdp["gathered"] == one.fsdp["gathered"]  # a gathered layer is whole on every GPU
    assert two.ddp == one.ddp
    hybrid = plan(cfg, nodes=2, gpus_per_node=8, hybrid=True)  # shards within a node only
    assert hybrid.shard_size == 8 and hybrid.fsdp["states"] == one.fsdp["states"]
    # the 7B with AdamW does not fit 80 GB replicated, and does sharded over 16
    assert two.ddp["total_without_activations"] > 80e9 > two.fsdp["total_without_activations"]


def test_trained_tower_adds_vision_activations():
    cfg = MultimodalConfig(text="qwen1.5-0.5b-chat")
    frozen = plan(cfg, nodes=1, gpus_per_node=8, micro_batch=1, images_per_sample=4)
    trained = plan(cfg, nodes=1, gpus_per_node=8, micro_batch=1, images_per_sample=4, freeze=[])
    c, v = hand_counts("qwen1.5-0.5b-chat"), SIGLIP
    assert trained.trainable_params == c["total"] - 2 * v["h"]  # post_layernorm never reaches the features
    sv, images = c["positions"], 4
    vision_layer = sv * images * v["h"] * 34 + 5 * 16 * sv * sv * images
    assert trained.activations["full"]["vision"] == v["L"] * vision_layer
    assert frozen.activations["full"]["vision"] == 0


def test_cli_reads_the_yaml(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "model": {
                        "config": {"vision": "siglip-so400m-patch14-384-26l", "text": "qwen1.5-0.5b-chat"}
                    },
                    "freeze": ["vision"],
                    "fsdp": {"param_dtype": "bfloat16", "hybrid": True},
                    "activation_checkpointing": True,
                },
                "data": {"max_length": 2048, "batch_size": 3},
            }
        )
    )
    assert cli_main(["plan", "--config", str(config), "--nodes", "2", "--gpus-per-node", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["shard_size"] == 8 and got["hybrid"] is True
    assert got["activation_checkpointing"] is True
    assert got["activations"]["max_length"] == 2048 and got["activations"]["micro_batch"] == 3
    assert got["params"]["total"]["trainable"] == hand_counts("qwen1.5-0.5b-chat")["trainable"]
    # the table names the formula it used
    assert cli_main(["plan", "--model", "qwen1.5-7b-chat", "--nodes", "1", "--gpus-per-node", "8"]) == 0
    table = capsys.readouterr().out
    assert "s*b*h*(34 + 5*a*s/h)" in table and "s*b*V*(2+4)" in table and "DDP" in table
    assert "s*b*V*(4+2)" in table


def test_cli_model_preset_stands_in_for_an_unreadable_checkpoint(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"model": {"pretrained": str(tmp_path / "absent")}},
                "data": {"max_length": 1024, "batch_size": 4},
            }
        )
    )
    with pytest.raises(SystemExit, match="add --model"):
        cli_main(["plan", "--config", str(config), "--nodes", "1", "--gpus-per-node", "8"])
    args = [
        "plan",
        "--config",
        str(config),
        "--model",
        "qwen1.5-0.5b-chat",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
    ]
    assert cli_main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["params"]["total"]["total"] == hand_counts("qwen1.5-0.5b-chat")["total"]
    assert got["activations"]["max_length"] == 1024 and got["activations"]["micro_batch"] == 4
    assert got["freeze"] == ["vision"]  # MMSceneModule's default when the YAML names none


# (budget, data.max_length) -> (tokens n per micro-batch, row length s, rows with a mask)
BUDGETS = {
    "packed, one row": (TokenBudget(max_tokens=8192), 4096, (8192, 8192, 1)),
    "packed, two rows": (TokenBudget(max_tokens=16384, row_tokens=8192), 8192, (16384, 8192, 2)),
    # rows hold up to max_length; the budget's tokens bound the linear terms, the longest row the scores
    "not packed": (TokenBudget(max_tokens=16384, pack=False), 6000, (16384, 6000, 2)),
    "not packed, one row": (TokenBudget(max_tokens=8192, pack=False), 8192, (8192, 8192, 0)),
}


@pytest.mark.parametrize("name", sorted(BUDGETS))
@pytest.mark.parametrize("llm", sorted(QWEN))
def test_token_budget_plan_matches_hand_computation(llm, name):
    budget, max_length, (n, s, mask_rows) = BUDGETS[name]
    got = plan(
        MultimodalConfig(vision="siglip-so400m-patch14-384-26l", text=llm),
        nodes=2,
        gpus_per_node=8,
        max_length=max_length,
        micro_batch=7,  # ignored with a token budget
        batching=budget,
        activation_checkpointing=True,
    )
    q = QWEN[llm]
    h, a, L, V = q["h"], q["a"], q["L"], q["V"]
    acts = got.activations
    assert acts["batching"]["mode"] == "tokens" and acts["micro_batch"] is None
    assert (acts["tokens"], acts["row_length"]) == (n, s)
    layer = n * h * 34 + 5 * a * s * n  # n*h*(34 + 5*a*s/h): n tokens in rows of s
    mask = mask_rows * s * s
    logits, logits_grad = n * V * (2 + 4), n * V * (4 + 2)
    assert acts["mask"] == mask
    assert acts["full"]["total"] == L * layer + mask + logits + logits_grad
    assert acts["checkpointed"]["total"] == L * 2 * n * h + layer + mask + logits + logits_grad
    assert acts["checkpointed"]["total_sdpa"] == L * 2 * n * h + n * h * 34 + mask + logits + logits_grad
    assert (
        got.fsdp["total_sdpa"] == got.fsdp["total_without_activations"] + acts["checkpointed"]["total_sdpa"]
    )


def test_packed_rows_plan_like_full_padded_samples():
    """Two packed rows of s are, for memory, two samples of s: the same tensors."""
    cfg = MultimodalConfig(text="qwen1.5-0.5b-chat")
    samples = plan(cfg, nodes=1, gpus_per_node=8, max_length=4096, micro_batch=2)
    packed = plan(cfg, nodes=1, gpus_per_node=8, max_length=4096, batching=TokenBudget(8192, row_tokens=4096))
    for key in ("full", "checkpointed"):
        assert packed.activations[key] == samples.activations[key]
    assert packed.fsdp == samples.fsdp


def test_cli_reads_token_budget_and_says_which_batching(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    data = {"max_length": 4096, "batch_size": 3, "batching": {"mode": "tokens", "max_tokens": 12288}}
    config.write_text(yaml.safe_dump({"model": {"model": {"config": {}}}, "data": data}))
    args = ["plan", "--config", str(config), "--nodes", "1", "--gpus-per-node", "8"]
    assert cli_main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["activations"]
    assert got["batching"]["mode"] == "tokens" and got["batching"]["pack"] is True
    assert (got["tokens"], got["row_length"], got["rows"]) == (12288, 12288, 1)
    assert cli_main(args) == 0
    assert "batching: token budget, packed (data.batching): max_tokens=12288" in capsys.readouterr().out
    # --micro-batch plans samples instead, --max-tokens another budget
    assert cli_main([*args, "--micro-batch", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["activations"]
    assert got["batching"]["mode"] == "samples" and (got["tokens"], got["micro_batch"]) == (8192, 2)
    assert cli_main([*args, "--max-tokens", "8192", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["activations"]["tokens"] == 8192
    with pytest.raises(SystemExit):
        cli_main([*args, "--micro-batch", "2", "--max-tokens", "8192"])
    capsys.readouterr()
    assert cli_main([*args, "--max-tokens", "2048"]) == 0  # a row shorter than max_length
    assert "the data module refuses" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "preset", "nodes", "strategy"),
    [
        ("interleave-qwen-0.5b", "qwen1.5-0.5b-chat", 1, "ddp"),
        ("interleave-qwen-7b", "qwen1.5-7b-chat", 4, "fsdp2"),
    ],
)
def test_shipped_recipes_plan_to_fit_80gb_with_their_token_budget(name, preset, nodes, strategy, capsys):
    config = str(REPO / "configs" / f"{name}.yaml")
    args = ["plan", "--config", config, "--model", preset, "--nodes", str(nodes), "--gpus-per-node", "8"]
    assert cli_main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["strategy"] == strategy and got["activation_checkpointing"] is True
    acts = got["activations"]
    assert acts["batching"]["mode"] == "tokens" and acts["batching"]["pack"] is True
    assert acts["max_length"] <= acts["row_length"]  # the data module's check
    total = got["ddp" if strategy == "ddp" else "fsdp"]["total_sdpa"]
    assert total * 1.15 <= 79.6 * GiB  # with the allowance for CUDA context, NCCL, fragmentation
    assert cli_main(args) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "<- configured strategy" in line)
    assert "SDPA" in line and " fits 79.6 GiB" in line


# Peak torch.cuda.max_memory_allocated of a real FSDP2 step on one H200 (0.5B config, bf16 compute /
# fp32 reduce, AdamW, SDPA, one 729-token image per sample, b = 1), as recorded in docs/slurm.md.
H200_PEAKS_GIB = {(2048, False): 12.9, (8192, False): 29.9, (2048, True): 10.8, (8192, True): 21.6}


@pytest.mark.parametrize(("s", "checkpointing"), sorted(H200_PEAKS_GIB))
def test_plan_is_a_safe_bound_on_the_measured_gpu_peak(s, checkpointing):
    """Measured, not the planner's own arithmetic: the plan never undershoots a real step's peak
    and overshoots it by at most a quarter; the docs' table shows the same numbers."""
    got = plan(
        MultimodalConfig(vision="siglip-so400m-patch14-384-26l", text="qwen1.5-0.5b-chat"),
        nodes=1,
        gpus_per_node=1,
        max_length=s,
        micro_batch=1,
        images_per_sample=1,
        activation_checkpointing=checkpointing,
    )
    measured = H200_PEAKS_GIB[(s, checkpointing)]
    planned = got.fsdp["total_sdpa"] / GiB
    assert measured <= planned <= 1.25 * measured
    row = f"| {s} | {'yes' if checkpointing else 'no'} | {measured} GiB | "
    docs = (REPO / "docs" / "slurm.md").read_text()
    assert row in docs, row
    shown = float(docs.split(row, 1)[1].split(" GiB", 1)[0])
    assert shown == pytest.approx(planned, abs=0.051), (row, planned)


def test_layer_activation_bench_runs(tmp_path):
    """The bench that counts saved tensors keeps working (it documents the per-layer term)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "layer_activations.py"), "--tokens", "16"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    ratios = [float(line.split()[-1]) for line in out.splitlines()[1:-1]]
    assert len(ratios) == 3 and all(0.3 < r < 3 for r in ratios), out


@pytest.mark.parametrize("llm", sorted(QWEN))
def test_plan_learns_the_fused_loss(llm):
    """With training's fused loss the logits terms shrink to one chunk plus the gradients made in
    forward; everything else is the full-logits plan's."""
    cfg = MultimodalConfig(vision="siglip-so400m-patch14-384-26l", text=llm)
    common = dict(nodes=1, gpus_per_node=8, max_length=16384, micro_batch=1, activation_checkpointing=True)
    full, fused = plan(cfg, **common), plan(cfg, **common, loss_chunk_tokens=512)
    q = QWEN[llm]
    h, V, n = q["h"], q["V"], 16384
    assert fused.activations["logits"] == 512 * V * (2 + 4)
    assert fused.activations["logits_grad"] == V * h * 4 + n * h * 2
    saved = (full.activations["logits"] + full.activations["logits_grad"]) - (
        fused.activations["logits"] + fused.activations["logits_grad"]
    )
    assert full.fsdp["total"] - fused.fsdp["total"] == saved > 20 * 2**30  # 16k x 152k logits: ~28 GiB


@pytest.mark.parametrize("llm", sorted(QWEN))
def test_plan_learns_lora(llm):
    """With LoRA the trained parameters are the adapters (r x (in + out) per adapted projection)
    and the projector: gradients and AdamW states shrink to those, the weights stay."""
    pytest.importorskip("peft")
    cfg = MultimodalConfig(vision="siglip-so400m-patch14-384-26l", text=llm)
    common = dict(
        nodes=1, gpus_per_node=8, max_length=8192, activation_checkpointing=True, loss_chunk_tokens=512
    )
    r = 16
    full, lora = plan(cfg, **common), plan(cfg, **common, lora={"r": r})
    q, counts = QWEN[llm], hand_counts(llm)
    h, kv, i = q["h"], q["kv_heads"] * (q["h"] // q["a"]), q["i"]
    # q, k, v, o, gate, up, down: (in, out) per layer
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    adapters = q["L"] * sum(r * (a + b) for a, b in shapes)
    assert lora.params["total"]["trainable"] == adapters + counts["projector"]
    assert lora.params["total"]["total"] == counts["total"] + adapters
    m = 4  # fp32 master weights, gradients and AdamW moments
    assert lora.ddp["optimizer"] == 2 * (adapters + counts["projector"]) * m
    assert lora.ddp["params"] == full.ddp["params"] + adapters * m
    assert lora.ddp["total"] < full.ddp["total"] - 2 * m * counts["llm"]  # grads + AdamW of the LLM gone


def test_plan_counts_what_the_module_trains_with_lora(demo_data, tmp_path):
    """The plan's trainable count is what MMSceneModule trains with the same LoRA options."""
    pytest.importorskip("peft")
    from train_helpers import tiny_config

    from mmscene.train.module import MMSceneModule

    spec = tiny_config(demo_data, tmp_path)["model"]["model"]
    lora = {"r": 4, "tower": True}
    module = MMSceneModule(model=spec, freeze=["vision"], lora=lora)
    module.configure_model()
    trained = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    planned = plan(MultimodalConfig(**spec["config"]), nodes=1, gpus_per_node=1, freeze=["vision"], lora=lora)
    assert planned.params["total"]["trainable"] == trained
    assert planned.params["vision"]["trainable"] > 0  # the tower's adapters train though it is frozen

"""``mmscene slurm --signal-lead auto``: the lead against a hand computation for the shipped recipes.

Their ``pretrained: llava-hf/...`` hub ids are not readable offline; ``--model PRESET`` stands in
with the same architecture (as for ``mmscene plan``), the rest (freeze, strategy) comes from the YAML.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from test_plan import hand_counts

from mmscene.cli import main as cli_main
from mmscene.launch.lead import size_lead

REPO = Path(__file__).resolve().parents[1]


def _signal(script: str) -> str:
    (line,) = [line for line in script.splitlines() if line.startswith("#SBATCH --signal=")]
    return line.split()[1].removeprefix("--signal=")


def _hand_lead(llm: str, writing_nodes: int, gbps: float = 1.0, step: float = 60, margin: float = 30):
    c = hand_counts(llm)  # vision frozen, as both recipes freeze it
    size = 4 * c["total"] + 2 * 4 * c["trainable"]  # fp32 weights + AdamW's two fp32 states
    write = size / (gbps * 1e9 * writing_nodes)
    return size, write, math.ceil(step + write + margin)


def _script(capsys, config: str, *args: str) -> str:
    argv = ["slurm", "--config", str(REPO / "configs" / config), "--gpus-per-node", "8", *args]
    assert cli_main(argv) == 0
    return capsys.readouterr().out


# recipe, preset, strategy's writing nodes per node count
RECIPES = {
    # DDP: rank 0 writes one file, however many nodes
    "interleave-qwen-0.5b.yaml": ("qwen1.5-0.5b-chat", lambda nodes: 1),
    # FSDP2 (ModelParallelStrategy): every rank writes its shard, the nodes in parallel
    "interleave-qwen-7b.yaml": ("qwen1.5-7b-chat", lambda nodes: nodes),
}


@pytest.mark.parametrize("config", sorted(RECIPES))
@pytest.mark.parametrize("nodes", [1, 4])
def test_auto_lead_of_the_recipes_matches_hand_computation(config, nodes, capsys, tmp_path):
    preset, writers = RECIPES[config]
    size, write, lead = _hand_lead(preset, writers(nodes))
    script = _script(capsys, config, "--model", preset, "--nodes", str(nodes), "--chdir", str(tmp_path))
    assert _signal(script) == f"USR1@{lead}"
    assert f"{size / 1e9:.1f} GB = fp32 weights" in script
    assert f"{write:.1f} s" in script and f"rounded up: --signal=USR1@{lead}" in script


def test_the_numbers_written_out():
    # 0.5B: 863,965,728 parameters, 466,217,984 trained: 7.19 GB, one writer at 1 GB/s
    assert _hand_lead("qwen1.5-0.5b-chat", 1)[2] == math.ceil(60 + 7.185606784 + 30) == 98
    # 7B: 8,140,576,288 parameters, 7,742,828,544 trained: 94.5 GB over 4 nodes
    assert _hand_lead("qwen1.5-7b-chat", 4)[0] == 94_504_933_504
    assert _hand_lead("qwen1.5-7b-chat", 4)[2] == math.ceil(60 + 94.504933504 / 4 + 30) == 114
    assert _hand_lead("qwen1.5-7b-chat", 1)[2] == 185  # one node: over twice the former 90 s


def test_auto_lead_options(capsys, tmp_path):
    size, _, _ = _hand_lead("qwen1.5-7b-chat", 4)
    slow = _script(
        capsys,
        "interleave-qwen-7b.yaml",
        *("--model", "qwen1.5-7b-chat", "--nodes", "4", "--chdir", str(tmp_path)),
        *("--checkpoint-write-gbps", "0.25", "--step-seconds", "120", "--signal-margin", "10"),
    )
    assert _signal(slow) == f"USR1@{math.ceil(120 + size / (0.25e9 * 4) + 10)}"
    usr2 = _script(
        capsys,
        "interleave-qwen-7b.yaml",
        *("--model", "qwen1.5-7b-chat", "--nodes", "4", "--chdir", str(tmp_path), "--requeue-signal", "USR2"),
    )
    assert _signal(usr2) == "USR2@114" and "rounded up: --signal=USR2@114" in usr2
    lead = size_lead(10**9, 0, nodes=8, sharded=True, write_gbps=2.0, step_seconds=0, margin_seconds=0)
    assert (lead.checkpoint_bytes, lead.writing_nodes, lead.seconds) == (4 * 10**9, 8, 1)


def test_seconds_given_and_the_old_spelling(capsys, tmp_path):
    for flag in ("--signal-lead", "--signal-seconds"):
        script = _script(
            capsys, "interleave-qwen-7b.yaml", "--nodes", "4", "--chdir", str(tmp_path), flag, "300"
        )
        assert _signal(script) == "USR1@300"  # no model needed: nothing is sized
        assert "(--signal-lead 300)" in script and "fp32 weights" not in script


def test_auto_lead_needs_a_readable_model_and_time_for_it(capsys, tmp_path):
    config = tmp_path / "hub.yaml"
    config.write_text(yaml.safe_dump({"model": {"model": {"pretrained": str(tmp_path / "absent")}}}))
    with pytest.raises(SystemExit, match="--model PRESET.*--signal-lead SECONDS"):
        cli_main(["slurm", "--config", str(config), "--nodes", "1", "--gpus-per-node", "8"])
    with pytest.raises(SystemExit, match="is not there"):
        cli_main(["slurm", "--config", str(tmp_path / "nope.yaml"), "--nodes", "1", "--gpus-per-node", "8"])
    with pytest.raises(SystemExit, match="not shorter than --time 0:90"):
        _script(
            capsys,
            "interleave-qwen-7b.yaml",
            *("--model", "qwen1.5-7b-chat", "--nodes", "1", "--chdir", str(tmp_path), "--time", "0:90"),
        )

"""SIGKILLed at random points, resumed from ``last`` each time: the same run as uninterrupted.

Each strategy (1 process, 2-rank DDP, 2-rank FSDP2 with distributed checkpoint folders) trains
tests/dist_script.py's stream-mode run with a checkpoint after every step (``last.ckpt`` and
the newest ``epoch=0-step=S.ckpt``). A seeded plan kills it again and again, at the start of a
step or in the middle of a save: written but not renamed, between moving the old ``last.ckpt``
aside and renaming the new one in, or halfway through removing the previous step checkpoint.
Every relaunch passes ``--ckpt last``. After each kill the test checks which temporaries it left
and which checkpoint the next launch took; at the end the weights (bit for bit) and the samples
of every step equal the uninterrupted run's.

``MMSCENE_SLOW=1`` runs longer plans; ``MMSCENE_SOAK_SEED`` replays one (the plan and its seed
are printed, and in every assertion message).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
SLOW = os.environ.get("MMSCENE_SLOW") == "1"
STEPS, KILLS = (10, 5) if SLOW else (6, 2)
STRATEGIES = {"single": 1, "ddp": 2, "fsdp2": 2}
ASIDE, PARTIAL, REMOVING = ".replaced-", ".partial-", ".removing-"


def _launch(out: Path, strategy: str, data: Path, *extra: str, steps: int = STEPS) -> tuple[int, str]:
    """One launch of the job; when its first rank ends, whatever else is left of it (other ranks,
    loader workers) is killed, as a scheduler ends a job whose main process died."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable,
        str(TESTS / "dist_script.py"),
        *("--out", str(out), "--strategy", strategy, "--devices", str(STRATEGIES[strategy])),
        *("--steps", str(steps), "--data", str(data), "--mode", "stream", "--checkpoint-every", "1", *extra),
    ]
    log = out / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return rc, log.read_text()


def _records(out: Path) -> list[dict]:
    path = out / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plan(seed: int, steps: int = STEPS, kills: int = KILLS) -> list[tuple[int, str]]:
    """Kill points ``(step, phase)``, increasing steps; each phase is possible where it is put:
    ``swap`` needs a ``last.ckpt`` to replace, ``remove`` a step checkpoint written by this launch."""
    rng = random.Random(seed)
    points, previous = [], 0
    for step in sorted(rng.sample(range(1, steps), kills)):
        phases = ["step", "written:0", "written:1"]
        phases += ["swap"] if step >= 2 else []
        phases += ["remove"] if step >= previous + 2 else []
        points.append((step, rng.choice(phases)))
        previous = step
    return points


def _left_behind(phase: str, step: int) -> set[str]:
    """The temporaries a kill in ``phase`` at ``step`` leaves in the checkpoint folder."""
    this, before = f"epoch=0-step={step}.ckpt", f"epoch=0-step={step - 1}.ckpt"
    return {
        "step": set(),
        "written:0": {PARTIAL + this},
        "written:1": {PARTIAL + "last.ckpt"},
        "swap": {PARTIAL + "last.ckpt", ASIDE + "last.ckpt"},
        "remove": {REMOVING + before},
    }[phase]


def _newest_saved(phase: str, step: int, resumed_at: int, before: tuple[str, int] | None):
    """The checkpoint renamed into place last (what the next launch must take) and its step,
    after a launch that resumed at ``resumed_at`` and saved at steps ``resumed_at + 1 .. step``
    (both checkpoints at each) until the kill."""
    if phase == "step":  # killed as the next step started: step's saves were done
        return "last.ckpt", step
    if phase == "written:0":  # the step checkpoint was not renamed in
        return ("last.ckpt", step - 1) if step - 1 > resumed_at else before
    return f"epoch=0-step={step}.ckpt", step  # renamed in; last.ckpt was not


def _temporaries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith((ASIDE, PARTIAL, REMOVING))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_data):
    runs = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            out = tmp_path_factory.mktemp(f"full-{strategy}")
            rc, log = _launch(out, strategy, demo_data)
            assert rc == 0, log[-3000:]
            runs[strategy] = out
        return runs[strategy]

    return run


def _assert_same_run(out: Path, reference: Path, context: str) -> None:
    ref = {r["step"]: r["keys"] for r in _records(reference)}
    assert sorted(ref) == list(range(STEPS))
    seen: dict[int, list] = {}
    for r in _records(out):  # steps done again after a resume must see the same samples again
        assert seen.setdefault(r["step"], r["keys"]) == r["keys"], (context, r["step"])
    assert seen == ref, context
    a, b = torch.load(reference / "weights.pt"), torch.load(out / "weights.pt")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), (context, name)


def _seed(strategy: str) -> int:
    if "MMSCENE_SOAK_SEED" in os.environ:
        return int(os.environ["MMSCENE_SOAK_SEED"])
    # Short plans: seeds whose plans together cover every phase, FSDP2's a replacement of a folder.
    return random.SystemRandom().randrange(10**6) if SLOW else {"single": 1, "ddp": 26, "fsdp2": 16}[strategy]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_killed_again_and_again_resumes_exactly(tmp_path, demo_data, uninterrupted, strategy):
    seed = _seed(strategy)
    points = plan(seed)
    context = f"{strategy}: MMSCENE_SOAK_SEED={seed} plan={points}"
    print(context)
    out, ckpts = tmp_path / "run", tmp_path / "run" / "ckpts"
    expected = None  # (checkpoint name, step) the next launch must take; None: a fresh start
    left: set[str] = set()  # temporaries the last kill left
    for step, phase in points + [(None, None)]:
        crash = ("--crash", f"{step}:{phase}") if step is not None else ()
        before = len(_records(out))
        rc, log = _launch(out, strategy, demo_data, "--ckpt", "last", *crash)
        records = _records(out)[before:]
        where = f"{context}, launch crashing at {step}:{phase}"
        if expected is None:
            assert "resume (last): no complete checkpoint" in log, (where, log[-3000:])
        else:
            assert f"resume (last): taking {ckpts / expected[0]}," in log, (where, log[-3000:])
        for leftover in left - {ASIDE + "last.ckpt"}:  # that one is complete: merely older
            assert re.search(rf"{re.escape(leftover)}: [a-z]", log), (where, leftover)  # passed over
        assert records[0]["step"] == (expected[1] if expected else 0), (where, records[0])
        if step is None:
            assert rc == 0, (where, log[-3000:])
            break
        assert rc == -signal.SIGKILL, (where, rc, log[-3000:])
        left = _left_behind(phase, step)
        assert _temporaries(ckpts) == left, where  # what the kill left; earlier leftovers were cleaned
        expected = _newest_saved(phase, step, records[0]["step"], expected)
    assert _temporaries(ckpts) == set(), context
    _assert_same_run(out, uninterrupted(strategy), context)


def test_torn_distributed_last_ckpt_falls_back(tmp_path, demo_data, uninterrupted):
    """The observed failure: an FSDP2 ``last.ckpt/`` holding only its ``.distcp`` shards (no
    ``.metadata``, no ``meta.pt``), passed explicitly as ``--ckpt_path``; the whole step checkpoint
    beside it is taken instead and the run ends as the uninterrupted one."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "ckpts"
    rc, log = _launch(out, "fsdp2", demo_data, "--crash", "4:step")
    assert rc == -signal.SIGKILL, log[-3000:]
    last = ckpts / "last.ckpt"
    (last / ".metadata").unlink()
    (last / "meta.pt").unlink()
    assert sorted(p.name for p in last.iterdir()) == ["__0_0.distcp", "__1_0.distcp"]
    rc, log = _launch(out, "fsdp2", demo_data, "--ckpt", str(last))
    assert rc == 0, log[-3000:]
    assert f"{last} is not a complete checkpoint (no .metadata" in log
    assert f"taking {ckpts / 'epoch=0-step=4.ckpt'}," in log
    _assert_same_run(out, uninterrupted("fsdp2"), "torn last.ckpt")

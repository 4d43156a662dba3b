"""mmscene's default scoring equals lmms-eval's LLaVA-Interleave-Bench scoring, function for
function: option letters (mcq_acc), open answers (oe_rogue) and the category-mean overall."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmscene.eval.strict_pil import restore_strict_pil
from mmscene.metrics import (
    MultipleChoiceAccuracy,
    RougeL,
    caption_metrics,
    category_of,
    default_metrics,
    harness_choice_correct,
    harness_rouge_l,
    use_scoring,
)
from mmscene.train.evaluation import Scoreboard

bench = pytest.importorskip(
    "lmms_eval.tasks.llava_interleave_bench.utils", reason="lmms-eval is installed by `make test`"
)
restore_strict_pil()  # importing lmms-eval flipped PIL's truncated-image switch for the whole process

# Every form of an option letter the harness rule reads, and some it reads differently from
# mmscene's strict rule (the article "a", text answers, letters inside words).
FORMS = [
    "A",
    "a",
    "B.",
    "(C)",
    "D)",
    "[E]",
    "A. a red cube",
    "b. two",
    "Answer: C",
    "The answer is D.",
    "(b) the left one",
    "Option E",
    "It is a dog",
    "A red car is parked outside.",
    "c, probably",
    "I think B",
    "B and C",
    "none",
    "yes",
    "No.",
    "blue",
    "Blue!",
    "the blue one",
    "3,000",
    "3.5",
    "E:",
    "F",
    "",
    "  ",
    "\n",
    '"A"',
    "'B'",
    "A\nB",
    "Choice: a",
    "ab",
    "A-B",
    "x.y",
    "2. two",
]
REFERENCES = ["A", "B", "C", "D", "E", "blue", "Yes", "3,000", "A. a red cube"]


@pytest.mark.parametrize("reference", REFERENCES)
def test_option_rule_equals_lmms_eval_mcq_acc(reference):
    for pred in FORMS:
        assert harness_choice_correct(pred, reference) == bool(bench.mcq_acc(reference, pred)), (
            pred,
            reference,
        )


_TEXT = st.text(alphabet="ABCDEFabcdef .,;:()[]!?'\"-/\n\t0123456789xyz", max_size=30)


@settings(max_examples=400, deadline=None)
@given(pred=_TEXT, reference=st.one_of(st.sampled_from(REFERENCES), _TEXT))
def test_option_rule_equals_lmms_eval_on_generated_text(pred, reference):
    assert harness_choice_correct(pred, reference) == bool(bench.mcq_acc(reference, pred))


OPEN = [
    ("A cat sits on the mat.", "the cat sat on the mat"),
    ("The cat. It sits on a mat", "A cat is sitting on the mat."),
    ("two red cubes and a sphere", "Two red cubes, one sphere."),
    ("x" * 700, "x" * 600),  # the harness cuts predictions to 512 characters
    ("", "anything"),
    ("Left", "left"),  # case is kept
    ("there are 3.5 apples", "3.5 apples"),
]


def test_rouge_l_equals_lmms_eval_oe_rogue():
    for pred, ref in OPEN:
        assert harness_rouge_l(pred, ref) == pytest.approx(bench.oe_rogue(ref, pred), abs=1e-12), (pred, ref)
    metric = RougeL()
    metric.update([p for p, _ in OPEN], [r for _, r in OPEN])
    expected = sum(bench.oe_rogue(r, p) for p, r in OPEN) / len(OPEN)
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)
    # Where the harness raises (no words between periods), the sample scores 0, not a crash.
    with pytest.raises(ValueError):
        bench.oe_rogue("cat", ".")
    assert harness_rouge_l(".", "cat") == 0.0


def test_defaults_are_the_harness_rules_and_mmscene_is_an_option():
    mc, rouge = default_metrics("multi-choice")["accuracy"], default_metrics("open-ended")["rouge_l"]
    assert (mc.rule, rouge.rule) == ("lmms-eval", "lmms-eval")
    assert caption_metrics()["rouge_l"].rule == "lmms-eval"
    # The two rules really differ on answers users see.
    harness, strict = MultipleChoiceAccuracy(), MultipleChoiceAccuracy(rule="mmscene")
    for metric in (harness, strict):
        metric.update(["It is a dog", "A red car is parked outside."], ["A", "B"])
    assert (harness.compute().item(), strict.compute().item()) == (0.5, 0.0)
    metrics = {**caption_metrics(), **default_metrics("multi-choice")}
    use_scoring(metrics, "mmscene")
    assert (metrics["accuracy"].rule, metrics["rouge_l"].rule) == ("mmscene", "rouge-score")
    with pytest.raises(ValueError, match="scoring must be one of"):
        use_scoring(metrics, "vqa")


def _bench_rows(n: int, seed: int) -> list[dict]:
    """Predictions over bench sub-tasks of unequal sizes, scored both ways."""
    rng = random.Random(seed)
    tasks = [("Spot-the-Diff", "open-ended"), ("Birds-to-Words", "open-ended"), ("CLEVR-Change", "open-ended"),
             ("NLVR2_Mantis", "multi-choice"), ("QBench", "multi-choice"), ("RAVEN", "multi-choice"),
             ("MIT-States_StateCoherence", "multi-choice")]  # fmt: skip
    rows = []
    for i in range(n):
        task, qtype = tasks[rng.randrange(len(tasks)) if i >= len(tasks) else i]
        if qtype == "multi-choice":
            answer = rng.choice("ABCD")
            pred = rng.choice([answer, f"({answer})", f"{answer}. text", "B", "It is a dog", "none"])
        else:
            answer = rng.choice(["the left bird is larger", "a cube moved to the right", "two cars"])
            pred = rng.choice([answer, "the bird is larger", "nothing changed", "", "two red cars"])
        rows.append(
            {"sample_id": i, "sub_task": task, "question_type": qtype, "answer": answer, "pred": pred}
        )
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scoreboard_overall_equals_lmms_eval_overall_score(seed):
    rows = _bench_rows(60, seed)
    tasks = sorted({("multi_image", r["sub_task"], r["question_type"]) for r in rows})
    board = Scoreboard(tasks)
    meta = [
        {"key": str(r["sample_id"]), "scenario": "multi_image", "task": r["sub_task"],
         "question_type": r["question_type"], "answer": r["answer"]}
        for r in rows
    ]  # fmt: skip
    board.update(meta, [r["pred"] for r in rows])
    results, _ = board.compute()
    harness = [
        bench.interleave_process_results(
            {k: r[k] for k in ("sample_id", "sub_task", "question_type", "answer")}, [r["pred"]]
        )["overall_score"]
        for r in rows
    ]
    expected = bench.overall_score(harness)
    # metrics compute in float32: equal to ~1e-7, far below the 3 decimals scores are printed with
    assert results["multi_image/overall"] == pytest.approx(expected, abs=1e-6)
    assert results["overall"] == pytest.approx(expected, abs=1e-6)
    # The category mean weights sub-tasks by size within a category: not the mean over sub-tasks.
    per_task = [v for k, v in results.items() if k.count("/") == 2]
    assert abs(sum(per_task) / len(per_task) - expected) > 1e-3
    assert category_of("Birds-to-Words") == "Spot-the-Diff" and category_of("my_task") is None

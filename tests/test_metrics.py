"""mmscene.metrics against the reference implementations (rouge-score, pycocoevalcap)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocoevalcap.bleu.bleu import Bleu as CocoBleu
from pycocoevalcap.cider.cider import Cider as CocoCider
from rouge_score import rouge_scorer
from torchmetrics.text import BLEUScore, ROUGEScore

from mmscene.metrics import (
    Bleu,
    Cider,
    ExactMatch,
    MultipleChoiceAccuracy,
    RougeL,
    caption_metrics,
    default_metrics,
    overall_score,
    parse_choice,
    ptb_tokenize,
)

# Generated answers and references in the style of multi-image / video / ScanQA answers.
PAIRS = [
    (
        "The brown wooden chair is next to the desk.",
        ["brown chair next to desk", "a wooden chair beside the desk"],
    ),
    ("There are two pillows on the bed.", ["2 pillows", "two pillows on the bed"]),
    ("It's on the left side of the room, near the window.", ["left side of the room by the window"]),
    ("white", ["white", "white in color"]),
    (
        "The man in the second image is holding an umbrella, whereas in the first he isn't.",
        ["In the second image the man holds an umbrella; in the first one he does not."],
    ),
    (
        "A black leather couch facing the TV.",
        ["black couch facing the television", "a black sofa in front of the tv"],
    ),
    (
        "The cat moved from the sofa to the floor between the two frames.",
        ["the cat jumps off the sofa onto the floor"],
    ),
    ("Rectangular", ["rectangle", "it is rectangular"]),
    ("The trash can is under the sink (in the kitchen).", ["under the kitchen sink"]),
    ("The image shows 3.5 slices of pizza; 1,000 calories!", ["three and a half slices of pizza"]),
    ("", ["the lamp is on the nightstand"]),
    ("Don't know \u2014 maybe the red one?", ["the red box on the shelf"]),
    (
        "The photos show the same street: in the first it is day, in the second it is night.",
        ["same street during the day and at night"],
    ),
]
PREDS = [p for p, _ in PAIRS]
REFS = [r for _, r in PAIRS]

MC = [  # (prediction, target, options); 7 right, 2 unparseable
    ("A", "A", None),
    ("(B)", "B", None),
    ("C. the sofa", "C", None),
    ("Answer: D", "D. the lamp", None),
    ("It is blue.", "B", {"A": "red", "B": "blue", "C": "green"}),
    ("I cannot tell from the images.", "A", None),
    ("B", "A", None),
    ("The answer is (E).", "E", None),
    ("", "C", None),
    ("the second image", "B", {"A": "the first image", "B": "the second image"}),
]


def _coco_inputs(preds, refs):
    res = {i: [" ".join(ptb_tokenize(p))] for i, p in enumerate(preds)}
    gts = {i: [" ".join(ptb_tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    return gts, res


def _mc_columns(rows):
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


# -- agreement with the references ---------------------------------------------------------------


def test_rouge_l_matches_rouge_score_and_torchmetrics():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in PAIRS]
    metric = RougeL(rule="rouge-score")
    metric.update(PREDS[:5], REFS[:5])
    metric.update(PREDS[5:], REFS[5:])
    assert metric.compute().item() == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    tm = ROUGEScore(rouge_keys="rougeL", accumulate="best")(PREDS, REFS)["rougeL_fmeasure"]
    assert metric.compute().item() == pytest.approx(tm.item(), abs=1e-6)
    assert 0.2 < metric.compute().item() < 0.8  # the fixture is neither trivial nor disjoint


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bleu_matches_pycocoevalcap(n):
    gts, res = _coco_inputs(PREDS, REFS)
    expected, _ = CocoBleu(4).compute_score(gts, res, verbose=0)
    metric = Bleu(n)
    metric.update(PREDS, REFS)
    assert metric.compute().item() == pytest.approx(expected[n - 1], abs=1e-6)


def test_bleu_documented_differences_from_torchmetrics():
    # Hypothesis of 3 tokens, references of 4 and 2: equally close. coco (and we) take the
    # shorter one, so no brevity penalty; torchmetrics takes the first and penalises.
    preds, refs = ["the cat sat"], [["the cat sat down", "cat sat"]]
    gts, res = _coco_inputs(preds, refs)
    coco, _ = CocoBleu(2).compute_score(gts, res, verbose=0)
    ours = Bleu(2)
    ours.update(preds, refs)
    assert ours.compute().item() == pytest.approx(coco[1], abs=1e-9) == pytest.approx(1.0)
    assert BLEUScore(n_gram=2)(preds, refs).item() < 0.8
    # No 4-gram match: torchmetrics gives exactly 0, coco a tiny positive value.
    preds, refs = ["a dog runs on grass"], [["the dog runs in the park"]]
    gts, res = _coco_inputs(preds, refs)
    coco, _ = CocoBleu(4).compute_score(gts, res, verbose=0)
    ours = Bleu(4)
    ours.update(preds, refs)
    assert BLEUScore(n_gram=4)(preds, refs).item() == 0.0
    assert 0 < coco[3] < 1e-3 and ours.compute().item() == pytest.approx(coco[3], rel=1e-5)


def test_cider_matches_pycocoevalcap():
    gts, res = _coco_inputs(PREDS, REFS)
    expected, per_image = CocoCider().compute_score(gts, res)
    metric = Cider()
    metric.update(PREDS[:4], REFS[:4])
    metric.update(PREDS[4:], REFS[4:])
    assert metric.compute().item() == pytest.approx(expected, abs=1e-4)
    assert expected > 0.5 and per_image.min() < per_image.max()


@pytest.mark.skipif(shutil.which("java") is None, reason="Stanford PTBTokenizer needs java")
def test_ptb_tokenize_matches_stanford_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = PREDS + [r for refs in REFS for r in refs] + [p for p, _, _ in MC]
    sentences += [
        "It\u2019s \u201cgreat\u201d \u2014 isn\u2019t it\u2026 yes.",
        "No. 5 is at 10:30 a.m. near Dr. Smith's house, e.g. Mr. Brown's car etc.",
        "The man [left] {ok} can't, won't & shouldn't -- wanna go? cannot! $5 or 50%",
        "The answer is no. It's red-haired, left/right, -5 degrees; 'quoted' ``x'' done!!!",
    ]
    sentences = [s for s in sentences if s]  # PTBTokenizer drops empty lines
    java = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    for i, sentence in enumerate(sentences):
        assert " ".join(ptb_tokenize(sentence)) == java[i][0], sentence


def test_exact_match_uses_squad_normalisation():
    metric = ExactMatch()
    metric.update(["The cat.", "two", "An apple!", ""], ["cat", "2", ["a pear", "apple"], "lamp"])
    assert metric.compute().item() == pytest.approx(0.5)


# -- option parsing ------------------------------------------------------------------------------

COLORS = {"A": "red", "B": "blue", "C": "green"}


@pytest.mark.parametrize(
    ("answer", "options", "expected"),
    [
        ("A", None, "A"),
        ("a", None, "A"),
        (" (C) ", None, "C"),
        ("[D]", None, "D"),
        ("B.", None, "B"),
        ("B)", None, "B"),
        ("E:", None, "E"),
        ("Answer: A", None, "A"),
        ("answer: C", None, "C"),
        ("The answer is (B).", None, "B"),
        ("The correct option is D.", None, "D"),
        ("B. the red one", None, "B"),
        ("(A) a red car", None, "A"),
        ("c) the third picture", None, "C"),
        ("I'd pick (d) here", None, "D"),
        ("I think C is correct.", None, "C"),
        ("A is correct.", None, "A"),
        ("It is blue.", COLORS, "B"),
        ("Green, clearly", COLORS, "C"),
        ("A red car.", {"A": "green", "B": "red car"}, "B"),
        ("dark red", {"A": "red", "B": "dark red"}, "B"),
        ("F", {"E": "cube", "F": "sphere"}, "F"),
        # failures
        ("", None, None),
        ("   ", None, None),
        ("I don't know.", None, None),
        ("It is a dog.", None, None),  # lmms-eval reads the article as option A
        ("A red car is parked outside.", None, None),
        ("F", None, None),
        ("E:", {"A": "x", "B": "y"}, None),
        ("Both red and blue", COLORS, None),
        ("e.g. the purple one", COLORS, None),
    ],
)
def test_parse_choice(answer, options, expected):
    assert parse_choice(answer, options) == expected


def test_multiple_choice_accuracy_counts_unparsed_as_wrong():
    preds, targets, options = _mc_columns(MC)
    metric = MultipleChoiceAccuracy(rule="mmscene")
    metric.update(preds, targets, options)
    assert metric.compute().item() == pytest.approx(0.7)
    assert metric.compute_unparsed().item() == 2


def test_multiple_choice_rejects_target_without_letter():
    with pytest.raises(ValueError, match="names no option letter"):
        MultipleChoiceAccuracy(rule="mmscene").update(["A"], ["maybe"])


# -- factories -----------------------------------------------------------------------------------


def test_default_and_caption_metrics():
    assert set(default_metrics("multi-choice")) == {"accuracy"}
    assert isinstance(default_metrics("open-ended")["rouge_l"], RougeL)
    with pytest.raises(ValueError):
        default_metrics("free-form")
    metrics = caption_metrics()
    # ROUGE-L first: the headline LLaVA-Interleave Bench gives its ScanQA-style sub-tasks
    assert list(metrics) == ["rouge_l", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"]
    for metric in metrics.values():  # one signature for all
        metric.update(PREDS, REFS, options=None)
    scores = {k: m.compute().item() for k, m in metrics.items()}
    assert scores["bleu_1"] > scores["bleu_2"] > scores["bleu_3"] > scores["bleu_4"] > 0


def test_overall_score_is_unweighted_mean_of_categories():
    assert overall_score({"Spot-the-Diff": 0.2, "Puzzle": 0.5, "NLVR2": torch.tensor(0.8)}) == pytest.approx(
        0.5
    )
    with pytest.raises(ValueError):
        overall_score({})


# -- merging and distributed sync ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [RougeL, lambda: Bleu(4), Cider, ExactMatch], ids=["rouge", "bleu", "cider", "em"]
)
def test_merged_halves_equal_whole(make):
    whole, first, second = make(), make(), make()
    whole.update(PREDS, REFS)
    first.update(PREDS[:5], REFS[:5])
    second.update(PREDS[5:], REFS[5:])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(whole.compute().item(), abs=1e-6)


def test_cider_idf_is_corpus_level():
    # Averaging per-half CIDEr is not CIDEr of the whole: the merge has to carry the samples.
    whole, first, second = Cider(), Cider(), Cider()
    whole.update(PREDS, REFS)
    first.update(PREDS[:5], REFS[:5])
    second.update(PREDS[5:], REFS[5:])
    halves = (5 * first.compute().item() + 8 * second.compute().item()) / 13
    assert abs(halves - whole.compute().item()) > 1e-2


def test_merged_multiple_choice_keeps_unparsed():
    preds, targets, options = _mc_columns(MC)
    first, second = MultipleChoiceAccuracy(rule="mmscene"), MultipleChoiceAccuracy(rule="mmscene")
    first.update(preds[:6], targets[:6], options[:6])
    second.update(preds[6:], targets[6:], options[6:])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(0.7)
    assert first.compute_unparsed().item() == 2


def _rank_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cut = 8  # unequal shards: 8 and 5 samples
        lo, hi = (0, cut) if rank == 0 else (cut, len(PAIRS))
        metrics = {
            **caption_metrics(),
            "em": ExactMatch(),
            "idle_cider": Cider(),
            "mc": MultipleChoiceAccuracy(rule="mmscene"),
        }
        for name, metric in metrics.items():
            if name == "idle_cider":  # rank 1 sees no sample at all
                if rank == 0:
                    metric.update(PREDS, REFS)
            elif name == "mc":
                preds, targets, options = _mc_columns(MC[:7] if rank == 0 else MC[7:])
                metric.update(preds, targets, options)
            else:
                metric.update(PREDS[lo:hi], REFS[lo:hi])
        scores = {name: metric.compute().item() for name, metric in metrics.items()}
        scores["mc_unparsed"] = metrics["mc"].compute_unparsed().item()
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(scores, f)
    finally:
        dist.destroy_process_group()


def test_gloo_sync_equals_single_process(tmp_path):
    out = tmp_path / "scores.json"
    # fork: the children reuse the parent's imports (spawning re-imports torch twice, ~15 s)
    mp.start_processes(
        _rank_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, start_method="fork"
    )
    synced = json.loads(out.read_text())
    expected = {}
    for name, metric in {**caption_metrics(), "em": ExactMatch(), "idle_cider": Cider()}.items():
        metric.update(PREDS, REFS)
        expected[name] = metric.compute().item()
    mc = MultipleChoiceAccuracy(rule="mmscene")
    mc.update(*_mc_columns(MC))
    expected["mc"], expected["mc_unparsed"] = mc.compute().item(), mc.compute_unparsed().item()
    assert synced == pytest.approx(expected, abs=1e-6)

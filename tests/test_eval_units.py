"""Small pieces of mmscene.eval: stop strings, scenario choice, score keys, settings, errors."""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make test`")

from PIL import Image  # noqa: E402

from mmscene.eval.harness import scores  # noqa: E402
from mmscene.eval.lmms_model import _cut  # noqa: E402
from mmscene.eval.session import DataSettings, EvalSession, EvaluationError  # noqa: E402


def test_until_cuts_at_the_first_stop_string():
    assert _cut("A. red\nB. green", ["\n"]) == "A. red"
    assert _cut("the cat. The dog", [".", "\n"]) == "the cat"
    assert _cut("no stop here", ["", "###"]) == "no stop here"


def test_scenario_follows_the_converter():
    session = EvalSession.__new__(EvalSession)  # only the choice of scenario, no model
    session.multi_view_tasks = ("my_3d_task",)
    image = Image.new("RGB", (4, 4))
    assert session.scenario_for(["/x/clip.mp4"], "t", {}) == "video"
    assert session.scenario_for([image], "t", {}) == "single_image"
    assert session.scenario_for([image, image], "t", {}) == "multi_image"
    assert session.scenario_for([image, image], "my_3d_task", {}) == "3d"
    # bench rows: as `mmscene data convert` files them (multi-view sub-tasks are 3D scenes)
    assert session.scenario_for([image], "t", {"sub_task": "QBench"}) == "multi_image"
    assert session.scenario_for([image, image], "t", {"sub_task": "ScanQA"}) == "3d"


def test_scores_read_lmms_eval_metric_keys():
    results = {"results": {"t": {"alias": "t", "overall_score,none": 0.5, "overall_score_stderr,none": "N/A",
                                 "exact_match,strict": 0.25, "acc,none": 1}}}  # fmt: skip
    assert scores(results) == {"t": {"overall_score": 0.5, "exact_match/strict": 0.25, "acc": 1.0}}


def test_data_settings_default_to_training_defaults():
    assert DataSettings.of({}).system_prompt == "You are a helpful assistant."
    settings = DataSettings.of(
        {"system_prompt": None, "pad_to_square": False, "scenarios": {"video": {"num_frames": 4}}}
    )
    assert (settings.system_prompt, settings.pad_to_square, settings.scenarios) == (
        None,
        False,
        {"video": {"num_frames": 4}},
    )


def test_evaluation_error_exits_with_its_reason():
    # a SystemExit: lmms-eval's CLI does not swallow it into a log line and exit status 0
    err = EvaluationError("request x: missing_media: video 'a.mp4' not found")
    assert isinstance(err, SystemExit) and "a.mp4" in str(err.code)

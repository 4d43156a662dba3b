"""mmscene in lmms-eval, end to end on a briefly trained checkpoint and local task YAMLs:
``lmms-eval --model mmscene`` and ``mmscene eval`` run image and video tasks; their answers and
scores equal ``mmscene validate``'s on the same samples; lmms-eval's own ``llava_hf`` on the
exported checkpoint answers the same; failures exit non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmms_tasks import choice_task_yaml, multi_round_task_yaml, task_yaml, write_demo_tasks
from train_helpers import tiny_config, write_config

from mmscene.constants import IMAGE_PLACEHOLDER
from mmscene.eval.strict_pil import restore_strict_pil

bench = pytest.importorskip(
    "lmms_eval.tasks.llava_interleave_bench.utils", reason="lmms-eval is installed by `make test`"
)
restore_strict_pil()  # importing lmms-eval flipped PIL's truncated-image switch for the whole process

from mmscene.data.ingest.convert import convert  # noqa: E402
from mmscene.data.tools.demo import make_demo  # noqa: E402
from mmscene.train.cli import build_cli  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoint, run config, bench-style rows (with and without placeholders), task YAMLs and
    validation shards of the same rows."""
    tmp = tmp_path_factory.mktemp("lmms")
    data = tmp / "demo"
    make_demo(data, n_train_per_scenario=16, n_val_per_scenario=6, progress=False)
    cfg = tiny_config(data, tmp / "run", max_steps=60)
    cfg["model"].update(
        warmup_steps=5, max_new_tokens=16, lr={"vision": 6e-3, "projector": 6e-3, "llm": 6e-3}
    )
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    ]
    build_cli(["fit", "--config", str(write_config(cfg, tmp / "fit.yaml"))])
    ckpt = next((tmp / "run").rglob("last.ckpt"))

    tasks = tmp / "tasks"
    rows = write_demo_tasks(data, tasks)
    images, videos, annotations = rows["images"], rows["videos"], rows["annotations"]
    assert len(images) >= 12 and len(videos) >= 4
    assert any(IMAGE_PLACEHOLDER not in r["question"] and "image_1" in r for r in images)
    assert any(IMAGE_PLACEHOLDER in r["question"] and "image_1" in r for r in images)
    choice = [{**r, "choices": ["A", "B", "C"], "target": "ABC".index(r["answer"])}
              for r in images if r["question_type"] == "multi-choice" and r["answer"] in "ABC"][:4]  # fmt: skip
    assert len(choice) >= 2
    (tasks / "choice.json").write_text(json.dumps(choice))
    (tasks / "choice.yaml").write_text(choice_task_yaml("mm_choice", tasks / "choice.json"))
    (tasks / "rounds.json").write_text(json.dumps(images[:2]))
    (tasks / "rounds.yaml").write_text(multi_round_task_yaml("mm_rounds", tasks / "rounds.json"))
    broken = [{**videos[0], "video": str(tmp / "no-such-video.mp4")}]
    (tasks / "broken.json").write_text(json.dumps(broken))
    (tasks / "broken.yaml").write_text(
        task_yaml("mm_broken", tasks / "broken.json", "lmms_tasks.doc_to_video")
    )
    # Validation shards of the same samples: the image rows in the bench layout, once as JSONL with
    # paths and once as Parquet with the images embedded; the videos as LLaVA records.
    media = rows["media"]
    relative = [{k: (str(Path(v).relative_to(media)) if k.startswith("image_") else v) for k, v in r.items()}
                for r in images]  # fmt: skip
    (tmp / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in relative))
    _write_parquet(tmp / "bench.parquet", images)
    videos_ann = tmp / "videos.jsonl"
    videos_ann.write_text("".join(json.dumps(a) + "\n" for a in annotations if "video" in a))
    for src, name in (
        (tmp / "bench.jsonl", "bench"),
        (tmp / "bench.parquet", "parquet"),
        (videos_ann, "videos"),
    ):
        report = convert(src, media, tmp / name, progress=False, keep_order=True)
        assert not report["skipped"], report
    assert {p.name for p in (tmp / "bench").iterdir() if p.is_dir()} == {"multi_image"}
    export = tmp / "hf"
    run = _run(sys.executable, "-m", "mmscene.cli", "export", "hf", "--checkpoint", str(ckpt),
               "--out", str(export), "--drop-frame-pooling")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return {"tmp": tmp, "cfg": cfg, "ckpt": ckpt, "tasks": tasks, "images": images, "videos": videos,
            "choice": choice, "export": export}  # fmt: skip


def _write_parquet(path: Path, rows: list[dict]) -> None:
    """``rows`` as HF ``datasets`` exports the bench: image slots as ``{bytes, path}`` structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    slots = sorted({k for r in rows for k in r if k.startswith("image_")}, key=lambda k: int(k[6:]))
    table = {
        k: [r[k] for r in rows] for k in ("sample_id", "sub_task", "question", "answer", "question_type")
    }
    for slot in slots:
        table[slot] = [
            {"bytes": Path(r[slot]).read_bytes(), "path": Path(r[slot]).name} if slot in r else None
            for r in rows
        ]
    pq.write_table(pa.table(table), path)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=_env(), timeout=900)


def _lmms_eval(
    setup, model: str, model_args: str, tasks: str, out: Path, *extra: str
) -> subprocess.CompletedProcess:
    return _run(sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args,
                "--tasks", tasks, "--include_path", str(setup["tasks"]), "--batch_size", "1",
                "--output_path", str(out), "--log_samples", *extra)  # fmt: skip


def _logged_answers(out: Path, task: str) -> dict[str, str]:
    """sample_id -> answer from lmms-eval's per-sample log."""
    return {
        str(r["overall_score"]["sample_id"]): _first(r["filtered_resps"]) for r in _sample_rows(out, task)
    }


def _sample_rows(out: Path, task: str) -> list[dict]:
    """lmms-eval's per-sample log of ``task`` under ``out`` (``*_samples_<task>.jsonl``)."""
    files = sorted(out.rglob(f"*samples_{task}.jsonl"))
    assert files, f"no sample log for {task} under {out}"
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


def _harness_rows(setup, task: str) -> list[dict]:
    """``lmms-eval --model mmscene`` on the checkpoint for ``task``; its per-sample log."""
    out = setup["tmp"] / f"{task}_out"
    run = _lmms_eval(setup, "mmscene", f"pretrained={setup['ckpt']}", task, out)
    assert run.returncode == 0, run.stderr[-4000:]
    return _sample_rows(out, task)


def _first(value):
    while isinstance(value, list):
        value = value[0]
    return value


def _validate(setup, images: str) -> tuple[dict[str, float], dict[str, dict]]:
    """``mmscene validate`` on the image shards converted from ``images`` (bench / parquet) and the videos."""
    cfg = json.loads(json.dumps(setup["cfg"]))
    tmp = setup["tmp"]
    shards = [p for name in (images, "videos") for p in sorted((tmp / name).iterdir()) if p.is_dir()]
    cfg["data"]["val"] = [
        {"shards": str(p), "scenario": p.name, "name": f"{p.parent.name}-{p.name}"} for p in shards
    ]
    root = tmp / f"validate-{images}"
    cfg["trainer"].update(limit_val_batches=None, default_root_dir=str(root))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root)
    config = write_config(cfg, tmp / f"validate-{images}.yaml")
    build_cli(["validate", "--config", str(config), "--ckpt_path", str(setup["ckpt"])])
    log_dir = next(root.rglob("predictions.jsonl")).parent
    results = json.loads((log_dir / "results.json").read_text().splitlines()[-1])["scores"]
    predictions = {
        r["key"]: r for r in map(json.loads, (log_dir / "predictions.jsonl").read_text().splitlines())
    }
    return results, predictions


def test_bench_parquet_with_embedded_images_validates_as_the_jsonl(setup):
    """The converter round-trips the bench layout: Parquet with embedded bytes and JSONL with
    paths give shards that validate to the same answers and scores."""
    results, predictions = _validate(setup, "bench")
    parquet_results, parquet_predictions = _validate(setup, "parquet")
    assert set(predictions) == {str(r["sample_id"]) for r in setup["images"] + setup["videos"]}
    assert {k: p["prediction"] for k, p in parquet_predictions.items()} == {
        k: p["prediction"] for k, p in predictions.items()
    }
    assert parquet_results == results
    assert {p["task"] for p in predictions.values()} == {
        "QBench",
        "Spot-the-Diff",
        "Birds-to-Words",
        "Mantis",
    }


def test_lmms_eval_model_equals_validate_and_mmscene_eval(setup):
    out = setup["tmp"] / "lmms_out"
    run = _lmms_eval(setup, "mmscene", f"pretrained={setup['ckpt']}", "mm_images,mm_videos", out)
    assert run.returncode == 0, run.stderr[-4000:]
    harness = {**_logged_answers(out, "mm_images"), **_logged_answers(out, "mm_videos")}

    results, predictions = _validate(setup, "bench")
    assert set(predictions) == set(harness)
    # same prompts, greedy: the same answers, sample for sample
    assert {k: p["prediction"] for k, p in predictions.items()} == harness
    assert len(set(harness.values())) > 1  # the checkpoint says different things to different samples

    # lmms-eval's own scoring of mmscene's predictions gives mmscene's numbers
    docs = {str(r["sample_id"]): r for r in setup["images"] + setup["videos"]}
    scored = [
        bench.interleave_process_results(docs[k], [p["prediction"]])["overall_score"]
        for k, p in predictions.items()
    ]
    assert results["overall"] == pytest.approx(bench.overall_score(scored), abs=1e-6)
    image_keys = {str(r["sample_id"]) for r in setup["images"]}
    image_scored = [s for s in scored if str(s["sample_id"]) in image_keys]

    # mmscene eval, generating 4 requests per left-padded batch: the same answers, a table, results
    # and per-sample logs; its score is lmms-eval's
    eval_out = setup["tmp"] / "eval_out"
    run = _run(sys.executable, "-m", "mmscene.cli", "eval", "--checkpoint", str(setup["ckpt"]),
               "--tasks", "mm_images,mm_videos", "--include_path", str(setup["tasks"]), "--out", str(eval_out),
               "--batch-size", "4")  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "mm_images" in run.stdout and "overall_score" in run.stdout
    summary = json.loads((eval_out / "results.json").read_text())
    assert summary["results"]["mm_images"]["overall_score,none"] == pytest.approx(
        bench.overall_score(image_scored), abs=1e-9
    )
    assert _logged_answers(eval_out, "mm_images") == {k: harness[k] for k in image_keys}


def test_failures_exit_non_zero(setup):
    run = _lmms_eval(
        setup, "mmscene", f"pretrained={setup['ckpt']}", "mm_broken", setup["tmp"] / "broken_out"
    )
    assert run.returncode != 0 and "no-such-video.mp4" in run.stderr, run.stderr[-3000:]
    run = _run(sys.executable, "-m", "mmscene.cli", "eval", "--checkpoint", str(setup["ckpt"]),
               "--tasks", "mm_broken", "--include_path", str(setup["tasks"]), "--out", str(setup["tmp"] / "b2"))  # fmt: skip
    assert run.returncode != 0 and "no-such-video.mp4" in run.stderr, run.stderr[-3000:]
    run = _run(sys.executable, "-m", "mmscene.cli", "eval", "--checkpoint", str(setup["ckpt"]),
               "--tasks", "mm_nowhere", "--include_path", str(setup["tasks"]), "--out", str(setup["tmp"] / "b3"))  # fmt: skip
    assert run.returncode != 0 and "mm_nowhere" in run.stderr, run.stderr[-3000:]


def test_exported_checkpoint_under_llava_hf_answers_as_mmscene(setup):
    export = setup["export"]
    from transformers import AutoTokenizer

    from mmscene.data.pipeline.chat_template import render_chat

    # the exported template renders training's prompt from the user turn alone, system turn included
    tok = AutoTokenizer.from_pretrained(str(export))
    user = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}]
    training = render_chat(user, add_generation_prompt=True)
    assert "You are a helpful assistant." in training
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == training
    # lmms-eval's chat models send content as parts: images first, then the text
    parts = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}],
        }
    ]
    assert tok.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == training

    hf_out, mm_out = setup["tmp"] / "llava_hf_out", setup["tmp"] / "mm_hf_out"
    # --verbosity DEBUG: lmms-eval's CLI otherwise exits 0 whatever llava_hf raised
    hf_args = f"pretrained={export},device=cpu,device_map=cpu,dtype=float32"
    run = _lmms_eval(setup, "llava_hf", hf_args, "mm_images", hf_out, "--verbosity", "DEBUG")
    assert run.returncode == 0, run.stderr[-4000:]
    run = _lmms_eval(setup, "mmscene", f"pretrained={export}", "mm_images", mm_out)
    assert run.returncode == 0, run.stderr[-4000:]
    llava_hf = {k: v.strip() for k, v in _logged_answers(hf_out, "mm_images").items()}
    assert llava_hf == _logged_answers(mm_out, "mm_images")
    scores = [json.loads(p.read_text())["results"]["mm_images"]["overall_score,none"]
              for out in (hf_out, mm_out) for p in sorted(out.rglob("*results.json"))[-1:]]  # fmt: skip
    assert scores[0] == pytest.approx(scores[1], abs=1e-9)


def test_loglikelihood_equals_transformers_llava_on_the_exported_weights(setup):
    """Options scored by likelihood: the summed log-probability of each option after training's
    prompt, as transformers' own Llava computes it on the exported checkpoint."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmscene.data.pipeline.chat_template import render_chat

    logged = _harness_rows(setup, "mm_choice")
    processor = AutoProcessor.from_pretrained(str(setup["export"]), backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(str(setup["export"]), dtype=torch.float32).eval()
    for row in logged:
        doc = setup["choice"][row["doc_id"]]
        images = [Image.open(doc[k]).convert("RGB") for k in sorted(k for k in doc if k.startswith("image_"))]
        question = doc["question"] if IMAGE_PLACEHOLDER in doc["question"] else " ".join(
            [IMAGE_PLACEHOLDER] * len(images)) + "\n" + doc["question"]  # fmt: skip
        prompt = render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        inputs = processor(images=images, text=prompt, return_tensors="pt")
        expected, greedy = [], []
        for choice in doc["choices"]:
            cont = processor.tokenizer(" " + choice, add_special_tokens=False, return_tensors="pt")[
                "input_ids"
            ]
            ids = torch.cat([inputs["input_ids"], cont], dim=1)
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
            scores = torch.log_softmax(logits[0, -cont.shape[1] - 1 : -1], dim=-1)
            expected.append(float(scores.gather(1, cont[0][:, None]).sum()))
            greedy.append(bool((scores.argmax(-1) == cont[0]).all()))
        got = [float(r[0]) for r in row["filtered_resps"]]  # [logprob, is_greedy] per option
        assert got == pytest.approx(expected, abs=1e-4), (row["doc_id"], got, expected)
        assert [r[1] for r in row["filtered_resps"]] == [str(g) for g in greedy], row["doc_id"]


def test_multi_round_asks_each_round_on_the_same_images(setup):
    from PIL import Image

    from mmscene.eval.loading import load_session
    from mmscene.train.inputs import generate_answers

    rows = _harness_rows(setup, "mm_rounds")
    session = load_session(setup["ckpt"])
    for row in rows:
        doc = setup["images"][row["doc_id"]]
        images = [Image.open(doc[k]).convert("RGB") for k in sorted(k for k in doc if k.startswith("image_"))]
        answers = row["filtered_resps"]
        assert row["rounds"] == 2 and len(answers) == 2
        for question, answer in zip((doc["question"], "Say it again."), answers):
            sample = session.encode(str(doc["sample_id"]), question, images, "multi_image")
            assert generate_answers(session.model, session.tokenizer, session.collate([sample]), 8) == [
                answer
            ]

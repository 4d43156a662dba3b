"""CPU training throughput: mmscene's training loop vs LLaMA-Factory 0.9.5, matched settings.

What it compares: the same tiny Llava (the SigLIP + Qwen2 of configs/demo.yaml), the same demo samples
(`mmscene data demo`, the single_image + multi_image scenarios: LLaMA-Factory's llava plugin reads
neither videos nor meshes, so video and 3D are left out on BOTH sides), full fine-tuning (vision tower,
projector and LLM all train, as in demo.yaml), fp32, one thread, one process, no DataLoader workers,
gradient checkpointing off, no validation, no checkpoints. Each side runs in its own subprocess, in
alternating rounds (mmscene, LLaMA-Factory packed, LLaMA-Factory unpacked, mmscene, ...), so load from
other processes on a shared machine hits all sides alike.

  mmscene              `mmscene fit` on a copy of demo.yaml: batch_size 16 samples, padded
                       (demo.yaml's batching), reading the webdataset shards
  mmscene pretok       the same after `mmscene data tokenize` (ids stored in the shards)   [--pretok]
  mmscene packed       data.batching {mode: tokens, max_tokens: 1024, pack: true}         [--mm-packed]
                       (attention: auto, on a CPU sdpa_varlen: SDPA once per packed sample)
  mmscene pk+pretok    packed, from the pre-tokenized shards                      [--mm-packed --pretok]
  LF packed            LLaMA-Factory sft, packing + neat_packing (block-diagonal attention, no
                       cross-sample attention, like mmscene's packing), cutoff_len 1024, batch 1 row
  LF unpacked          LLaMA-Factory sft, no packing, per_device_train_batch_size 16 (as mmscene)

Tokens/s = real tokens (input ids that are not padding, image positions included) over the wall
seconds between the end of the warm-up steps and the end of the last step (data loading, collation,
forward, backward, optimizer step all inside). CPU seconds (time.process_time) over the same window.
LLaMA-Factory tokenizes the whole dataset before training: that is reported separately (the first
LF run of each variant writes its tokenized_path, later ones load it) and is not in tokens/s.

Setup (a venv of its own; the system Python is left alone):

  python -m venv /tmp/lf/venv
  /tmp/lf/venv/bin/pip install torch==2.13.0          # first: the CPU wheel
  /tmp/lf/venv/bin/pip install --no-deps llamafactory==0.9.5
  /tmp/lf/venv/bin/pip install transformers==5.6.0 datasets==4.0.0 accelerate==1.11.0 peft==0.18.1 \
      trl==0.24.0 "tyro<0.9.0" "av<=16.0.0" omegaconf fire einops sentencepiece tiktoken protobuf pydantic \
      pyyaml safetensors scipy pandas matplotlib pillow lightning "jsonargparse[signatures]" webdataset \
      decord trimesh rich torchmetrics ijson rouge numpy

  llamafactory's mm_plugin imports torchaudio unconditionally (used only for audio inputs); instead of
  installing torchaudio (its PyPI build is CUDA and breaks beside a CPU torch) this script puts a stub
  `torchaudio` package (written to WORK/stubs) on the children's path. torchvision is not needed.
  mmscene itself is not installed: /work/main and /work/main/plugins go on PYTHONPATH.

Run (about 1-2 minutes per run):

  /tmp/lf/venv/bin/python bench/peer_llamafactory.py --work /tmp/lf/bench --steps 30 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
SCENARIOS = ("single_image", "multi_image")
WEIGHTS = {"single_image": 2.0, "multi_image": 1.75}  # demo.yaml's
TEMPLATE = "mmscene_chatml"

try:  # only the mmscene child needs this at import time (its callback below)
    from lightning.pytorch.callbacks import Callback as _LCallback
except Exception:  # noqa: BLE001
    _LCallback = object


# ----------------------------------------------------------------------------- step timers
class _Timer:
    def __init__(self):
        import torch

        torch.set_num_threads(1)
        self.t0 = time.perf_counter()
        self.first_step_at = None
        self.marks = []  # (wall, cpu, tokens of the step, samples)

    def mark(self, tokens: int, samples: int) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter() - self.t0
        self.marks.append((time.perf_counter(), time.process_time(), tokens, samples))

    def dump(self) -> None:
        out = os.environ.get("PEER_BENCH_OUT")
        if out:
            Path(out).write_text(json.dumps({"first_step_at": self.first_step_at, "marks": self.marks}))


class MMStepTimer(_LCallback, _Timer):
    """Lightning callback (class_path peer_llamafactory.MMStepTimer) timing mmscene's steps."""

    def __init__(self):
        _Timer.__init__(self)
        self._tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lengths = batch.get("sample_lengths") or [int(batch["input_ids"].shape[1])] * len(batch["meta"])
        self._tokens, self._samples = int(sum(lengths)), len(lengths)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mark(self._tokens, self._samples)

    def on_train_end(self, trainer, pl_module):
        self.dump()


# ----------------------------------------------------------------------------- preparation
def child_env(work: Path) -> dict:
    env = dict(os.environ)
    paths = [str(BENCH), str(REPO), str(REPO / "plugins"), str(work / "stubs")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DISABLE_VERSION_CHECK="1",
        WANDB_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )
    return env


def prepare(work: Path, args) -> dict:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    stub = work / "stubs" / "torchaudio"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(
        '"""Stub: llamafactory imports torchaudio unconditionally, uses it only for audio."""\n'
        "def __getattr__(name):\n    raise ImportError('torchaudio stub (audio is not supported here)')\n"
    )
    env = child_env(work)
    demo = work / "demo"
    if not (demo / "raw" / "train.jsonl").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mmscene.cli",
                "data",
                "demo",
                "--out",
                str(demo),
                "--train-per-scenario",
                str(args.per_scenario),
                "--val-per-scenario",
                "4",
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    # the model, exported in transformers Llava format (weights, processor, tokenizer)
    hf = work / "llava_hf"
    if not (hf / "config.json").exists():
        code = (
            "import yaml, torch\n"
            "from transformers import AutoTokenizer\n"
            "from mmscene.model import MultimodalConfig, MultimodalLM\n"
            "from mmscene.model.export_hf import save_llava_hf\n"
            f"cfg = yaml.safe_load(open({str(REPO / 'configs/demo.yaml')!r}))['model']['model']['config']\n"
            "torch.manual_seed(0)\n"
            "m = MultimodalLM(MultimodalConfig(**cfg))\n"
            f"m.tokenizer = AutoTokenizer.from_pretrained({str(demo / 'tokenizer')!r})\n"
            f"save_llava_hf(m, {str(hf)!r})\n"
            "from transformers import AutoProcessor, LlavaForConditionalGeneration\n"
            f"AutoProcessor.from_pretrained({str(hf)!r}); LlavaForConditionalGeneration.from_pretrained({str(hf)!r})\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL)
    # LLaMA-Factory's dataset: sharegpt with an images column, absolute media paths
    lfdata = work / "lfdata"
    lfdata.mkdir(exist_ok=True)
    rows = []
    for line in (demo / "raw" / "train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["id"].split("-")[2] not in SCENARIOS:
            continue
        images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
        rows.append(
            {
                "conversations": rec["conversations"],
                "images": [str(demo / "raw" / "media" / p) for p in images],
            }
        )
    (lfdata / "demo.json").write_text(json.dumps(rows))
    (lfdata / "dataset_info.json").write_text(
        json.dumps(
            {
                "mmdemo": {
                    "file_name": "demo.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "images": "images"},
                }
            }
        )
    )
    # mmscene's config: demo.yaml on the same scenarios, no validation / checkpoints / progress bars
    base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfgs = {}
    variants = [("mmscene", "train", None)]
    if args.pretok:
        variants.append(("mmscene pretok", "train_tok", None))
    packed = {"mode": "tokens", "max_tokens": 1024, "pack": True}  # one row of LF's cutoff_len
    if args.mm_packed:
        variants.append(("mmscene packed", "train", packed))
    if args.mm_packed and args.pretok:
        variants.append(("mmscene pk+pretok", "train_tok", packed))
    if args.pretok and not (demo / "train_tok").exists():
        shutil.copytree(demo / "train", demo / "train_tok")
    for name, train_dir, batching in variants:
        cfg = json.loads(json.dumps(base))
        d = cfg["data"]
        d["tokenizer"] = str(demo / "tokenizer")
        d["train"] = [
            {"shards": str(demo / train_dir / s), "scenario": s, "weight": WEIGHTS[s]} for s in SCENARIOS
        ]
        d["val"] = [{"shards": str(demo / "val" / s), "scenario": s} for s in SCENARIOS]
        d["scenarios"] = {k: v for k, v in d["scenarios"].items() if k in SCENARIOS}
        d["num_workers"] = 0
        if batching:
            d["batching"] = batching
        t = cfg["trainer"]
        t.update(
            max_steps=args.steps,
            val_check_interval=10**6,
            limit_val_batches=0,
            log_every_n_steps=10,
            enable_progress_bar=False,
            enable_checkpointing=False,
            precision="32-true",
            default_root_dir=str(work / "runs"),
        )
        t["logger"] = False
        t["callbacks"] = [{"class_path": "peer_llamafactory.MMStepTimer"}]
        path = work / f"mm_{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cfgs[name] = path
    if args.pretok and not (demo / "train_tok" / ".done").exists():
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mmscene.cli",
                "data",
                "tokenize",
                "--config",
                str(cfgs["mmscene pretok"]),
                "--no-progress",
            ],
            check=True,
            env=env,
        )
        (demo / "train_tok" / ".done").write_text(f"{time.perf_counter() - t0:.1f}")
    return {"mm_cfgs": cfgs, "n_samples": len(rows)}


def lf_args(work: Path, variant: str, steps: int) -> dict:
    packed = variant == "LF packed"
    tag = "packed" if packed else "unpacked"
    return dict(
        model_name_or_path=str(work / "llava_hf"),
        trust_remote_code=False,
        flash_attn="sdpa",
        stage="sft",
        do_train=True,
        finetuning_type="full",
        freeze_vision_tower=False,
        freeze_multi_modal_projector=False,
        freeze_language_model=False,
        dataset="mmdemo",
        dataset_dir=str(work / "lfdata"),
        media_dir=str(work),
        template=TEMPLATE,
        cutoff_len=1024,
        packing=packed,
        neat_packing=packed,
        preprocessing_num_workers=None,
        tokenized_path=str(work / f"lf_tok_{tag}"),
        output_dir=str(work / f"lf_out_{tag}"),
        overwrite_output_dir=True,
        per_device_train_batch_size=1 if packed else 16,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        disable_gradient_checkpointing=True,
        dataloader_num_workers=0,
        seed=0,
        plot_loss=False,
    )


# ----------------------------------------------------------------------------- children
def child_lf(work: Path, variant: str, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    from llamafactory.data.formatter import StringFormatter
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.data.template import register_template
    from llamafactory.train.tuner import run_exp
    from transformers import Trainer, TrainerCallback

    # ChatML with mmscene's default system prompt + the llava plugin:
    # LLaMA-Factory ships no ChatML llava template.
    register_template(
        name=TEMPLATE,
        format_user=StringFormatter(
            slots=["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"]
        ),
        format_assistant=StringFormatter(slots=["{{content}}<|im_end|>\n"]),
        format_system=StringFormatter(slots=["<|im_start|>system\n{{content}}<|im_end|>\n"]),
        default_system="You are a helpful assistant.",  # mmscene's DEFAULT_SYSTEM_PROMPT (data.system_prompt)
        stop_words=["<|im_end|>"],
        mm_plugin=get_mm_plugin(name="llava", image_token="<image>"),
    )
    timer = _Timer()
    pending = {}
    orig = Trainer.training_step

    def training_step(self, model, inputs, *a, **k):
        ids = inputs["input_ids"]
        pad = (
            self.processing_class.pad_token_id
            if hasattr(self.processing_class, "pad_token_id")
            else self.processing_class.tokenizer.pad_token_id
        )
        pending["tokens"] = int((ids != pad).sum())
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        # samples: 3 <|im_start|> per sample (system, user, assistant turns), also inside a packed row
        pending["samples"] = int((ids == tok.convert_tokens_to_ids("<|im_start|>")).sum()) // 3
        return orig(self, model, inputs, *a, **k)

    Trainer.training_step = training_step

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            timer.mark(pending.get("tokens", 0), pending.get("samples", 0))

    run_exp(lf_args(work, variant, steps), callbacks=[StepEnd()])
    timer.dump()


def run_child(work: Path, side: str, args, cfgs, warmup: int) -> dict:
    out = work / "last_run.json"
    out.unlink(missing_ok=True)
    env = child_env(work)
    env["PEER_BENCH_OUT"] = str(out)
    if side.startswith("mmscene"):
        cmd = [sys.executable, "-m", "mmscene.cli", "fit", "--config", str(cfgs[side])]
    else:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            side,
            "--work",
            str(work),
            "--steps",
            str(args.steps),
        ]
    t0 = time.perf_counter()
    log = work / f"log_{side.replace(' ', '_')}.txt"
    with open(log, "a") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=str(work)).returncode
    total = time.perf_counter() - t0
    if rc != 0 or not out.exists():
        raise SystemExit(f"{side} failed (rc {rc}), see {log}")
    data = json.loads(out.read_text())
    marks = data["marks"]
    w0, c0 = marks[warmup - 1][0], marks[warmup - 1][1]
    w1, c1 = marks[-1][0], marks[-1][1]
    tokens = sum(m[2] for m in marks[warmup:])
    samples = sum(m[3] for m in marks[warmup:])
    n = len(marks) - warmup
    return {
        "wall": w1 - w0,
        "cpu": c1 - c0,
        "tokens": tokens,
        "samples": samples,
        "steps": n,
        "first_step_at": data["first_step_at"],
        "process_s": total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/lf/bench"))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--per-scenario", type=int, default=200)
    p.add_argument("--pretok", action="store_true", help="also mmscene on pre-tokenized shards")
    p.add_argument("--mm-packed", action="store_true", help="also mmscene with token-budget packing")
    p.add_argument("--no-unpacked", action="store_true", help="skip LLaMA-Factory without packing")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_lf(args.work, args.child, args.steps)
        return
    if args.steps <= args.warmup + 1:
        raise SystemExit("--steps must exceed --warmup + 1")
    env = child_env(args.work)
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import llamafactory, lightning, transformers; "
            "print(llamafactory.__version__, transformers.__version__)",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise SystemExit(
            "llamafactory (with lightning and transformers) is not importable by this Python "
            f"({sys.executable}):\n{check.stderr.strip().splitlines()[-1] if check.stderr.strip() else ''}\n"
            "Create the venv described in this script's docstring and run it with that venv's python."
        )
    print(
        f"llamafactory {check.stdout.strip().split()[0]}, transformers {check.stdout.strip().split()[1]}",
        flush=True,
    )
    t0 = time.perf_counter()
    prep = prepare(args.work, args)
    print(
        f"prepared data/model/configs in {time.perf_counter() - t0:.1f} s ({prep['n_samples']} samples)",
        flush=True,
    )
    sides = list(prep["mm_cfgs"]) + ["LF packed"] + ([] if args.no_unpacked else ["LF unpacked"])
    results = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in sides:
            res = run_child(args.work, side, args, prep["mm_cfgs"], args.warmup)
            results[side].append(res)
            print(
                f"round {r + 1} {side:15s} {res['tokens'] / res['wall']:8.0f} tok/s wall "
                f"{res['tokens'] / res['cpu']:8.0f} tok/s cpu  {res['tokens'] / res['steps']:6.0f} tok/step "
                f"{res['samples'] / res['steps']:5.1f} samples/step  first step at {res['first_step_at']:.1f} s "
                f"(process {res['process_s']:.1f} s)",
                flush=True,
            )
    print()
    print(
        f"{'side':16s} {'tok/s wall':>10s} {'tok/s cpu':>10s} {'tok/step':>9s} {'samp/step':>9s} "
        f"{'vs LF packed (wall/cpu)':>24s}"
    )
    agg = {}
    for side, rs in results.items():
        tok, wall, cpu = (sum(x[k] for x in rs) for k in ("tokens", "wall", "cpu"))
        steps, samples = sum(x["steps"] for x in rs), sum(x["samples"] for x in rs)
        agg[side] = (tok / wall, tok / cpu, tok / steps, samples / steps)
    ref = agg["LF packed"]
    for side, (tw, tc, ts, ss) in agg.items():
        print(
            f"{side:16s} {tw:10.0f} {tc:10.0f} {ts:9.0f} {ss:9.1f} {tw / ref[0]:11.2f}x /{tc / ref[1]:6.2f}x"
        )
    print(
        f"\n{args.rounds} alternating rounds, {args.steps} steps per run, first {args.warmup} not timed; "
        "LF 'first step at' in round 1 includes tokenizing the dataset (later rounds load tokenized_path)."
    )


if __name__ == "__main__":
    main()

"""``mmscene export hf``: a training checkpoint → a transformers Llava (or mmscene) directory."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

log = logging.getLogger(__name__)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="Lightning .ckpt file or sharded checkpoint folder"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: the one the run trained with)"
    )
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--drop-frame-pooling",
        action="store_true",
        help="hf only: export a model trained with model.config.frame_pool_stride > 1 without its video "
        "frame pooling (transformers Llava has none); refused otherwise",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="LoRA checkpoints: fold the adapters into the weights (a plain model transformers loads); "
        "without it the LLM's adapters are also written for peft (OUT/llm_adapter)",
    )


def export_main(args: argparse.Namespace, fmt: str) -> int:
    from mmscene.data.pipeline.chat_template import DEFAULT_SYSTEM_PROMPT, export_chat_template
    from mmscene.data.pipeline.encode import load_tokenizer
    from mmscene.model import CheckpointError, save_pretrained
    from mmscene.train.checkpoint import load_module_from_checkpoint

    module, ckpt = load_module_from_checkpoint(args.checkpoint)
    model = module.model
    if module.lora is not None:
        from mmscene.model import lora

        if not args.merge:
            adapter = lora.save_llm_adapter(model, module.lora, f"{args.out}/llm_adapter")
            print(f"wrote the LLM's LoRA adapter for peft to {adapter}")
        lora.merge_adapters(model)  # the model directory is the merged model either way
    if args.dtype:
        model = model.to(getattr(torch, args.dtype))
    data = ckpt.get("datamodule_hyper_parameters") or {}
    tokenizer_path = args.tokenizer or data.get("tokenizer")
    if tokenizer_path:
        model.tokenizer = load_tokenizer(tokenizer_path)
    if model.tokenizer is not None:
        # The run's system turn goes into the template: prompts made by other tools then equal training's.
        system_prompt = data.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
        template = getattr(model.tokenizer, "chat_template", None)
        model.tokenizer.chat_template = export_chat_template(template, system_prompt)
    options = {}
    if fmt == "llava-hf":
        # The processor pads (or not) as this run's data module did; its default is to pad.
        options = {"pad_to_square": bool(data.get("pad_to_square", True))}
        options["drop_frame_pooling"] = args.drop_frame_pooling
    try:
        out = save_pretrained(model, args.out, format=fmt, **options)
    except CheckpointError as err:  # a refusal with its reason, not a traceback
        print(f"mmscene export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {fmt} checkpoint to {out}")
    return 0

"""Loading what to evaluate: a training checkpoint (``.ckpt`` file or sharded folder) or any
directory :func:`mmscene.model.load_pretrained` reads (mmscene, llava-hf, llava_qwen).

A training checkpoint carries its run's data settings (tokenizer, system prompt, padding,
scenario options), so its prompts are training's without further arguments. A model directory
carries none: the defaults are training's defaults, and ``config=RUN.yaml`` takes them from the
run's config instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmscene.eval.session import DataSettings, EvalSession, EvaluationError


def is_training_checkpoint(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and (path / ".metadata").is_file())


def config_data_section(config: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(config)
    if not path.is_file():
        raise EvaluationError(f"config {path} not found")
    doc = yaml.safe_load(path.read_text()) or {}
    data = doc.get("data") or {}
    return data.get("init_args", data) if isinstance(data, dict) else {}


def load_session(
    pretrained: str | Path,
    *,
    tokenizer: str | None = None,
    config: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    overrides: dict[str, Any] | None = None,
    multi_view_tasks: tuple[str, ...] = (),
) -> EvalSession:
    """``overrides``: data settings given explicitly (``system_prompt``, ``pad_to_square``, …)."""
    from mmscene.data.pipeline.encode import load_tokenizer

    path = Path(pretrained)
    if not path.exists():
        raise EvaluationError(f"no checkpoint or model directory at {path}")
    data: dict[str, Any] = {}
    if is_training_checkpoint(path):
        from mmscene.train.checkpoint import load_module_from_checkpoint

        module, ckpt = load_module_from_checkpoint(path)
        model = module.model
        data = dict(ckpt.get("datamodule_hyper_parameters") or {})
        model.tokenizer = None
    else:
        from mmscene.model import load_pretrained

        model = load_pretrained(path)
    if config is not None:
        data.update(config_data_section(config))
    data.update(overrides or {})
    settings = DataSettings.of(data)
    tok_path = tokenizer or settings.tokenizer
    tok = load_tokenizer(tok_path) if tok_path else getattr(model, "tokenizer", None)
    if tok is not None and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = model.to(device)
    if dtype:
        model = model.to(getattr(torch, dtype))
    model.eval()
    return EvalSession(model, tok, settings, multi_view_tasks=multi_view_tasks)

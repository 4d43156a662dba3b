"""``lmms-eval --model mmscene``: mmscene models in the field's evaluation harness.

    lmms-eval --model mmscene --model_args pretrained=CKPT_OR_DIR[,config=RUN.yaml,tokenizer=DIR,
        system_prompt=...,dtype=bfloat16,multi_view_tasks=taskA|taskB] --tasks ... --include_path ...

Registered through the ``lmms_eval.models`` entry point (:mod:`mmscene.eval.manifest`). Prompts
are built by :class:`~mmscene.eval.session.EvalSession`, so they equal ``mmscene validate``'s;
generation is batched (left padding, requests of a batch share their generation settings) and
``until`` strings cut the answer. Under several ranks every rank runs the same number of batches
(sharded models step together).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator

from mmscene.eval.loading import load_session
from mmscene.eval.session import EvalSession, EvaluationError
from mmscene.eval.strict_pil import restore_strict_pil
from mmscene.train.inputs import generate_answers

restore_strict_pil()

log = logging.getLogger(__name__)

_SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "num_beams")
_IGNORED = ("image_aspect_ratio", "image_sizes", "modalities")  # LLaVA options mmscene's data settings decide


class MMSceneLMM(lmms):
    """An lmms-eval model around an :class:`EvalSession`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | None = None,
        tokenizer: str | None = None,
        config: str | None = None,
        system_prompt: str | None = None,
        pad_to_square: bool | None = None,
        multi_view_tasks: str = "",
        max_new_tokens: int = 1024,
        session: EvalSession | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            log.warning("mmscene model: ignoring unknown model_args %s", sorted(unused))
        if session is None:
            if pretrained is None:
                raise EvaluationError("--model_args pretrained=CHECKPOINT_OR_DIR is required")
            overrides: dict[str, Any] = {}
            if system_prompt is not None:
                overrides["system_prompt"] = None if system_prompt in ("", "none", "None") else system_prompt
            if pad_to_square is not None:
                overrides["pad_to_square"] = pad_to_square in (True, "True", "true", "1", 1)
            session = load_session(
                pretrained,
                tokenizer=tokenizer,
                config=config,
                device=device or "cpu",
                dtype=dtype,
                overrides=overrides,
                multi_view_tasks=tuple(t for t in str(multi_view_tasks).split("|") if t),
            )
        self.session = session
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def tokenizer(self):
        return self.session.tokenizer

    # ------------------------------------------------------------------ requests
    def _doc(self, task: str, split: str, doc_id: int) -> dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, doc: dict[str, Any]) -> list[Any]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        flat: list[Any] = []
        for v in visuals or []:
            flat.extend(v if isinstance(v, list | tuple) else [v])
        return flat

    def _encode(self, context: str, doc_to_visual, doc_id: int, task: str, split: str, continuation=None):
        doc = self._doc(task, split, doc_id)
        visuals = self._visuals(doc_to_visual, doc)
        # the benchmark's own id, as the converter keys the same sample (it seeds formatting)
        sample_id = doc.get("sample_id") if isinstance(doc, dict) else None
        key = str(sample_id) if sample_id is not None else f"{task}-{doc_id}"
        scenario = self.session.scenario_for(visuals, task, doc)
        return self.session.encode(key, context, visuals, scenario, continuation)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [req.args for req in requests]
        # longest first: the slowest batches run first, as lmms-eval's own models do
        order = Collator(args, lambda a: (-len(a[0]), a[0]), grouping=True, group_fn=lambda a: a[1])
        answers: list[str] = []
        batches = list(order.get_batched(n=self.batch_size, batch_fn=None))
        for chunk in self._same_count(batches):
            answers.extend(self._generate(chunk))
        return order.get_original(answers[: len(args)])

    def _same_count(self, batches: list[list[tuple]]) -> list[list[tuple]]:
        """Every rank runs as many generation batches as the busiest one (extra ones repeat the
        last batch; their answers are dropped): sharded ranks must call the model together."""
        if self.world_size == 1 or not batches:
            return batches
        count = torch.tensor([len(batches)])
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return batches + [batches[-1]] * (int(count) - len(batches))

    def _generate(self, chunk: list[tuple]) -> list[str]:
        gen_kwargs = dict(chunk[0][1])
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
        generation = {k: gen_kwargs.pop(k) for k in _SAMPLING if k in gen_kwargs}
        for k in _IGNORED:
            gen_kwargs.pop(k, None)
        if gen_kwargs:
            log.warning("mmscene model: ignoring generation settings %s", sorted(gen_kwargs))
        if float(generation.get("temperature", 0) or 0) > 0:
            generation["do_sample"] = True
        if not generation.get("do_sample"):
            generation = {"num_beams": generation.get("num_beams", 1) or 1}
        samples = [
            self._encode(ctx, visual, doc_id, task, split) for ctx, _, visual, doc_id, task, split in chunk
        ]
        batch = self.session.collate(samples)
        with torch.no_grad():
            answers = generate_answers(
                self.session.model,
                self.session.tokenizer,
                batch,
                max_new_tokens=max_new,
                synced=self.world_size > 1,
                **generation,
            )
        return [_cut(answer, until) for answer in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, target, visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            if isinstance(continuation, list):
                continuation = continuation[0]
            sample = self._encode(context, visual, doc_id, task, split, continuation=str(continuation))
            out.append(_through_evaluator(self.session.loglikelihood(sample)))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Rounds as lmms-eval's LLaVA models run them: round 0 asks the request's question; each
        later round asks what the task's ``doc_to_text`` returns given the previous answers, until
        it signals the end. The rounds' answers are returned as the task's function gives them."""
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            answers: list[str] = []
            info, result = None, None
            round_idx, visual_fn = 0, doc_to_visual
            while True:
                if round_idx:
                    visuals, context, terminal, result, info = doc_to_text(
                        doc, previous_output=answers, round_idx=round_idx, previous_round_info=info
                    )
                    if terminal:
                        break
                    visual_fn = (lambda v: lambda _doc: v)(visuals) if visuals else doc_to_visual
                chunk = [(context, gen_kwargs, visual_fn, doc_id, task, split)]
                answers.append(self._generate(chunk)[0])
                round_idx += 1
            out.append(result if result is not None else answers[-1])
        return out


# lmms-eval 0.7.3 runs every model output through ``unwrap_generation_output``, which turns a
# ``(logprob, is_greedy)`` tuple into its string and so breaks every likelihood-scored task; its
# ``GenerationResult`` wrapper is passed through as is. Versions that keep tuples get the tuple.
_WRAP_LIKELIHOOD = unwrap_generation_output((0.0, True))[0] != (0.0, True)


def _through_evaluator(result: tuple[float, bool]):
    """``result`` as lmms-eval's evaluator passes it on unchanged."""
    return GenerationResult(text=result) if _WRAP_LIKELIHOOD else result  # type: ignore[arg-type]


def _cut(answer: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            answer = answer.split(stop)[0]
    return answer

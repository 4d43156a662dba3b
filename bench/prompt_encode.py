"""Prompt encoding: the chat template rendered once per sample (learned turn layout) vs per prefix.

The conversations are the demo dataset's annotations (``raw/train.jsonl``, 4 x 125 samples by
default), each video's placeholder expanded to its 6 frames and each 3D scene's to 2 views as
the plugins do, encoded with the demo tokenizer. Two encoders, checked to give the same tokens:

  prefix   the reference: growing prefixes of the conversation rendered through the template
           (1 render per system / user turn, 2 per assistant turn)
  layout   PromptEncoder as shipped: the role sequence's layout learned once, one render per
           sample to check it

Rows: ``template`` times only finding the pieces (the renders); ``turn tokens`` adds the
tokenization, i.e. everything ``encode`` does before the pixels. Conversations are the demo's
single exchanges and, in the ``x3`` rows, three consecutive samples' exchanges chained into one
conversation (multi-turn, as in M4-Instruct). Each round runs both methods over all
conversations, in alternating order; the fastest round of ``--rounds`` is shown, wall clock and
process CPU time (``time.process_time``, which other jobs on a shared machine disturb less).

  python bench/prompt_encode.py                    # generates the demo annotations, ~10 s on 2 cores
  python bench/prompt_encode.py --data data/demo --rounds 9
"""

from __future__ import annotations

import argparse
import json
import time

from demo_data import add_demo_data_arguments, demo_data
from PIL import Image
from transformers import AutoTokenizer

from mmscene.data.pipeline.encode import ImageGeometry, PromptEncoder
from mmscene.scenario import IMAGE_PLACEHOLDER, Prompt

PLACEHOLDERS = {"video": 6, "3d": 2}  # frames of a demo clip, views in configs/demo.yaml
ROLES = {"human": "user", "gpt": "assistant"}


class Counting(PromptEncoder):
    """Counts chat-template renders."""

    renders = 0

    def _render(self, messages, add_generation_prompt=False):
        self.renders += 1
        return super()._render(messages, add_generation_prompt)


class Prefix(Counting):
    def _layout_pieces(self, messages):
        return None


def conversation(record: dict) -> list[dict[str, str]]:
    kind = record["id"].split("-")[2]
    n = PLACEHOLDERS.get(kind, 1)
    turns = []
    for t in record["conversations"]:
        text = t["value"]
        if n > 1:
            text = text.replace(IMAGE_PLACEHOLDER, "\n".join([IMAGE_PLACEHOLDER] * n), 1)
        turns.append({"role": ROLES[t["from"]], "content": text})
    return turns


def prompts(records: list[dict], chain: int) -> list[Prompt]:
    image = Image.new("RGB", (8, 8))
    out = []
    for i in range(0, len(records) - chain + 1, chain):
        conv = [turn for r in records[i : i + chain] for turn in conversation(r)]
        n = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in conv)
        out.append(Prompt(f"p{i}", "bench", "bench", conv, [image] * n, [False] * n))
    return out


def pieces(encoder: PromptEncoder, prompt: Prompt):
    messages = encoder._messages(prompt.conversation)
    return encoder._layout_pieces(messages) or encoder._prefix_pieces(messages, prompt.key)


def turn_tokens(encoder: PromptEncoder, prompt: Prompt):
    return encoder._turn_tokens(encoder._messages(prompt.conversation), prompt)


def timed(fn, encoder, batch) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for prompt in batch:
        fn(encoder, prompt)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_demo_data_arguments(parser)
    parser.set_defaults(samples_per_scenario=125)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data, tmp = demo_data(args)
    records = [json.loads(line) for line in (data / "raw" / "train.jsonl").open()]
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    geometry = ImageGeometry(48, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), 9, 4)
    encoders = {"prefix": Prefix(tokenizer, geometry), "layout": Counting(tokenizer, geometry)}

    print(
        f"{'row':<20}{'n':>5}{'renders/sample':>22}{'prefix ms/sample':>24}{'layout ms/sample':>24}{'ratio':>14}"
    )
    print(f"{'':<20}{'':>5}{'prefix  layout':>22}{'wall   cpu':>24}{'wall   cpu':>24}{'wall  cpu':>14}")
    for chain in (1, 3):
        batch = prompts(records, chain)
        ref, new = encoders["prefix"], encoders["layout"]
        for prompt in batch:  # same tokens, and the layouts learned before timing
            assert turn_tokens(ref, prompt) == turn_tokens(new, prompt), prompt.key
        for name, fn in (("template", pieces), ("turn tokens", turn_tokens)):
            counts = {}
            for key, enc in encoders.items():
                enc.renders = 0
                timed(fn, enc, batch)
                counts[key] = enc.renders / len(batch)
            best = {key: (float("inf"), float("inf")) for key in encoders}
            for r in range(args.rounds):
                order = list(encoders) if r % 2 == 0 else list(reversed(encoders))
                for key in order:
                    wall, cpu = timed(fn, encoders[key], batch)
                    best[key] = (min(best[key][0], wall), min(best[key][1], cpu))
            ms = {k: (1e3 * w / len(batch), 1e3 * c / len(batch)) for k, (w, c) in best.items()}
            (pw, pc), (lw, lc) = ms["prefix"], ms["layout"]
            row = f"{name} x{chain}"
            print(
                f"{row:<20}{len(batch):>5}{counts['prefix']:>14.1f}{counts['layout']:>8.1f}"
                f"{pw:>17.3f}{pc:>7.3f}{lw:>17.3f}{lc:>7.3f}{pw / lw:>9.2f}{pc / lc:>5.2f}"
            )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

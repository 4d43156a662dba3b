"""How long before the time limit SLURM sends the requeue signal: ``mmscene slurm --signal-lead auto``.

After the signal the ranks finish what is in flight (an optimizer step, or a validation batch:
:mod:`mmscene.launch.requeue` checks at both), write the hpc checkpoint and requeue. The lead
covers the three:

* the checkpoint holds fp32 weights of every part, frozen ones too, and AdamW's two fp32 states
  of the trained parameters (the parameter counts are ``mmscene plan``'s, from the meta device)::

      bytes = 4 * P + 2 * 4 * T

* a DDP checkpoint is one file written by rank 0, at one node's write bandwidth; a sharded one
  (``ModelParallelStrategy``: a distributed checkpoint folder) is written by every rank, so the
  nodes write in parallel::

      write_s = bytes / (write_gbps * 1e9 * writing_nodes)

* ``lead = ceil(step_s + write_s + margin_s)``: ``step_s`` is the longest stretch between two
  checks of the signal (one optimizer step with all its micro-batches, one validation batch of
  generation, or a validation's final scoring), ``margin_s`` the requeue, the gathering of every
  rank's data-stream state, and filesystem jitter.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

DEFAULT_WRITE_GBPS = 1.0  # GB/s one node sustains to a shared parallel filesystem, conservatively
DEFAULT_STEP_SECONDS = 60.0
DEFAULT_MARGIN_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class SignalLead:
    seconds: int
    params: int
    trainable: int
    freeze: tuple[str, ...]
    checkpoint_bytes: int
    sharded: bool
    writing_nodes: int
    write_gbps: float
    write_seconds: float
    step_seconds: float
    margin_seconds: float
    model: str

    def comment(self, signal_name: str = "USR1") -> list[str]:
        """The reasoning, as lines for the job script."""
        frozen = ", ".join(self.freeze) or "nothing"
        who = (
            f"every rank writes its shard (ModelParallelStrategy): {self.writing_nodes} node(s) in parallel"
            if self.sharded
            else "rank 0 writes the one file (DDP): 1 node"
        )
        exact = self.step_seconds + self.write_seconds + self.margin_seconds
        return [
            f"# Requeue signal {self.seconds} s before the time limit (--signal-lead auto), sized for the",
            f"# hpc checkpoint of {self.model}:",
            f"#   {self.checkpoint_bytes / 1e9:.1f} GB = fp32 weights of all {self.params:,} parameters (4 B each)",
            f"#     + AdamW's two fp32 states of the {self.trainable:,} trained ones (8 B each; frozen: {frozen})",
            f"#   {who}",
            f"#     at {self.write_gbps:g} GB/s each (--checkpoint-write-gbps): {self.write_seconds:.1f} s",
            f"#   + {self.step_seconds:g} s for the step or validation batch in flight when it comes (--step-seconds)",
            f"#   + {self.margin_seconds:g} s margin: requeue, data-stream state, filesystem jitter (--signal-margin)",
            f"#   = {exact:.1f} s, rounded up: --signal={signal_name}@{self.seconds}",
        ]


def checkpoint_bytes(params: int, trainable: int) -> int:
    """fp32 weights of every parameter + AdamW's exp_avg and exp_avg_sq (fp32) of trained ones."""
    return 4 * params + 2 * 4 * trainable


def size_lead(
    params: int,
    trainable: int,
    *,
    nodes: int,
    sharded: bool,
    write_gbps: float = DEFAULT_WRITE_GBPS,
    step_seconds: float = DEFAULT_STEP_SECONDS,
    margin_seconds: float = DEFAULT_MARGIN_SECONDS,
    freeze: tuple[str, ...] = (),
    model: str = "the model",
) -> SignalLead:
    if write_gbps <= 0 or step_seconds < 0 or margin_seconds < 0 or nodes < 1:
        raise ValueError("--checkpoint-write-gbps must be > 0, --step-seconds and --signal-margin >= 0")
    size = checkpoint_bytes(params, trainable)
    writers = nodes if sharded else 1
    write = size / (write_gbps * 1e9 * writers)
    return SignalLead(
        seconds=math.ceil(step_seconds + write + margin_seconds),
        params=params,
        trainable=trainable,
        freeze=tuple(freeze),
        checkpoint_bytes=size,
        sharded=sharded,
        writing_nodes=writers,
        write_gbps=write_gbps,
        write_seconds=write,
        step_seconds=step_seconds,
        margin_seconds=margin_seconds,
        model=model,
    )


def lead_for_config(
    config: str | Path,
    *,
    nodes: int,
    sharded: bool,
    preset: str | None = None,
    vision: str = "siglip-so400m-patch14-384-26l",
    **options: float,
) -> SignalLead:
    """:func:`size_lead` for the YAML's model (or ``preset``) with its ``model.freeze``."""
    from mmscene.launch.plan import meta_model, parameter_counts
    from mmscene.launch.plan_cli import resolve_model, settings_from_yaml

    if not Path(config).is_file():
        raise SystemExit(f"mmscene slurm: --signal-lead auto reads the config, {config} is not there")
    settings = settings_from_yaml(config)
    spec = resolve_model(settings["spec"], preset, vision, str(config), "or give --signal-lead SECONDS")
    counts = parameter_counts(meta_model(spec, settings["freeze"]))["total"]
    what = f"the {preset} preset" if preset else f"the config's model ({Path(config).name})"
    return size_lead(
        counts["total"],
        counts["trainable"],
        nodes=nodes,
        sharded=sharded,
        freeze=tuple(sorted(settings["freeze"])),
        model=what,
        **options,
    )

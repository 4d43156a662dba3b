"""``mmscene slurm``: an sbatch script that runs ``mmscene fit`` on N nodes x G devices.

The script leans on Lightning's ``SLURMEnvironment`` (selected automatically when the
processes run under ``srun``): it reads ranks from ``SLURM_PROCID`` / ``SLURM_LOCALID`` /
``SLURM_NODEID``, and with ``auto_requeue=True`` (its default) it installs a handler for the
requeue signal (``requeue_signal``, SIGUSR1 unless configured). ``#SBATCH --signal=USR1@<lead>``
makes SLURM send that signal to every task ``lead`` seconds before the time limit (sized from
the checkpoint with ``--signal-lead auto``, see :mod:`mmscene.launch.lead`); each rank then saves
``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir`` and rank 0 runs ``scontrol requeue``.
When the requeued job starts, ``Trainer.fit`` finds the highest ``hpc_ckpt_<n>.ckpt`` in that
same folder and resumes from it (model, optimizer, loops, the data stream's position).

Lightning does that work inside the signal handler, which runs wherever the main thread happens
to be (mid-backward, between two collectives) and also in forked DataLoader workers, which SLURM
signals like every other process of the step (Lightning-AI/pytorch-lightning#21406). The
generated script therefore adds :class:`mmscene.launch.requeue.SlurmRequeue`: it takes over the
handler, only notes the signal, and saves the same ``hpc_ckpt_<n>.ckpt`` and requeues at the next
optimizer-step boundary (or between validation batches), all ranks together, so Lightning's
resume path is unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

# Lives in its own module so that `mmscene slurm` (and every other subcommand) does not import Lightning.
CALLBACK = "mmscene.launch.requeue.SlurmRequeue"

# Lightning's SLURMEnvironment.detect() treats these job names as interactive sessions and
# then ignores SLURM entirely (no srun ranks, no auto-requeue).
_INTERACTIVE_NAMES = ("bash", "interactive")
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclasses.dataclass
class SlurmJob:
    config: str
    nodes: int = 1
    gpus_per_node: int = 8
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "mmscene"
    cpus_per_task: int | None = None
    mem: str | None = None
    output: str = "slurm-logs"
    extra: list[str] = dataclasses.field(default_factory=list)
    cpu: bool = False
    signal_seconds: int = 90
    requeue_signal: str = "USR1"
    chdir: str | None = None
    launcher: str = "mmscene"
    safe_requeue: bool = True
    lead: Any = None  # the SignalLead signal_seconds was sized from (its reasoning goes into the script)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"--nodes and --gpus-per-node must be >= 1, got {self.nodes} and {self.gpus_per_node}"
            )
        if self.job_name in _INTERACTIVE_NAMES:
            raise ValueError(
                f"--job-name {self.job_name!r}: Lightning does not treat jobs named {_INTERACTIVE_NAMES} as SLURM "
                "jobs (no ranks from srun, no auto-requeue); choose another name"
            )
        if not re.fullmatch(r"[\w.+-]+", self.job_name):
            raise ValueError(f"--job-name {self.job_name!r}: use letters, digits, '.', '_', '+', '-'")
        if self.time is not None and not _TIME.match(self.time):
            raise ValueError(f"--time {self.time!r}: use SLURM's format, e.g. 24:00:00 or 2-00:00:00")
        if self.signal_seconds < 1:
            raise ValueError("--signal-lead must be >= 1 s")
        if self.time is not None and self.signal_seconds >= time_limit_seconds(self.time):
            raise ValueError(
                f"--signal-lead {self.signal_seconds} s is not shorter than --time {self.time}: "
                "the signal would come as soon as the job starts; ask for more time"
            )
        self.requeue_signal = self.requeue_signal.upper().removeprefix("SIG")

    @property
    def tasks_per_node(self) -> int:
        # One process per device: Lightning checks that SLURM_NTASKS_PER_NODE == trainer.devices.
        return self.gpus_per_node

    def log_dir(self) -> Path:
        return Path(self.chdir or os.getcwd()) / self.output

    def fit_command(self) -> list[str]:
        cmd = [*shlex.split(self.launcher), "fit", "--config", self.config]
        cmd += ["--trainer.num_nodes", str(self.nodes), "--trainer.devices", str(self.gpus_per_node)]
        if self.cpu:
            cmd += ["--trainer.accelerator", "cpu"]
        if self.safe_requeue:
            cmd += [f"--trainer.callbacks+={CALLBACK}"]
        if self.requeue_signal != "USR1":
            # Lightning listens for SIGUSR1 unless its SLURMEnvironment is told otherwise.
            cmd += [
                "--trainer.plugins",
                "lightning.pytorch.plugins.environments.SLURMEnvironment",
                "--trainer.plugins.requeue_signal",
                f"SIG{self.requeue_signal}",
            ]
        extra = [token for item in self.extra for token in shlex.split(item)]
        cmd += extra
        if uses_model_parallel(self.config_path(), extra):
            # ModelParallelStrategy's "auto" data-parallel size is the number of nodes (the GPUs of a
            # node would go to tensor parallelism, which mmscene does not use): pin FSDP2 to all ranks.
            cmd += [
                "--trainer.strategy.data_parallel_size",
                str(self.nodes * self.gpus_per_node),
                "--trainer.strategy.tensor_parallel_size",
                "1",
            ]
        return cmd

    def config_path(self) -> Path:
        """The YAML as the job will read it (relative to --chdir), else as seen from here."""
        path = Path(self.config)
        if path.is_absolute():
            return path
        in_job = Path(self.chdir or os.getcwd()) / path
        return in_job if in_job.is_file() or not path.is_file() else path

    def render(self) -> str:
        chdir = self.chdir or os.getcwd()
        out = self.log_dir()
        root = default_root_dir(str(self.config_path()), chdir)
        lines = ["#!/bin/bash", f"# Generated by: mmscene slurm ({describe(self)})"]
        sb = lines.append
        sb(f"#SBATCH --job-name={self.job_name}")
        sb(f"#SBATCH --nodes={self.nodes}")
        what = "process" if self.cpu else "GPU"
        sb(f"#SBATCH --ntasks-per-node={self.tasks_per_node}   # one training process per {what}")
        if not self.cpu:
            sb(f"#SBATCH --gres=gpu:{self.gpus_per_node}")
        if self.cpus_per_task:
            sb(f"#SBATCH --cpus-per-task={self.cpus_per_task}")
        if self.mem:
            sb(f"#SBATCH --mem={self.mem}")
        if self.partition:
            sb(f"#SBATCH --partition={self.partition}")
        if self.account:
            sb(f"#SBATCH --account={self.account}")
        if self.time:
            sb(f"#SBATCH --time={self.time}")
        sb(f"#SBATCH --chdir={chdir}")
        sb(
            f"#SBATCH --signal={self.requeue_signal}@{self.signal_seconds}   # to every task, before the time limit"
        )
        sb("#SBATCH --requeue              # allow `scontrol requeue` (Lightning's auto-requeue)")
        sb("#SBATCH --open-mode=append     # a requeued run appends to the same log files")
        sb(f"#SBATCH --output={out}/%x-%j.out")
        sb(f"#SBATCH --error={out}/%x-%j.err")
        lines.append("")
        if self.lead is not None:
            lines += self.lead.comment(self.requeue_signal)
        else:
            lines.append(
                f"# Requeue signal {self.signal_seconds} s before the time limit (--signal-lead {self.signal_seconds})."
            )
        lines += [
            f"# On {self.requeue_signal} the ranks write hpc_ckpt_<n>.ckpt into trainer.default_root_dir",
            f"# ({root});",
            "# rank 0 requeues the job, and the requeued job resumes from the newest one.",
            "# A fresh run needs a default_root_dir without hpc_ckpt_* files, or it resumes from them.",
            "set -eo pipefail",
            'echo "mmscene: job ${SLURM_JOB_ID} start $(date -Is) restart=${SLURM_RESTART_COUNT:-0}'
            ' nodes=${SLURM_JOB_NODELIST}"',
            "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        ]
        if not self.cpu:
            lines.append(
                "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a dead rank fails the job instead of hanging it"
            )
        # --kill-on-bad-exit: one failed rank ends the step instead of leaving the others in a collective.
        lines.append("srun --kill-on-bad-exit=1 " + shlex.join(self.fit_command()))
        lines.append('echo "mmscene: job ${SLURM_JOB_ID} training exited $(date -Is)"')
        return "\n".join(lines) + "\n"


def time_limit_seconds(limit: str) -> int:
    """SLURM's ``--time``: minutes, minutes:seconds, hours:minutes:seconds, or days-hours[:minutes[:seconds]]."""
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return (((int(days or 0) * 24 + hours) * 60) + minutes) * 60 + seconds


def uses_model_parallel(config: Path, extra: list[str]) -> bool:
    """Whether the run uses Lightning's ModelParallelStrategy (FSDP2), from the YAML or --extra."""
    if any("ModelParallelStrategy" in token for token in extra):
        return True
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    strategy = (data.get("trainer") or {}).get("strategy") if isinstance(data, dict) else None
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy or "")
    return name.endswith("ModelParallelStrategy")


def describe(job: SlurmJob) -> str:
    return f"{job.nodes} node(s) x {job.gpus_per_node} {'process(es)' if job.cpu else 'GPU(s)'}, config {job.config}"


def default_root_dir(config: str, cwd: str) -> str:
    """Where the config puts hpc checkpoints (Lightning's default is the working directory)."""
    try:
        data = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "trainer.default_root_dir, or the job's working directory"
    root = (data.get("trainer") or {}).get("default_root_dir") if isinstance(data, dict) else None
    if root is None:
        return cwd
    return str(root if Path(root).is_absolute() else Path(cwd) / root)


def check_config(config: str) -> list[str]:
    """Problems in the YAML that would break multi-node runs or auto-requeue."""
    path = Path(config)
    if not path.is_file():
        return [f"config {config} not found"]
    data: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    problems = []
    trainer = data.get("trainer") or {}
    plugins = trainer.get("plugins") or []
    for plugin in plugins if isinstance(plugins, list) else [plugins]:
        if (
            isinstance(plugin, dict)
            and str(plugin.get("class_path", "")).endswith("SLURMEnvironment")
            and (plugin.get("init_args") or {}).get("auto_requeue") is False
        ):
            problems.append(
                "trainer.plugins sets SLURMEnvironment(auto_requeue=false): no checkpoint on the signal"
            )
    if trainer.get("default_root_dir") is None:
        problems.append(
            "trainer.default_root_dir is not set: hpc checkpoints go to the job's working directory"
        )
    return problems


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the LightningCLI YAML passed to `mmscene fit`")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per node (with --cpu: processes per node)"
    )
    parser.add_argument("--partition")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00")
    parser.add_argument("--account")
    parser.add_argument("--job-name", default="mmscene")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per process (data workers + 1)")
    parser.add_argument("--mem", help="memory per node, e.g. 400G")
    parser.add_argument("--output", default="slurm-logs", help="folder of the job's .out / .err logs")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar='"--key value"',
        help='more `mmscene fit` arguments, e.g. --extra "--trainer.max_steps 1000" (repeatable; a lone flag as --extra=--flag)',
    )
    parser.add_argument(
        "--cpu", action="store_true", help="CPU processes with gloo instead of GPUs (tests, dry runs)"
    )
    parser.add_argument(
        "--signal-lead",
        "--signal-seconds",
        dest="signal_lead",
        type=_lead,
        default="auto",
        metavar="auto|SECONDS",
        help="send the requeue signal this long before the time limit; auto (default): step + "
        "checkpoint write + margin, sized from the config's model (see docs/slurm.md)",
    )
    parser.add_argument(
        "--checkpoint-write-gbps",
        type=float,
        default=1.0,
        help="with auto: GB/s (10^9 bytes/s, not gigabits) one node writes to default_root_dir (default 1)",
    )
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=60.0,
        help="with auto: the longest optimizer step, validation batch or validation scoring (default 60)",
    )
    parser.add_argument(
        "--signal-margin", type=float, default=30.0, help="with auto: seconds on top (default 30)"
    )
    parser.add_argument(
        "--model",
        help="with auto: an LLM preset (e.g. qwen1.5-7b-chat) standing in for the config's model "
        "(a hub checkpoint not on this machine)",
    )
    parser.add_argument(
        "--vision", default="siglip-so400m-patch14-384-26l", help="vision preset with --model"
    )
    parser.add_argument(
        "--requeue-signal",
        default="USR1",
        help="signal for checkpoint + requeue (Lightning's requeue_signal)",
    )
    parser.add_argument("--chdir", help="working directory of the job (default: the current one)")
    parser.add_argument(
        "--launcher",
        default="mmscene",
        help="how to call mmscene on the nodes (e.g. 'python -m mmscene.cli')",
    )
    parser.add_argument(
        "--lightning-requeue",
        action="store_true",
        help=f"leave the signal to Lightning's own handler instead of adding {CALLBACK}",
    )
    parser.add_argument("--write", metavar="FILE", help="also write the script to FILE")


def _lead(value: str) -> str | int:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or whole seconds, got {value!r}") from None


def signal_lead(args: argparse.Namespace, config: Path, extra: list[str]):
    """``--signal-lead auto``: the :class:`~mmscene.launch.lead.SignalLead` for the job's config."""
    from mmscene.launch.lead import lead_for_config

    return lead_for_config(
        config,
        nodes=args.nodes,
        sharded=uses_model_parallel(config, extra),
        preset=args.model,
        vision=args.vision,
        write_gbps=args.checkpoint_write_gbps,
        step_seconds=args.step_seconds,
        margin_seconds=args.signal_margin,
    )


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    lead = None
    if args.signal_lead == "auto":
        probe = SlurmJob(config=args.config, chdir=args.chdir)
        extra = [token for item in args.extra for token in shlex.split(item)]
        lead = signal_lead(args, probe.config_path(), extra)
    return SlurmJob(
        config=args.config,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        time=args.time,
        account=args.account,
        job_name=args.job_name,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        output=args.output,
        extra=list(args.extra),
        cpu=args.cpu,
        signal_seconds=lead.seconds if lead is not None else args.signal_lead,
        requeue_signal=args.requeue_signal,
        chdir=args.chdir,
        launcher=args.launcher,
        safe_requeue=not args.lightning_requeue,
        lead=lead,
    )


def slurm_main(args: argparse.Namespace) -> int:
    import sys

    try:
        job = job_from_args(args)
    except ValueError as err:
        raise SystemExit(f"mmscene slurm: {err}") from err
    for problem in check_config(args.config):
        print(f"mmscene slurm: warning: {problem}", file=sys.stderr)
    # SLURM opens --output/--error before the script runs: the folder must exist at submission.
    if Path(job.chdir or os.getcwd()).is_dir():
        job.log_dir().mkdir(parents=True, exist_ok=True)
    else:
        print(f"mmscene slurm: note: create {job.log_dir()} on the cluster before sbatch", file=sys.stderr)
    script = job.render()
    if args.write:
        Path(args.write).write_text(script)
    sys.stdout.write(script)
    return 0

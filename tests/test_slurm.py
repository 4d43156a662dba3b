"""``mmscene slurm``: the generated sbatch script, and a real SLURM run that is signalled, saves an
hpc checkpoint, requeues itself and finishes from that checkpoint."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from mmscene.cli import main as cli_main
from mmscene.launch.requeue import SlurmRequeue
from mmscene.launch.slurm import CALLBACK, SlurmJob

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the script (no SLURM needed)
def _directives(script: str) -> dict[str, str]:
    found = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            option = line[len("#SBATCH ") :].split("#")[0].strip()
            key, _, value = option.partition("=")
            assert key not in found, f"directive {key} given twice"
            found[key] = value
    return found


def _srun(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(lines) == 1, script
    return shlex.split(lines[0])


def _options(args: list[str]) -> dict[str, str]:
    """``--key value`` and ``--key=value`` pairs of a command line."""
    found, i = {}, 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if eq:
            found[key], i = value, i + 1
        else:
            found[key], i = args[i + 1], i + 2
    return found


def test_gpu_script_directives(tmp_path):
    job = SlurmJob(
        config="configs/interleave-7b.yaml",
        nodes=4,
        gpus_per_node=8,
        partition="gpu",
        time="2-00:00:00",
        account="proj42",
        job_name="llava7b",
        cpus_per_task=12,
        mem="480G",
        output="logs",
        extra=["--trainer.max_steps 5000", "--model.activation_checkpointing true"],
        chdir=str(tmp_path),
    )
    script = job.render()
    assert script.startswith("#!/bin/bash\n")
    d = _directives(script)
    assert d["--nodes"] == "4"
    assert d["--ntasks-per-node"] == "8"  # one rank per GPU
    assert d["--gres"] == "gpu:8"
    assert d["--cpus-per-task"] == "12"
    assert d["--mem"] == "480G"
    assert d["--partition"] == "gpu" and d["--account"] == "proj42" and d["--time"] == "2-00:00:00"
    assert d["--job-name"] == "llava7b"
    assert d["--signal"] == "USR1@90"
    assert "--requeue" in d and d["--open-mode"] == "append"
    assert d["--output"] == f"{tmp_path}/logs/%x-%j.out" and d["--error"] == f"{tmp_path}/logs/%x-%j.err"
    assert d["--chdir"] == str(tmp_path)
    cmd = _srun(script)
    fit = cmd.index("fit")
    assert cmd[fit - 1] == "mmscene" and "--kill-on-bad-exit=1" in cmd[:fit]
    args = cmd[fit + 1 :]
    assert args[:2] == ["--config", "configs/interleave-7b.yaml"]
    pairs = _options(args[2:])
    assert pairs["--trainer.num_nodes"] == "4" and pairs["--trainer.devices"] == "8"
    assert pairs["--trainer.max_steps"] == "5000" and pairs["--model.activation_checkpointing"] == "true"
    assert "--trainer.accelerator" not in args
    assert pairs["--trainer.callbacks+"] == CALLBACK
    # every directive precedes the first command: sbatch stops reading them there
    first_command = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))


def test_cpu_script_and_options(tmp_path):
    script = SlurmJob(config="c.yaml", nodes=1, gpus_per_node=2, cpu=True, chdir=str(tmp_path)).render()
    d = _directives(script)
    assert d["--ntasks-per-node"] == "2" and "--gres" not in d
    assert "--partition" not in d and "--time" not in d and "--account" not in d and "--mem" not in d
    args = _srun(script)
    assert args[args.index("--trainer.accelerator") + 1] == "cpu"

    usr2 = SlurmJob(config="c.yaml", gpus_per_node=8, requeue_signal="SIGUSR2", signal_seconds=300).render()
    assert _directives(usr2)["--signal"] == "USR2@300"
    args = _srun(usr2)
    assert args[args.index("--trainer.plugins.requeue_signal") + 1] == "SIGUSR2"

    plain = SlurmJob(
        config="c.yaml", safe_requeue=False, launcher=f"{sys.executable} -m mmscene.cli"
    ).render()
    args = _srun(plain)
    assert not any(CALLBACK in a for a in args)
    assert args[args.index("fit") - 3 :][:3] == [sys.executable, "-m", "mmscene.cli"]

    with pytest.raises(ValueError, match="Lightning does not treat"):
        SlurmJob(config="c.yaml", job_name="bash")
    with pytest.raises(ValueError, match="--time"):
        SlurmJob(config="c.yaml", time="90 minutes")
    with pytest.raises(ValueError, match=">= 1"):
        SlurmJob(config="c.yaml", nodes=0)


def test_fsdp2_runs_shard_over_every_rank(tmp_path):
    # ModelParallelStrategy's "auto" data-parallel size is the node count: 4 x 8 GPUs would fail
    fsdp = tmp_path / "fsdp.yaml"
    strategy = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}
    fsdp.write_text(yaml.safe_dump({"trainer": {"strategy": strategy}}))
    pairs = _options(_srun(SlurmJob(config=str(fsdp), nodes=4, gpus_per_node=8).render())[3:])
    assert pairs["--trainer.strategy.data_parallel_size"] == "32"
    assert pairs["--trainer.strategy.tensor_parallel_size"] == "1"
    extra = ["--trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy"]
    ddp = tmp_path / "ddp.yaml"
    ddp.write_text(yaml.safe_dump({"trainer": {"strategy": "ddp"}}))
    args = _srun(SlurmJob(config=str(ddp), nodes=2, gpus_per_node=8, extra=extra).render())
    assert args[-4:] == [
        "--trainer.strategy.data_parallel_size",
        "16",
        "--trainer.strategy.tensor_parallel_size",
        "1",
    ]
    assert "--trainer.strategy.data_parallel_size" not in _srun(SlurmJob(config=str(ddp)).render())


def test_cli_prints_script_and_makes_log_dir(tmp_path, capsys):
    config = tmp_path / "x.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"max_steps": 10}}))
    rc = cli_main(
        ["slurm", "--nodes", "2", "--gpus-per-node", "4", "--config", str(config), "--chdir", str(tmp_path)]
        + [
            "--output",
            "logs",
            "--partition",
            "p",
            "--extra",
            "--trainer.max_steps 7",
            "--write",
            str(tmp_path / "j.sh"),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert (tmp_path / "logs").is_dir()  # SLURM opens the log files before the script runs
    assert (tmp_path / "j.sh").read_text() == captured.out
    d = _directives(captured.out)
    assert d["--nodes"] == "2" and d["--ntasks-per-node"] == "4" and d["--partition"] == "p"
    assert "default_root_dir is not set" in captured.err  # hpc checkpoints would land in the job's cwd


def test_requeue_callback_saves_at_a_step_boundary(tmp_path, fake_slurm):
    """The callback, without SLURM daemons: a fake ``scontrol`` records the requeue."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    calls = fake_slurm

    class SignalledAtStep3(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if self.global_step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-step, as SLURM's would
            return out

    callback = SlurmRequeue()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=50,
        default_root_dir=tmp_path,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = signal.getsignal(signal.SIGUSR1)
    trainer.fit(SignalledAtStep3())
    ckpt = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 4  # the step in flight finished, then the save
    assert calls.read_text().split() == ["requeue", "4242"]
    assert trainer.global_step == 4  # stopped once SLURM took the requeue
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored


# ---------------------------------------------------------------- a real SLURM cluster of one node
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun")


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env

    def run(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))


def _slurm_conf(root: Path, munge_socket: Path) -> str:
    cpus = os.cpu_count() or 1
    return f"""\
ClusterName=mmscenetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# look at pending jobs every 2 s, not 60: a requeued job restarts as soon as it may
SchedulerParameters=sched_interval=2
ReturnToService=2
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        pytest.skip(
            f"slurm daemons are not installed: {', '.join(missing)} not found "
            "(apt-get install slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        pytest.skip("slurm daemons are installed but need root to start munged/slurmd here")
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        pytest.skip(f"slurm daemons are installed but munge has no key at {key}")
    # In /tmp, not pytest's 0700 tmp dir: munged runs as user `munge` and must reach its socket.
    root = Path(tempfile.mkdtemp(prefix="mmscene-slurm-"))
    root.chmod(0o755)
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)
    shutil.chown(munge_dir, "munge", "munge")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    munge_socket = munge_dir / "munge.sock"
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, munge_socket))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not an outer job's
    env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs: list[subprocess.Popen] = []
    cluster = Cluster(root, env)

    def start(cmd: list[str], log: str, **kwargs) -> subprocess.Popen:
        out = open(root / log, "w")  # noqa: SIM115 - kept open for the daemon's life
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, **kwargs)
        procs.append(proc)
        return proc

    def logs() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("*.log")) if p.is_file()
        )

    try:
        munged = [_which("munged"), "-F", f"--socket={munge_socket}", f"--pid-file={munge_dir}/munged.pid"]
        munged += [f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/seed"]
        start(munged, "munged.out", user="munge", group="munge", extra_groups=[])
        _wait(lambda: munge_socket.exists(), 20, "munged did not open its socket", logs)
        start([_which("slurmctld"), "-D", "-f", str(conf)], "slurmctld.out")
        _wait(
            lambda: cluster.run("scontrol", "ping", check=False).count("UP") > 0,
            30,
            "slurmctld is not up",
            logs,
        )
        start([_which("slurmd"), "-D", "-f", str(conf), "-N", "localhost"], "slurmd.out")

        def idle() -> bool:
            return cluster.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False).strip() == "idle"

        _wait(idle, 60, "the node never became idle", logs)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", "--user", "root", check=False)
            _wait(lambda: not cluster.run("squeue", "-h", check=False).strip(), 30, "jobs linger", logs)
        for proc in reversed(procs):  # slurmd, slurmctld, then munged: only what this fixture started
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait(ready, timeout: float, what: str, logs=lambda: "", every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(every)
    raise AssertionError(f"{what} within {timeout:.0f} s\n{logs()}")


def _metrics(path: Path) -> list[dict[str, str]]:
    """The CSV rows that carry a step (the loss and the telemetry are separate rows of one step)."""
    if not path.is_file():
        return []
    with open(path) as f:
        return [row for row in csv.DictReader(f) if row.get("step")]


def _tiny_config(tmp: Path, max_steps: int, strategy: str) -> Path:
    from mmscene.data.tools.demo import make_demo

    data = tmp / "data"
    make_demo(data, n_train_per_scenario=16, n_val_per_scenario=4, progress=False)
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    d = cfg["data"]
    d["tokenizer"] = str(data / "tokenizer")
    for source in d["train"]:
        source["shards"] = str(data / "train" / source["scenario"])
    d.pop("val", None)
    d.update(batch_size=4, num_workers=1)  # one worker: SLURM signals it too, and it must not act on it
    run = tmp / "run"
    cfg["trainer"].update(
        max_steps=max_steps,
        limit_val_batches=0,
        val_check_interval=None,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run),
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run), "name": "log", "flush_logs_every_n_steps": 1},
        },
        # the last step's checkpoint, to read the final global step and data position back
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(tmp / "final"),
                    "every_n_train_steps": max_steps,
                    "save_top_k": -1,
                },
            }
        ],
    )
    if strategy == "fsdp2":  # data_parallel_size comes from the generated script
        cfg["trainer"]["strategy"] = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _load(path: Path) -> dict:
    """A Lightning checkpoint's non-tensor state: a file (DDP) or a distributed folder's meta.pt (FSDP2)."""
    return torch.load(path / "meta.pt" if path.is_dir() else path, weights_only=False, map_location="cpu")


@pytest.mark.slurm
@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        pytest.param(
            "fsdp2",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    os.environ.get("MMSCENE_SLOW") != "1",
                    reason="FSDP2 requeue run (~2 min): set MMSCENE_SLOW=1",
                ),
            ],
        ),
    ],
)
def test_sigusr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, strategy):
    cluster = slurm_cluster
    max_steps = 40
    config = _tiny_config(tmp_path, max_steps, strategy)
    logs = tmp_path / "logs"
    script = tmp_path / "job.sh"
    subprocess.run(
        [sys.executable, "-m", "mmscene.cli", "slurm", "--cpu", "--nodes", "1", "--gpus-per-node", "2"]
        + ["--config", str(config), "--job-name", "mmscene-requeue", "--output", str(logs)]
        + ["--launcher", f"{sys.executable} -m mmscene.cli", "--chdir", str(REPO), "--write", str(script)],
        check=True,
        capture_output=True,
        env=cluster.env,
    )
    t0 = time.monotonic()
    job_id = cluster.run("sbatch", "--parsable", str(script)).strip().split(";")[0]
    out, err = logs / f"mmscene-requeue-{job_id}.out", logs / f"mmscene-requeue-{job_id}.err"
    run = tmp_path / "run"

    def job_logs() -> str:
        text = [f"job: {cluster.job(job_id)}"]
        text += [f"--- {p.name}\n{p.read_text()[-6000:]}" for p in (out, err) if p.is_file()]
        return "\n".join(text)

    first = run / "log" / "version_0" / "metrics.csv"
    _wait(
        lambda: len({r["step"] for r in _metrics(first)}) >= 5,
        120,
        "the first run logged no training steps",
        job_logs,
        every=1,
    )
    t_signal = time.monotonic()
    cluster.run("scancel", "--signal=USR1", job_id)  # what `--signal=USR1@90` does before the time limit

    def finished() -> bool:
        state = cluster.job(job_id).get("JobState")
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job ended {state}\n{job_logs()}")
        return state == "COMPLETED"

    _wait(finished, 150, "the requeued job did not complete", job_logs, every=1)
    t_end = time.monotonic()
    print(
        f"\nslurm requeue test ({strategy}): signal after {t_signal - t0:.0f} s, completed {t_end - t_signal:.0f} s later"
    )

    # an hpc checkpoint was written mid-run, with every rank's data-stream position
    hpc = run / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() if strategy == "ddp" else (hpc / ".metadata").is_file(), job_logs()
    assert not (run / "hpc_ckpt_2.ckpt").exists()
    saved = _load(hpc)
    step = saved["global_step"]
    assert 5 <= step < max_steps
    ranks = saved["MMSceneDataModule"]["ranks"]
    assert [r["consumed"] for r in ranks] == [step, step]  # both ranks, one batch per step each

    # the job was requeued: SLURM counts a restart and the log (opened in append mode) shows two starts
    info = cluster.job(job_id)
    assert info["Restarts"] == "1" and info["JobState"] == "COMPLETED", info
    starts = re.findall(r"mmscene: job (\d+) start \S+ restart=(\d+)", out.read_text())
    assert starts == [(job_id, "0"), (job_id, "1")], out.read_text()
    errors = err.read_text()
    assert f"Restored all states from the checkpoint at {hpc}" in errors

    # the second run went on from the saved step, not from 0, and stopped at max_steps
    before = _metrics(first)
    after = _metrics(run / "log" / "version_1" / "metrics.csv")
    assert after, job_logs()
    assert int(before[-1]["step"]) < step + 1
    assert int(after[0]["step"]) == step
    assert int(after[-1]["step"]) == max_steps - 1  # CSV steps count from 0
    final = _load(tmp_path / "final" / f"epoch=0-step={max_steps}.ckpt")
    assert final["global_step"] == max_steps
    assert [r["consumed"] for r in final["MMSceneDataModule"]["ranks"]] == [max_steps, max_steps]

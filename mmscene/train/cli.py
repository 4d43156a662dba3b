"""``mmscene fit|validate|test|predict``: LightningCLI over the module and data module."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from mmscene.train.datamodule import MMSceneDataModule
from mmscene.train.module import MMSceneModule
from mmscene.train.trainer import MMSceneTrainer


class MMSceneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.check_val_every_n_epoch": None})


def build_cli(args: list[str] | None = None) -> MMSceneCLI:
    """Run a LightningCLI verb; ``args=None`` reads the command line."""
    return MMSceneCLI(
        MMSceneModule,
        MMSceneDataModule,
        trainer_class=MMSceneTrainer,  # atomic checkpoints, resume from the newest complete one
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        subclass_mode_model=False,
        subclass_mode_data=False,
    )


def lightning_main(args: list[str] | None = None) -> None:
    try:
        build_cli(args)
    finally:
        release_process_group()


def release_process_group() -> None:
    """Destroy the default process group once the run is over.

    Left to interpreter shutdown, gloo's worker threads can be torn down mid-destruction and the
    process aborts ("terminate called without an active exception") after a finished run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

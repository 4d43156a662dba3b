"""The ``mmscene`` command: Lightning verbs plus data, export, plugin and cluster tools."""

from __future__ import annotations

import argparse
import logging
import sys

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmscene",
        description="Train and evaluate LLaVA-NeXT-Interleave-style models. "
        "Training verbs: mmscene fit|validate|test|predict --config X.yaml (see --help of each).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="convert, generate and inspect shards").add_subparsers(
        dest="data_command", required=True
    )
    from mmscene.data.ingest.convert import add_convert_arguments

    add_convert_arguments(
        data.add_parser("convert", help="LLaVA / M4-Instruct annotations -> WebDataset shards")
    )
    from mmscene.data.tools.pretokenize import add_tokenize_arguments

    add_tokenize_arguments(
        data.add_parser("tokenize", help="store shards' token ids beside their media (pre-tokenized form)")
    )
    from mmscene.data.tools.demo import add_demo_arguments

    add_demo_arguments(data.add_parser("demo", help="synthetic four-scenario dataset for configs/demo.yaml"))
    from mmscene.data.tools.inspect import add_inspect_arguments

    add_inspect_arguments(data.add_parser("inspect", help="show samples of a shard or folder"))

    export = sub.add_parser("export", help="export a training checkpoint").add_subparsers(
        dest="format", required=True
    )
    from mmscene.export import add_export_arguments

    add_export_arguments(export.add_parser("hf", help="transformers LlavaForConditionalGeneration directory"))
    add_export_arguments(export.add_parser("mmscene", help="mmscene's own checkpoint directory"))

    from mmscene.eval.cli import add_eval_arguments

    add_eval_arguments(sub.add_parser("eval", help="lmms-eval tasks on a checkpoint (needs mmscene[eval])"))
    sub.add_parser("plugins", help="list installed scenario plugins")
    from mmscene.launch.slurm import add_slurm_arguments

    add_slurm_arguments(sub.add_parser("slurm", help="print an sbatch script for multi-node `mmscene fit`"))
    from mmscene.launch.plan_cli import add_plan_arguments

    add_plan_arguments(
        sub.add_parser("plan", help="parameters, FSDP2 memory per GPU and activations before launching")
    )
    return parser


def _plugins_main() -> int:
    from mmscene.registry import available, scenario_class

    for name, ep in available().items():
        try:
            cls = scenario_class(name)
            desc = cls.description or (cls.__doc__ or "").strip().splitlines()[0]
        except Exception as err:  # noqa: BLE001 - a broken plugin is reported, not fatal to the listing
            desc = f"(failed to load: {err})"
        dist = ep.dist.name if getattr(ep, "dist", None) else "?"
        print(f"{name:<16} {ep.value:<48} [{dist}]  {desc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    logger = logging.getLogger("mmscene")
    if not any(getattr(h, "_mmscene_cli", False) for h in logger.handlers):  # once per process
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._mmscene_cli = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    if argv and argv[0] in LIGHTNING_VERBS:
        from mmscene.train.cli import lightning_main

        lightning_main(None if from_command_line else argv)
        return 0
    args = _parser().parse_args(argv)
    if args.command == "data":
        if args.data_command == "convert":
            from mmscene.data.ingest.convert import convert_main

            code = convert_main(args)
            if code == 0 and (args.tokenizer or args.config):
                from mmscene.data.tools.pretokenize import tokenize_conversion

                return tokenize_conversion(args.out, args.config, args.tokenizer, args.workers, args.progress)
            return code
        if args.data_command == "tokenize":
            from mmscene.data.tools.pretokenize import tokenize_main

            return tokenize_main(args)
        if args.data_command == "demo":
            from mmscene.data.tools.demo import demo_main

            return demo_main(args)
        from mmscene.data.tools.inspect import inspect_main

        return inspect_main(args)
    if args.command == "export":
        from mmscene.export import export_main

        return export_main(args, "llava-hf" if args.format == "hf" else "mmscene")
    if args.command == "eval":
        from mmscene.eval.cli import eval_main

        return eval_main(args)
    if args.command == "plugins":
        return _plugins_main()
    if args.command == "slurm":
        from mmscene.launch.slurm import slurm_main

        return slurm_main(args)
    if args.command == "plan":
        from mmscene.launch.plan_cli import plan_main

        return plan_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())

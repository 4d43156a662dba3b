"""``mmscene export hf``: a training checkpoint becomes a directory transformers loads as Llava."""

from train_helpers import export_hf_and_compare, tiny_config, write_config
from transformers import AutoProcessor

from mmscene.data.demo import make_demo
from mmscene.train.cli import build_cli


def test_export_training_checkpoint_to_llava_hf(tmp_path):
    data = tmp_path / "demo"
    make_demo(data, n_train_per_scenario=4, n_val_per_scenario=2, progress=False)
    cfg = tiny_config(data, tmp_path / "run", max_steps=2)
    cfg["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ck"), "save_last": True},
        }
    ]
    build_cli(["fit", "--config", str(write_config(cfg, tmp_path / "c.yaml"))])
    ckpt = tmp_path / "ck" / "last.ckpt"

    hf = export_hf_and_compare(ckpt, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == hf.config.image_token_index

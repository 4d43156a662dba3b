"""Core behaviour: loss masking, clear errors on bad inputs, real-size configs, frame pooling."""

import json

import pytest
import torch
from helpers import IMAGE_TOKEN, interleaved_input, tiny_llava
from safetensors.torch import load_file, save_file

from mmscene import CheckpointError, MultimodalConfig, MultimodalLM
from mmscene.model import compose, load_pretrained, save_pretrained
from mmscene.model.config import hf_config_dict


def tiny_model(**kw) -> MultimodalLM:
    hf = tiny_llava()
    cfg = MultimodalConfig(
        vision=hf_config_dict(hf.config.vision_config),
        text=hf_config_dict(hf.config.text_config),
        image_token_id=IMAGE_TOKEN,
        **kw,
    )
    return MultimodalLM(cfg).eval()


def test_loss_only_where_labels_are_set_and_never_on_images():
    model = tiny_model()
    input_ids, pixel_values = interleaved_input()
    labels = input_ids.clone()  # a careless caller labels everything, image positions included
    out = model(input_ids, pixel_values, labels=labels)
    logits = out.logits[0, :-1]
    target = labels[0, 1:].clone()
    target[input_ids[0, 1:] == IMAGE_TOKEN] = -100
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)

    # Masking a span removes exactly its tokens from the mean.
    labels2 = labels.clone()
    labels2[0, :8] = -100
    target2 = target.clone()
    target2[:7] = -100
    expected2 = torch.nn.functional.cross_entropy(logits, target2, ignore_index=-100)
    torch.testing.assert_close(model(input_ids, pixel_values, labels=labels2).loss, expected2)


def test_image_count_mismatch_is_a_clear_error():
    model = tiny_model()
    input_ids, pixel_values = interleaved_input(n_images=2)
    with pytest.raises(ValueError, match=r"8 image positions .* 3 images give 12 feature vectors"):
        model(input_ids, torch.cat([pixel_values, pixel_values[:1]]))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids, None)


def test_pixel_size_mismatch_is_a_clear_error():
    model = tiny_model()
    input_ids, _ = interleaved_input()
    with pytest.raises(ValueError, match="32x32 but the vision tower takes 28x28"):
        model(input_ids, torch.randn(2, 3, 32, 32))


def test_frame_pooling_reduces_positions():
    model = tiny_model(frame_pool_stride=2)
    assert model.tokens_per_image() == 4 and model.tokens_per_image(pooled=True) == 1
    # one full image (4 positions) and one pooled frame (1 position)
    ids = torch.tensor([[1, 2] + [IMAGE_TOKEN] * 4 + [3] + [IMAGE_TOKEN] + [4, 5]])
    pix = torch.randn(2, 3, 28, 28)
    out = model(ids, pix, image_pooling=torch.tensor([False, True]))
    assert out.logits.shape[:2] == ids.shape
    # The pooled position holds the mean of the frame's projected patch features.
    feats = model.encode_images(pix[1:])
    pooled = model.encode_images(pix[1:], torch.tensor([True]))
    torch.testing.assert_close(pooled[0], feats.mean(0), atol=1e-6, rtol=1e-5)


def test_unknown_layout_and_missing_weights(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]})
    )
    with pytest.raises(CheckpointError, match="unknown checkpoint layout: model_type='bert'"):
        load_pretrained(tmp_path / "bert")

    hf = tiny_llava()
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(weights))
    victim = next(k for k in state if "multi_modal_projector.linear_2.weight" in k)
    del state[victim]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing weights: \['projector.linear_2.weight'\]"):
        load_pretrained(tmp_path / "hf")

    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


def _vision_params(c) -> int:
    h, i, p = c["hidden_size"], c["intermediate_size"], c["patch_size"]
    n_pos = (c["image_size"] // p) ** 2
    layer = 2 * 2 * h + 4 * (h * h + h) + (h * i + i) + (i * h + h)
    return 3 * p * p * h + h + n_pos * h + c["num_hidden_layers"] * layer + 2 * h


def _qwen_params(c) -> int:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    return v * h + c["num_hidden_layers"] * layer + h + (0 if c["tie_word_embeddings"] else v * h)


@pytest.mark.parametrize(
    "text, llm_params",
    [("qwen1.5-0.5b-chat", 463_987_712), ("qwen1.5-7b-chat", 7_721_324_544)],
)
def test_real_size_configs_on_meta(text, llm_params):
    config = MultimodalConfig(text=text)
    with torch.device("meta"):
        model = MultimodalLM(config)
    counts = model.num_parameters()
    h = config.text["hidden_size"]
    assert counts["language_model"] == _qwen_params(config.text) == llm_params  # Qwen1.5's published sizes
    assert counts["vision_tower"] == _vision_params(config.vision) == 397_747_744  # SigLIP so400m, 26 layers
    assert counts["projector"] == 1152 * h + h + h * h + h
    assert model.tokens_per_image() == 729
    assert len(model.vision_tower.encoder.layers) == 26


def test_stage_composition_drops_last_vision_layer(tmp_path):
    from helpers import tiny_text_config, tiny_vision_config
    from transformers import Qwen2ForCausalLM, SiglipVisionModel

    full_tower = SiglipVisionModel(tiny_vision_config(num_hidden_layers=3)).eval()
    full_tower.save_pretrained(tmp_path / "siglip")
    Qwen2ForCausalLM(tiny_text_config()).save_pretrained(tmp_path / "qwen")
    model = compose(tmp_path / "siglip", tmp_path / "qwen", image_token_id=IMAGE_TOKEN).eval()
    assert len(model.vision_tower.encoder.layers) == 2
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = model.projector(full_tower(pixels, output_hidden_states=True).hidden_states[-2])
        torch.testing.assert_close(model.encode_images(pixels), expected[0])
    # The composed model saves and reloads in its own format with the shortened tower.
    save_pretrained(model, tmp_path / "stage")
    again = load_pretrained(tmp_path / "stage")
    assert again.config.vision_config.num_hidden_layers == 2

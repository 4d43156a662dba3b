"""The core must agree with transformers' Llava to float precision, in both checkpoint layouts."""

import json

import pytest
import torch
from helpers import IMAGE_TOKEN, interleaved_input, tiny_llava
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from mmscene.model import load_pretrained, save_pretrained


def _logits_ref(hf, input_ids, pixel_values):
    with torch.no_grad():
        return hf(input_ids=input_ids, pixel_values=pixel_values).logits


def _logits(model, input_ids, pixel_values):
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values).logits


@pytest.mark.parametrize("tie", [False, True])
def test_llava_hf_roundtrip_parity(tmp_path, tie):
    hf = tiny_llava(tie=tie)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf").eval()
    input_ids, pixel_values = interleaved_input()
    ref = _logits_ref(hf, input_ids, pixel_values)
    ours = _logits(model, input_ids, pixel_values)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)

    # Greedy generation: identical tokens (transformers returns prompt + new tokens).
    ref_tokens = hf.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False
    )
    our_tokens = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False
    )
    assert our_tokens.tolist() == ref_tokens[:, input_ids.shape[1] :].tolist()

    # Export back and reload in transformers: same logits again.
    save_pretrained(model, tmp_path / "export", format="llava-hf")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(_logits_ref(again, input_ids, pixel_values), ref, atol=1e-5, rtol=0)


def _write_llava_qwen(hf: LlavaForConditionalGeneration, folder, vision_dir):
    """The original LLaVA-NeXT layout, written from a transformers model's weights."""
    folder.mkdir()
    state = {}
    for key, value in hf.state_dict().items():
        if key.startswith("model.vision_tower."):
            new = "model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower.") :]
        elif key.startswith("model.multi_modal_projector."):
            new = key.replace("model.multi_modal_projector.linear_1", "model.mm_projector.0").replace(
                "model.multi_modal_projector.linear_2", "model.mm_projector.2"
            )
        elif key.startswith("model.language_model."):
            new = "model." + key[len("model.language_model.") :]
        else:
            new = key
        state[new] = value.contiguous().clone()
    state["model.image_newline"] = torch.zeros(hf.config.text_config.hidden_size)
    save_file(state, str(folder / "model.safetensors"))
    text = hf.config.text_config.to_dict()
    config = {
        **{k: v for k, v in text.items() if not k.startswith("_")},
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "mm_vision_tower": str(vision_dir),
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": hf.config.vision_config.hidden_size,
        "mm_vision_select_layer": -1,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres",
        "image_token_index": IMAGE_TOKEN,
    }
    (folder / "config.json").write_text(json.dumps(config))


def test_llava_qwen_layout_parity(tmp_path):
    hf = tiny_llava()
    vision_dir = tmp_path / "siglip"
    vision_dir.mkdir()
    # The original tower is built from the SigLIP config and then loses its last layer.
    full = hf.config.vision_config.to_dict()
    full["num_hidden_layers"] += 1
    (vision_dir / "config.json").write_text(json.dumps(full))
    _write_llava_qwen(hf, tmp_path / "orig", vision_dir)

    model = load_pretrained(tmp_path / "orig").eval()
    assert model.config.vision_config.num_hidden_layers == hf.config.vision_config.num_hidden_layers
    input_ids, pixel_values = interleaved_input()
    torch.testing.assert_close(
        _logits(model, input_ids, pixel_values), _logits_ref(hf, input_ids, pixel_values), atol=1e-5, rtol=0
    )
    ref_tokens = hf.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False
    )
    our_tokens = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False
    )
    assert our_tokens.tolist() == ref_tokens[:, input_ids.shape[1] :].tolist()

    save_pretrained(model, tmp_path / "export", format="llava-hf")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(
        _logits_ref(again, input_ids, pixel_values),
        _logits_ref(hf, input_ids, pixel_values),
        atol=1e-5,
        rtol=0,
    )


def test_native_roundtrip(tmp_path):
    hf = tiny_llava()
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf").eval()
    save_pretrained(model, tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["format"] == "mmscene"
    again = load_pretrained(tmp_path / "native").eval()
    input_ids, pixel_values = interleaved_input()
    assert torch.equal(_logits(again, input_ids, pixel_values), _logits(model, input_ids, pixel_values))


def test_batched_generate_with_different_image_counts(tmp_path):
    """Left-padded batch with 2 and 1 images gives the same tokens as each sample alone."""
    hf = tiny_llava()
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf").eval()
    a_ids, a_pix = interleaved_input(n_images=2, seed=1)
    b_ids, b_pix = interleaved_input(n_images=1, seed=2)
    pad = a_ids.shape[1] - b_ids.shape[1]
    ids = torch.cat([a_ids, torch.cat([torch.zeros(1, pad, dtype=torch.long), b_ids], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batch = model.generate(
        ids, torch.cat([a_pix, b_pix]), attention_mask=mask, max_new_tokens=6, do_sample=False
    )
    alone_a = model.generate(a_ids, a_pix, max_new_tokens=6, do_sample=False)
    alone_b = model.generate(b_ids, b_pix, max_new_tokens=6, do_sample=False)
    assert batch[0].tolist() == alone_a[0].tolist()
    assert batch[1].tolist() == alone_b[0].tolist()
    # Sampling runs through the same cache path and respects the length limit.
    sampled = model.generate(
        ids, torch.cat([a_pix, b_pix]), attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20
    )
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 5

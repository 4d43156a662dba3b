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


def _write_llava_qwen(hf: LlavaForConditionalGeneration, folder, vision_dir, **anyres):
    """The original LLaVA-NeXT layout, written from a transformers model's weights (``anyres``:
    its patch-merge / aspect-ratio / pinpoint settings, default flat)."""
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
    state["model.image_newline"] = torch.randn(
        hf.config.text_config.hidden_size, generator=torch.Generator().manual_seed(3)
    )
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
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "image_token_index": IMAGE_TOKEN,
        **anyres,
    }
    (folder / "config.json").write_text(json.dumps(config))


def _original(tmp_path, **anyres):
    hf = tiny_llava()
    vision_dir = tmp_path / "siglip"
    vision_dir.mkdir()
    # The original tower is built from the SigLIP config and then loses its last layer.
    full = hf.config.vision_config.to_dict()
    full["num_hidden_layers"] += 1
    (vision_dir / "config.json").write_text(json.dumps(full))
    _write_llava_qwen(hf, tmp_path / "orig", vision_dir, **anyres)
    return hf


def test_llava_qwen_anyres_checkpoint_keeps_its_newline_and_round_trips_to_llava_next(tmp_path):
    """An original interleave checkpoint (anyres, spatial_unpad, image_newline) imports with its
    newline and pinpoints: single-crop images end with the newline as in LLaVA-NeXT's own
    code; exported, transformers' LlavaNext computes the same logits on an AnyRes image."""
    from transformers import LlavaNextForConditionalGeneration

    from mmscene.data.media import anyres

    pinpoints_wh = [[28, 56], [56, 28], [56, 56]]
    hf = _original(
        tmp_path,
        mm_patch_merge_type="spatial_unpad",
        image_aspect_ratio="anyres",
        image_grid_pinpoints=pinpoints_wh,
    )
    model = load_pretrained(tmp_path / "orig").eval()
    cfg = model.config
    assert cfg.patch_merge == "spatial_unpad" and cfg.image_grid_pinpoints == anyres.pinpoints_from_llava(
        pinpoints_wh
    )
    newline = torch.randn(hf.config.text_config.hidden_size, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.projector.image_newline.detach(), newline)

    # interleaved single-crop images: transformers' Llava features, each followed by the newline
    input_ids, pixel_values = interleaved_input(tokens_per_image=model.tokens_per_image())
    assert model.tokens_per_image() == 4 + 1
    with torch.no_grad():
        feats = hf.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="full"
        )
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat([torch.cat([f.reshape(-1, f.shape[-1]), newline[None]]) for f in feats])
        embeds = hf.get_input_embeddings()(input_ids.masked_fill(input_ids == IMAGE_TOKEN, 0))
        embeds = embeds.masked_scatter((input_ids == IMAGE_TOKEN)[..., None], feats)
        ref = hf.lm_head(hf.model.language_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(_logits(model, input_ids, pixel_values), ref, atol=1e-5, rtol=0)

    save_pretrained(model, tmp_path / "export", format="llava-hf")
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    size = (40, 70)  # height, width
    crops = anyres.num_crops(size, cfg.image_grid_pinpoints, 28)
    n = anyres.num_positions(size, cfg.image_grid_pinpoints, 28, 2)
    ids = torch.tensor([[5, 6] + [IMAGE_TOKEN] * n + [7, 8, 9]])
    pixels = torch.randn(crops, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = again(input_ids=ids, pixel_values=pixels[None], image_sizes=torch.tensor([size])).logits
        ours = model(ids, pixels, host={"image_sizes": [size]}).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_llava_qwen_layout_parity(tmp_path):
    hf = _original(tmp_path)

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

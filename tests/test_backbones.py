"""Backbone registry: one random-init model per source library, loaded by the same code as the real ones.

Block-k outputs are checked against each library's own account of its residual stream (open_clip: a manual pass
through `visual.transformer.resblocks`; transformers: `hidden_states`; timm: `forward_intermediates`), several layers
come from one pass that stops after the last block needed, and the cache key moves with the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from metalign.embed.backbones import (
    Preprocessing,
    _preprocessing_from,
    cache_key,
    find_blocks,
    hubs_offline,
    load_backbone,
    timm_preprocessing,
)

OPEN_CLIP_TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "patch_size": 8,
                                                  "head_width": 16},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory) -> str:
    """A tiny architecture registered with open_clip under its own name, exactly as its built-in configs are."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / "metalign-tiny-ViT.json").write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(folder)
    return "metalign-tiny-ViT"


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _count_calls(block: nn.Module) -> list[int]:
    calls: list[int] = []
    block.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_open_clip_block_cls_equals_manual_residual_stream(open_clip_tiny):
    torch.manual_seed(0)
    backbone = load_backbone({"name": "clip", "source": "open_clip", "id": open_clip_tiny, "layer": 2,
                              "pooling": "cls", "extra_layers": [0]})
    visual = backbone.module.visual
    last = _count_calls(visual.transformer.resblocks[3])
    post = _count_calls(visual.ln_post)
    x = images()
    with torch.no_grad():
        out = backbone.forward(x)
        ran_last, ran_head = len(last), len(post)
        # naive reference: embed, then the residual blocks one by one
        h = visual.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([visual.class_embedding.expand(len(x), 1, -1), h], dim=1) + visual.positional_embedding
        h = visual.ln_pre(h)
        stream = []
        for block in visual.transformer.resblocks:
            h = block(h)
            stream.append(h[:, 0])
    assert backbone.outputs == ["features", "layer_0"]
    torch.testing.assert_close(out["features"], stream[2])
    torch.testing.assert_close(out["layer_0"], stream[0])
    assert ran_last == ran_head == 0  # stopped after block 2: the last block and the head never ran
    assert backbone.preprocessing.size == 32 and backbone.preprocessing.mean[0] == pytest.approx(0.48145466)


def test_open_clip_embedding_and_extra_layer_in_one_pass(open_clip_tiny):
    torch.manual_seed(0)
    backbone = load_backbone({"name": "clip_embed", "source": "open_clip", "id": open_clip_tiny,
                              "pooling": "embedding", "extra_layers": [3]})
    calls = _count_calls(backbone.module.visual.transformer.resblocks[0])
    x = images()
    with torch.no_grad():
        out = backbone.forward(x)
        assert len(calls) == 1  # one pass gives both outputs
        torch.testing.assert_close(out["features"], backbone.module.encode_image(x))
    assert out["features"].shape == (3, 16) and out["layer_3"].shape == (3, 32)


def test_transformers_block_outputs_equal_hidden_states(tiny_vit):
    backbone = load_backbone({"name": "vit", "source": "transformers", "id": str(tiny_vit), "layer": 0,
                              "pooling": "mean_patches", "extra_layers": [0]})
    x = images()
    with torch.no_grad():
        out = backbone.forward(x)
        hidden = backbone.module(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out["features"], hidden[1][:, 1:].mean(dim=1))
    torch.testing.assert_close(out["layer_0"], hidden[1][:, 0])
    assert backbone.provenance["revision"].startswith("sha256:")


def test_timm_layers_final_pooled_and_checkpoint_through_timm_filter(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TIMM_TINY, "img_size": 64})
    weights = tmp_path / "model.pth"
    torch.save(source.state_dict(), weights)
    entry = {"name": "vit", "source": "timm", "id": "vit_tiny_patch16_224", "model_kwargs": TIMM_TINY,
             "checkpoint": {"path": str(weights), "timm_filter": True}, "pooling": "pooled", "extra_layers": [1]}
    backbone = load_backbone(entry)
    model = backbone.module
    torch.testing.assert_close(model.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    assert model.pos_embed.shape[1] == 1 + 16  # resampled from the 64-px checkpoint's 1 + 64 positions
    x = images()
    with torch.no_grad():
        out = backbone.forward(x)
        reference = model.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC",
                                                norm=False, return_prefix_tokens=True)[0]
        torch.testing.assert_close(out["features"], model(x))
    torch.testing.assert_close(out["layer_1"], reference[1][:, 0])
    # the weights' hash is in the provenance, so new weights give a new cache key
    key = cache_key(entry, backbone.provenance, "inputs")
    torch.save({k: v + 1 for k, v in source.state_dict().items()}, weights)
    changed = load_backbone(entry)
    assert changed.provenance["weights_sha256"] != backbone.provenance["weights_sha256"]
    assert cache_key(entry, changed.provenance, "inputs") != key


def test_random_init_timm_by_config_only():
    backbone = load_backbone({"name": "mae", "source": "timm", "id": "vit_tiny_patch16_224", "pretrained": False,
                              "model_kwargs": TIMM_TINY, "pooling": "mean_patches"})
    x = images()
    with torch.no_grad():
        out = backbone.forward(x)
        tokens = backbone.module.forward_features(x)
    torch.testing.assert_close(out["features"], tokens[:, 1:].mean(dim=1))
    assert backbone.preprocessing.size == 32


STUDY = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
STUDY_TIMM = {name: entry for name, entry in STUDY["backbones"].items() if entry["source"] == "timm"}


def test_study_config_has_the_timm_backbones_checked_below():
    assert {"dinov2", "vit_sup", "dinov3", "siglip2", "mae"} <= set(STUDY_TIMM)


@pytest.mark.parametrize("name", sorted(STUDY_TIMM))
def test_timm_preprocessing_equals_timms_own_eval_transform(name):
    """Every timm backbone of the study: our transform is timm's resolved one (floor(size / crop_pct): 248 px, not
    249, for 224 px at crop_pct 0.9), checked field by field and on images (docs/methods.md §1)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    entry = {"name": name, **STUDY_TIMM[name]}
    kwargs = entry.get("model_kwargs") or {}
    with torch.device("meta"):  # the pretrained cfg of the id, no weights
        model = timm.create_model(entry["id"], pretrained=False, **kwargs)
    ours = _preprocessing_from(entry, timm_preprocessing(model))
    # A recorded `img_size` (DINOv2 at 224 px) is the input size given to timm's resolver too.
    data_config = resolve_data_config({"input_size": (3, kwargs["img_size"], kwargs["img_size"])} if "img_size" in kwargs
                                      else {}, model=model)
    theirs = create_transform(**data_config)
    resize, crop, _, normalize = theirs.transforms
    assert (ours.size, ours.crop_pct, ours.crop_mode) == (data_config["input_size"][-1], data_config["crop_pct"],
                                                          data_config["crop_mode"])
    assert ours.resize_size == resize.size and resize.size == int(data_config["input_size"][-1] / data_config["crop_pct"])
    assert tuple(crop.size) == (ours.size, ours.size)
    assert ours.build().transforms[0].interpolation == resize.interpolation
    assert torch.equal(torch.tensor(ours.mean), normalize.mean) and torch.equal(torch.tensor(ours.std), normalize.std)
    rng = np.random.default_rng(0)
    for height, width in ((300, 217), (333, 517)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        assert torch.equal(ours.build()(image), theirs(image))


def test_resize_follows_timm_floor_and_torchvision_published_size():
    assert Preprocessing(size=224, crop_pct=0.9).resize_size == 248  # round() gave 249
    assert Preprocessing(size=256, crop_pct=0.9).resize_size == 284
    # torchvision's published resize (e.g. 232 → 224) survives; a configured size or crop_pct replaces it
    resolved = {"size": 224, "crop_pct": 224 / 232, "resize": 232}
    assert _preprocessing_from({"name": "tv"}, resolved).resize_size == 232
    assert _preprocessing_from({"name": "tv", "preprocessing": {"crop_pct": 0.875}}, resolved).resize_size == 256
    squash = Preprocessing(size=8, crop_mode="squash").build()
    assert squash(Image.new("RGB", (20, 10))).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="crop_mode 'border'"):
        Preprocessing(size=8, crop_mode="border")


def test_bad_entries_are_named(open_clip_tiny, tiny_vit):
    with pytest.raises(ValueError, match=r"'clip'.*needs layer: final"):
        load_backbone({"name": "clip", "source": "open_clip", "id": open_clip_tiny, "layer": 2, "pooling": "embedding"})
    with pytest.raises(ValueError, match=r"out of range: the model has blocks 0\.\.1"):
        load_backbone({"name": "vit", "source": "transformers", "id": str(tiny_vit), "layer": 5, "pooling": "cls"})
    with pytest.raises(ValueError, match="no block list"):
        find_blocks(nn.Linear(2, 2), "timm")
    with pytest.raises(FileNotFoundError, match="download rule"):
        load_backbone({"name": "x", "source": "timm", "id": "vit_tiny_patch16_224",
                       "checkpoint": {"path": "/nonexistent/model.safetensors", "timm_filter": True}})


def test_hubs_offline_is_scoped(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with hubs_offline():
        assert hub_constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not hub_constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ


def test_missing_weights_name_the_file_and_its_download_rule(tiny_vit, open_clip_tiny, tmp_path):
    missing = tmp_path / "resources" / "models" / "dinov2_vitb14" / "model.safetensors"
    entry = {"name": "dinov2", "source": "timm", "id": "vit_tiny_patch16_224", "model_kwargs": TIMM_TINY,
             "checkpoint": {"path": str(missing), "timm_filter": True},
             "requires": ["resources/downloads/dinov2_vitb14.json"]}
    with pytest.raises(FileNotFoundError, match=rf"'dinov2'.*{missing}.*`snakemake download_dinov2_vitb14`"):
        load_backbone(entry)
    clip = {"name": "clip", "source": "open_clip", "id": open_clip_tiny, "pretrained": str(tmp_path / "clip.bin"),
            "requires": ["resources/demo/downloads/clip-b32.v2.json"]}
    with pytest.raises(FileNotFoundError, match=r"clip\.bin does not exist; get it with `snakemake download_clip_b32"):
        load_backbone(clip)
    vit = {"name": "vit", "source": "transformers", "id": str(tmp_path / "models" / "vit_tiny"),
           "requires": ["resources/demo/models/vit_tiny/config.json"]}
    with pytest.raises(FileNotFoundError, match=r"vit_tiny does not exist; get it with `snakemake resources/demo/"):
        load_backbone(vit)


def test_hub_weights_while_offline_are_refused_unless_random_init():
    with hubs_offline():
        with pytest.raises(FileNotFoundError, match=r"'resnet'.*timm's pretrained weights for 'resnet18'.*offline.*"
                                                     r"download rule.*`pretrained: false` for random init"):
            load_backbone({"name": "resnet", "source": "timm", "id": "resnet18"})
        with pytest.raises(FileNotFoundError, match=r"torchvision's pretrained weights for 'resnet18'"):
            load_backbone({"name": "resnet", "source": "torchvision", "id": "resnet18"})
        random_init = load_backbone({"name": "resnet", "source": "torchvision", "id": "resnet18", "pretrained": False})
    assert random_init.preprocessing.size == 224 and random_init.preprocessing.crop_pct == pytest.approx(224 / 256)
    assert random_init.preprocessing.interpolation == "bilinear"


def test_layers_by_module_name_and_spatial_stages():
    torch.manual_seed(0)
    entry = {"name": "vit", "source": "timm", "id": "vit_tiny_patch16_224", "pretrained": False,
             "model_kwargs": TIMM_TINY, "pooling": "avg"}
    by_index = load_backbone(entry | {"layer": 1})
    by_name = load_backbone(entry | {"layer": "blocks.1"})
    by_name.module.load_state_dict(by_index.module.state_dict())
    head = _count_calls(by_name.module.norm)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(by_name.forward(x)["features"], by_index.forward(x)["features"])
        tokens = by_index.module.blocks[:2](by_index.module._pos_embed(by_index.module.patch_embed(x)))
    torch.testing.assert_close(by_index.forward(x)["features"], tokens.mean(dim=1))  # avg: every token, CLS included
    assert len(head) == 0  # the pass stopped once the named module had run

    convnext = load_backbone({"name": "cnx", "source": "timm", "id": "convnext_atto", "pretrained": False, "layer": 2,
                              "pooling": "max", "preprocessing": {"size": 32}})
    model = convnext.module
    with torch.no_grad():
        stage = model.stages[:3](model.stem(x))
        torch.testing.assert_close(convnext.forward(x)["features"], stage.amax(dim=(2, 3)))
    with pytest.raises(ValueError, match=r"'cnx'.*pooling 'cls' does not apply to a spatial \(B, C, H, W\) output"):
        load_backbone({"name": "cnx", "source": "timm", "id": "convnext_atto", "pretrained": False, "layer": 2,
                       "pooling": "cls", "preprocessing": {"size": 32}})
    with pytest.raises(ValueError, match=r"'cnx'.*has no module 'stages.9'"):
        load_backbone({"name": "cnx", "source": "timm", "id": "convnext_atto", "pretrained": False,
                       "layer": "stages.9", "pooling": "avg", "preprocessing": {"size": 32}})


def test_cache_key_sees_weights_content_not_their_location(tiny_vit, tmp_path):
    import shutil

    import timm

    keys = []
    for folder in ("checkout_a/resources/models", "elsewhere/venv/models"):
        weights = tmp_path / folder / "model.pth"
        weights.parent.mkdir(parents=True)
        torch.manual_seed(0)
        torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_TINY).state_dict(), weights)
        entry = {"name": "vit", "source": "timm", "id": "vit_tiny_patch16_224", "model_kwargs": TIMM_TINY,
                 "checkpoint": {"path": str(weights)}, "requires": [str(tmp_path / folder / "receipt.json")]}
        keys.append(cache_key(entry, load_backbone(entry).provenance, "inputs"))
    assert keys[0] == keys[1]
    moved = tmp_path / "moved" / "vit_tiny"
    shutil.copytree(tiny_vit, moved)
    vit = {"name": "vit", "source": "transformers", "id": str(tiny_vit), "layer": "final", "pooling": "cls"}
    assert cache_key(vit, load_backbone(vit).provenance, "inputs") == \
        cache_key(vit | {"id": str(moved)}, load_backbone(vit | {"id": str(moved)}).provenance, "inputs")

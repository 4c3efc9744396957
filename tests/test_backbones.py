"""Backbone registry: one random-init model per source library, loaded by the same code as the real ones.

Block-k outputs are checked against each library's own account of its residual stream (open_clip: a manual pass
through `visual.transformer.resblocks`; transformers: `hidden_states`; timm: `forward_intermediates`), several layers
come from one pass that stops after the last block needed, and the cache key moves with the weights.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from metalign.embed.backbones import cache_key, find_blocks, hubs_offline, load_backbone

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

"""Backbone sizes known before any job: a torch-free table of the study's models, plus the demo ViT from `demo.vit`.

Feature widths and block counts decide whether an SAE's `k`, a meta-learner's heads (with `hidden: null`) and a `layer`
fit, so `check` compares them before Snakemake deletes a job's outputs. A model missing here is not an error: its
checks are skipped and the job itself finds the fault. Values were read off `timm.create_model` (random init) and
`open_clip.get_model_config`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

DEMO_VIT = "models/vit_tiny"  # the demo_vit rule's output folder under `resources` (workflow/rules/demo.smk)
# As metalign.embed.backbones: each source's pooling when an entry names none.
DEFAULT_POOLING = {"transformers": "cls", "timm": "pooled", "open_clip": "embedding", "torchvision": "pooled"}
WIDTH_POOLINGS = ("cls", "mean_patches", "avg", "max")  # token poolings keeping the width (`flatten` multiplies it)
SHAPE_NEUTRAL_KWARGS = {"img_size"}  # model_kwargs that change the input resolution only, not widths or depth


@dataclass(frozen=True)
class Shape:
    """What the config's outputs of one model measure."""

    width: int | None          # residual stream: block outputs and token poolings (None: a CNN, each stage differs)
    depth: int                 # blocks in the list that `layer` and `extra_layers` index (metalign.embed.backbones)
    pooled: int | None = None  # `pooling: pooled`: timm's num_features, Hugging Face's pooler output
    embedding: int | None = None  # `pooling: embedding`: open_clip's projected image embedding


# (source, architecture): timm ids without their pretrained tag (`.lvd142m`), which changes weights, not shapes.
KNOWN: dict[tuple[str, str], Shape] = {
    ("timm", "vit_base_patch14_dinov2"): Shape(768, 12, pooled=768),
    ("timm", "vit_base_patch16_224"): Shape(768, 12, pooled=768),
    ("timm", "vit_base_patch16_dinov3"): Shape(768, 12, pooled=768),
    ("timm", "vit_base_patch16_siglip_256"): Shape(768, 12, pooled=768),  # attention-pool head keeps the width
    ("timm", "vit_large_patch16_224"): Shape(1024, 24, pooled=1024),
    ("timm", "efficientnet_lite0"): Shape(None, 7, pooled=1280),  # `blocks` = 7 stages (16…320 channels)
    ("open_clip", "ViT-B-32"): Shape(768, 12, embedding=512),
}


def is_demo_vit(config: Mapping[str, Any], name: str) -> bool:
    """Whether backbone `name` loads the ViT that the demo_vit rule builds from `demo.vit`."""
    entry = config["backbones"][name]
    return "demo" in config and entry["source"] == "transformers" and \
        os.path.normpath(entry["id"]) == os.path.normpath(os.path.join(config["resources"], DEMO_VIT))


def backbone_shape(config: Mapping[str, Any], name: str) -> Shape | None:
    """The shape of backbone `name`, or None when it is not known before the model is loaded."""
    entry = config["backbones"][name]
    if set(entry.get("model_kwargs") or {}) - SHAPE_NEUTRAL_KWARGS:
        return None
    if is_demo_vit(config, name):
        vit = config["demo"]["vit"]
        return Shape(vit["hidden_size"], vit["layers"], pooled=vit["hidden_size"])
    source, model_id = entry["source"], entry["id"]
    return KNOWN.get((source, model_id.split(".", 1)[0] if source == "timm" else model_id))


def output_dim(config: Mapping[str, Any], name: str, output: str = "features") -> int | None:
    """Feature dimension of backbone `name`'s `features` or `layer_<k>` output, or None when unknown (as for a module
    named as `layer`, whose output may be anything)."""
    shape, entry = backbone_shape(config, name), config["backbones"][name]
    if shape is None:
        return None
    if output != "features":
        return shape.width if entry.get("extra_pooling", "cls") in WIDTH_POOLINGS else None
    layer, pooling = entry.get("layer", "final"), entry.get("pooling") or DEFAULT_POOLING[entry["source"]]
    if layer == "final" and pooling in ("pooled", "embedding"):
        return shape.pooled if pooling == "pooled" else shape.embedding
    if layer != "final" and not isinstance(layer, int):
        return None
    return shape.width if pooling in WIDTH_POOLINGS else None

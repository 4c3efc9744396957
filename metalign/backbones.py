"""Backbone registry: one config entry (source library, id, revision, weights, layer, pooling) → a feature extractor.

Adding a model is a config entry. The same code path loads the real hub models and the demo's local ones:
`transformers` (`from_pretrained(<hub id or local dir>)`), `timm` (`create_model`, optionally with a checkpoint file,
e.g. one shipped inside a PyPI package) and `open_clip` (`create_model_and_transforms`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torchvision import transforms as T

from metalign.io import file_sha256

# Bump when the extraction logic changes in a way that changes numbers: it is part of every feature file's cache key.
EXTRACTION_CODE_VERSION = 1

_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """The resolved transform; it is written into every feature file because it changes the numbers."""

    size: int
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def build(self) -> Callable:
        resize = int(round(self.size / self.crop_pct))
        return T.Compose([
            T.Resize(resize, interpolation=_INTERPOLATION[self.interpolation]),
            T.CenterCrop(self.size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.size, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass
class Backbone:
    """A loaded model that maps a batch of preprocessed images to one (B, D) feature matrix."""

    name: str
    module: nn.Module
    preprocessing: Preprocessing
    forward: Callable[[torch.Tensor], torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device) -> "Backbone":
        self.module.to(device)
        return self


def _pool(tokens: torch.Tensor, pooling: str, prefix_tokens: int = 1) -> torch.Tensor:
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean_patches":
        return tokens[:, prefix_tokens:].mean(dim=1)
    raise ValueError(f"pooling {pooling!r} does not apply to token outputs; use cls or mean_patches")


def _preprocessing_from(entry: Mapping[str, Any], resolved: Mapping[str, Any]) -> Preprocessing:
    """Config values win over the model's own pretrained configuration (recorded either way)."""
    merged = {**resolved, **(entry.get("preprocessing") or {})}
    if "size" not in merged:
        raise ValueError(f"backbone {entry.get('name')!r}: preprocessing.size is not in the config and the model has none")
    return Preprocessing(size=int(merged["size"]), crop_pct=float(merged.get("crop_pct", 1.0)),
                         interpolation=merged.get("interpolation", "bicubic"),
                         mean=tuple(merged.get("mean", Preprocessing.mean)), std=tuple(merged.get("std", Preprocessing.std)))


def _checkpoint_file(spec: Mapping[str, Any]) -> Path:
    """A checkpoint given as a plain path, or as a file inside an installed package (the demo's real weights)."""
    if "package" in spec:
        return Path(str(importlib.resources.files(spec["package"]).joinpath(spec["path"])))
    return Path(spec["path"])


def _load_state_dict(model: nn.Module, spec: Mapping[str, Any]) -> dict[str, Any]:
    path = _checkpoint_file(spec)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if spec.get("remap") == "by_order":
        # Same architecture, other naming convention (e.g. lukemelas EfficientNet → timm): pair tensors in order and
        # refuse unless every shape matches, so a wrong pairing cannot load silently.
        own = model.state_dict()
        if len(own) != len(state):
            raise ValueError(f"{path}: {len(state)} tensors, model expects {len(own)}")
        for (theirs, tensor), (mine, target) in zip(state.items(), own.items()):
            if tensor.shape != target.shape:
                raise ValueError(f"{path}: tensor {theirs} {tuple(tensor.shape)} does not fit {mine} {tuple(target.shape)}")
        state = dict(zip(own.keys(), state.values()))
    model.load_state_dict(state, strict=spec.get("strict", True))
    return {"checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}


def _load_transformers(entry: Mapping[str, Any]) -> Backbone:
    import transformers

    model = transformers.AutoModel.from_pretrained(entry["id"], revision=entry.get("revision"))
    resolved: dict[str, Any] = {}
    config = model.config
    if getattr(config, "image_size", None):
        resolved["size"] = int(config.image_size)
    layer, pooling = entry.get("layer", "final"), entry.get("pooling", "cls")

    def forward(images: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=images, output_hidden_states=layer != "final")
        if pooling == "pooled":
            return out.pooler_output
        tokens = out.last_hidden_state if layer == "final" else out.hidden_states[int(layer) + 1]
        return _pool(tokens, pooling)

    weights = {"revision": entry.get("revision") or _local_weights_hash(entry["id"])}
    return Backbone(entry["name"], model, _preprocessing_from(entry, resolved), forward, weights)


def _local_weights_hash(model_id: str) -> str | None:
    """For a local model directory, the weights' hash stands in for the hub revision in the cache key."""
    folder = Path(model_id)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(file_sha256(path).encode())
    return "sha256:" + digest.hexdigest()


def _load_timm(entry: Mapping[str, Any]) -> Backbone:
    import timm

    checkpoint = entry.get("checkpoint")
    model = timm.create_model(entry["id"], pretrained=checkpoint is None and entry.get("pretrained", True),
                              **(entry.get("model_kwargs") or {}))
    provenance: dict[str, Any] = {"revision": entry.get("revision")}
    if checkpoint:
        provenance |= _load_state_dict(model, checkpoint)
    model.reset_classifier(0)
    data_config = timm.data.resolve_model_data_config(model)
    resolved = {"size": data_config["input_size"][-1], "crop_pct": data_config.get("crop_pct", 1.0),
                "interpolation": data_config.get("interpolation", "bicubic"),
                "mean": data_config["mean"], "std": data_config["std"]}
    layer, pooling = entry.get("layer", "final"), entry.get("pooling", "pooled")
    prefix = getattr(model, "num_prefix_tokens", 1)

    def forward(images: torch.Tensor) -> torch.Tensor:
        if layer == "final":
            return model(images) if pooling == "pooled" else _pool(model.forward_features(images), pooling, prefix)
        tokens = model.forward_intermediates(images, indices=[int(layer)], intermediates_only=True,
                                             output_fmt="NLC", norm=False, return_prefix_tokens=True)[0]
        patches, prefix_tokens = tokens
        return _pool(torch.cat([prefix_tokens, patches], dim=1), pooling, prefix)

    return Backbone(entry["name"], model, _preprocessing_from(entry, resolved), forward, provenance)


def _load_open_clip(entry: Mapping[str, Any]) -> Backbone:
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(entry["id"], pretrained=entry.get("pretrained"))
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    resolved = {"size": size, "crop_pct": 1.0, "interpolation": cfg.get("interpolation", "bicubic"),
                "mean": cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), "std": cfg.get("std", open_clip.OPENAI_DATASET_STD)}
    layer, pooling = entry.get("layer", "final"), entry.get("pooling", "embedding")
    captured: dict[str, torch.Tensor] = {}
    if layer != "final":
        # The residual stream after block k: a hook on that block's output (equals the model's own residual stream).
        visual.transformer.resblocks[int(layer)].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))

    def forward(images: torch.Tensor) -> torch.Tensor:
        if layer == "final":
            return model.encode_image(images)
        visual(images)
        return _pool(captured.pop("x"), pooling)

    return Backbone(entry["name"], model, _preprocessing_from(entry, resolved), forward, {"pretrained": entry.get("pretrained")})


_LOADERS: dict[str, Callable[[Mapping[str, Any]], Backbone]] = {
    "transformers": _load_transformers, "timm": _load_timm, "open_clip": _load_open_clip}


def load_backbone(entry: Mapping[str, Any]) -> Backbone:
    """Instantiate the backbone described by one registry entry, in eval mode without gradients."""
    source = entry.get("source")
    if source not in _LOADERS:
        raise ValueError(f"backbone {entry.get('name')!r}: unknown source {source!r}; known: {sorted(_LOADERS)}")
    backbone = _LOADERS[source](entry)
    backbone.module.eval().requires_grad_(False)
    backbone.provenance |= {"source": source, "model_id": entry["id"], "layer": str(entry.get("layer", "final")),
                            "pooling": entry.get("pooling"), "preprocessing": backbone.preprocessing.as_dict()}
    return backbone


def cache_key(entry: Mapping[str, Any], provenance: Mapping[str, Any], manifest_sha: str) -> str:
    """Weights, preprocessing, code version and inputs: change any of them and a feature file is stale (P-64)."""
    payload = json.dumps({"entry": dict(entry), "provenance": dict(provenance), "manifest": manifest_sha,
                          "code": EXTRACTION_CODE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()

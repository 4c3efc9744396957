"""Backbone registry: one config entry (source library, id, weights, layer(s), pooling) → a feature extractor.

Adding a model is a config entry. The same code path loads the real models and the tests' random-init ones:
`transformers` (`from_pretrained(<hub id or local dir>)`), `timm` (`create_model`, weights from a local checkpoint file,
e.g. one fetched by a download rule or shipped inside a PyPI package) and `open_clip` (`create_model_and_transforms`,
`pretrained` = a tag or a local file).

Outputs: `features` is the entry's `layer` (`final` = the model's own output, or the residual stream after block k,
0-based) pooled with `pooling`; every block in `extra_layers` adds `layer_<k>` (pooled with `extra_pooling`), captured
in the same forward pass by hooks on the blocks, which stops after the last block it needs when `layer` is not
`final` (docs/methods.md §2: CLIP blocks 6 and 11 from one pass). The hooked output of block k *is* the model's residual
stream: the hook sees exactly the tensor the next block receives.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torchvision import transforms as T

from metalign.io import file_sha256, library_versions

# Bump when the extraction logic changes in a way that changes numbers or outputs: part of every feature file's
# cache key. 2: outputs by block hooks, `extra_layers`, library versions in the key.
EXTRACTION_CODE_VERSION = 2

_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}
TOKEN_POOLINGS = ("cls", "mean_patches")

# Where each library keeps its transformer blocks; an entry's `blocks` (a dotted attribute path) overrides this.
_BLOCK_PATHS = {"timm": ("blocks", "stages"), "open_clip": ("visual.transformer.resblocks",),
                "transformers": ("layers", "encoder.layer", "encoder.layers", "vision_model.encoder.layers")}


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
    """A loaded model mapping a batch of preprocessed images to named (B, D_name) outputs, `features` first."""

    name: str
    module: nn.Module
    preprocessing: Preprocessing
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    outputs: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device) -> "Backbone":
        self.module.to(device)
        return self


class _StopForward(Exception):
    """Raised by the hook on the last needed block: the rest of the network is not run."""


@dataclass(frozen=True)
class _Spec:
    """The entry's output request, validated once."""

    layer: int | str
    pooling: str
    extra: tuple[int, ...]
    extra_pooling: str

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], default_pooling: str) -> "_Spec":
        layer = entry.get("layer", "final")
        layer = layer if layer == "final" else int(layer)
        spec = cls(layer, entry.get("pooling") or default_pooling, tuple(int(k) for k in entry.get("extra_layers", [])),
                   entry.get("extra_pooling", "cls"))
        name = entry.get("name")
        if layer != "final" and spec.pooling not in TOKEN_POOLINGS:
            raise ValueError(f"backbone {name!r}: pooling {spec.pooling!r} needs layer: final; a block output "
                             f"takes one of {TOKEN_POOLINGS}")
        if spec.extra and spec.extra_pooling not in TOKEN_POOLINGS:
            raise ValueError(f"backbone {name!r}: extra_pooling must be one of {TOKEN_POOLINGS}")
        return spec

    @property
    def blocks_needed(self) -> list[int]:
        return sorted(set(self.extra) | ({self.layer} if self.layer != "final" else set()))

    @property
    def outputs(self) -> list[str]:
        return ["features"] + [f"layer_{k}" for k in self.extra]


def _pool(tokens: torch.Tensor, pooling: str, prefix_tokens: int = 1) -> torch.Tensor:
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean_patches":
        return tokens[:, prefix_tokens:].mean(dim=1)
    raise ValueError(f"pooling {pooling!r} does not apply to token outputs; use one of {TOKEN_POOLINGS}")


def _attribute(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def find_blocks(model: nn.Module, source: str, override: str | None = None) -> nn.Sequential | nn.ModuleList:
    """The model's ordered transformer blocks (block k's output = residual stream after block k)."""
    for path in ([override] if override else _BLOCK_PATHS[source]):
        with contextlib.suppress(AttributeError):
            blocks = _attribute(model, path)
            if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
                return blocks
    raise ValueError(f"{type(model).__name__}: no block list at {override or _BLOCK_PATHS[source]}; "
                     f"set the entry's `blocks` to its attribute path")


def _blocks_if_needed(spec: _Spec, model: nn.Module, source: str, entry: Mapping[str, Any]) -> nn.Module:
    return find_blocks(model, source, entry.get("blocks")) if spec.blocks_needed else nn.ModuleList()


@contextlib.contextmanager
def _captured(blocks: nn.Module, layers: list[int], stop_after: int | None,
              to_nld: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of `layers` during one forward pass; raise _StopForward after block `stop_after`."""
    store: dict[int, torch.Tensor] = {}

    def hook_for(k: int) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            store[k] = to_nld(output[0] if isinstance(output, tuple) else output)
            if k == stop_after:
                raise _StopForward
        return hook

    handles = [blocks[k].register_forward_hook(hook_for(k)) for k in layers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _make_forward(spec: _Spec, blocks: nn.Module, final: Callable[[torch.Tensor], torch.Tensor],
                  trunk: Callable[[torch.Tensor], Any], prefix: int,
                  to_nld: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Callable:
    """`final` computes the entry's own final output; `trunk` is any call that runs the blocks in order."""
    needed = spec.blocks_needed
    n_blocks = len(blocks)
    bad = [k for k in needed if not 0 <= k < n_blocks]
    if bad:
        raise ValueError(f"block index {bad} out of range: the model has blocks 0..{n_blocks - 1}")
    stop = None if spec.layer == "final" or not needed else max(needed)

    def forward(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with _captured(blocks, needed, stop, to_nld) as store:
            try:
                main = final(images) if spec.layer == "final" else trunk(images)
            except _StopForward:
                main = None
        out = {"features": main if spec.layer == "final" else _pool(store[spec.layer], spec.pooling, prefix)}
        out |= {f"layer_{k}": _pool(store[k], spec.extra_pooling, prefix) for k in spec.extra}
        return out

    return forward


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
    path = Path(spec["path"])
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path} (is its download rule done?)")
    return path


def _load_state_dict(model: nn.Module, path: Path, spec: Mapping[str, Any]) -> None:
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


def _weights(path: Path) -> dict[str, Any]:
    """The weights file and its hash: the hash, not the name, is what the cache key must see (docs/methods.md P-64)."""
    return {"weights": str(path), "weights_sha256": file_sha256(path)}


def _load_transformers(entry: Mapping[str, Any]) -> Backbone:
    import transformers

    model = transformers.AutoModel.from_pretrained(entry["id"], revision=entry.get("revision"))
    config = model.config
    resolved: dict[str, Any] = {"size": int(config.image_size)} if getattr(config, "image_size", None) else {}
    spec = _Spec.from_entry(entry, "cls")
    prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)

    def final(images: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=images)
        return out.pooler_output if spec.pooling == "pooled" else _pool(out.last_hidden_state, spec.pooling, prefix)

    forward = _make_forward(spec, _blocks_if_needed(spec, model, "transformers", entry), final,
                            lambda images: model(pixel_values=images), prefix)
    provenance = {"revision": entry.get("revision") or _local_weights_hash(entry["id"])}
    return Backbone(entry["name"], model, _preprocessing_from(entry, resolved), forward, spec.outputs, provenance)


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
    kwargs = dict(entry.get("model_kwargs") or {})
    provenance: dict[str, Any] = {"revision": entry.get("revision")}
    if checkpoint and checkpoint.get("timm_filter"):
        # timm's own pretrained path on a local file: applies the model's checkpoint filter (key remaps,
        # position-embedding resampling when `img_size` differs from the checkpoint's).
        path = _checkpoint_file(checkpoint)
        model = timm.create_model(entry["id"], pretrained=True, pretrained_cfg_overlay={"file": str(path), "source": ""},
                                  **kwargs)
        provenance |= _weights(path)
    else:
        model = timm.create_model(entry["id"], pretrained=checkpoint is None and entry.get("pretrained", True), **kwargs)
        if checkpoint:
            path = _checkpoint_file(checkpoint)
            _load_state_dict(model, path, checkpoint)
            provenance |= _weights(path)
    model.reset_classifier(0)
    data_config = timm.data.resolve_model_data_config(model)
    # timm's data config describes the *pretrained* input size; with `model_kwargs: {img_size: …}` the instantiated
    # model takes another (DINOv2 at 224 px, not its 518), and feeding it the other size fails or misleads.
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = built[-1] if built and not getattr(model, "dynamic_img_size", False) else data_config["input_size"][-1]
    resolved = {"size": size, "crop_pct": data_config.get("crop_pct", 1.0),
                "interpolation": data_config.get("interpolation", "bicubic"),
                "mean": data_config["mean"], "std": data_config["std"]}
    spec = _Spec.from_entry(entry, "pooled")
    prefix = getattr(model, "num_prefix_tokens", 1)

    def final(images: torch.Tensor) -> torch.Tensor:
        return model(images) if spec.pooling == "pooled" else _pool(model.forward_features(images), spec.pooling, prefix)

    forward = _make_forward(spec, _blocks_if_needed(spec, model, "timm", entry), final, model.forward_features, prefix)
    return Backbone(entry["name"], model, _preprocessing_from(entry, resolved), forward, spec.outputs, provenance)


def _load_open_clip(entry: Mapping[str, Any]) -> Backbone:
    import open_clip

    pretrained = entry.get("pretrained")
    provenance: dict[str, Any] = {"pretrained": pretrained}
    if pretrained and ("/" in pretrained or os.sep in pretrained):  # a local weights file, not a tag
        path = _checkpoint_file({"path": pretrained})
        provenance |= _weights(path)
        pretrained = str(path)
    model, _, _ = open_clip.create_model_and_transforms(entry["id"], pretrained=pretrained)
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    resolved = {"size": size, "crop_pct": 1.0, "interpolation": cfg.get("interpolation", "bicubic"),
                "mean": cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), "std": cfg.get("std", open_clip.OPENAI_DATASET_STD)}
    spec = _Spec.from_entry(entry, "embedding")
    if spec.layer == "final" and spec.pooling != "embedding":
        raise ValueError(f"backbone {entry['name']!r}: open_clip's final output is the image embedding "
                         f"(pooling: embedding); a token pooling needs an integer layer")
    transformer = visual.transformer
    # Older open_clip keeps the residual stream as (L, N, D); outputs are always (N, L, D).
    to_nld = (lambda t: t) if getattr(transformer, "batch_first", True) else (lambda t: t.transpose(0, 1))
    forward = _make_forward(spec, _blocks_if_needed(spec, model, "open_clip", entry), model.encode_image, visual, 1,
                            to_nld)
    return Backbone(entry["name"], model, _preprocessing_from(entry, resolved), forward, spec.outputs, provenance)


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
                            "pooling": entry.get("pooling"), "extra_layers": list(entry.get("extra_layers", [])),
                            "outputs": backbone.outputs, "preprocessing": backbone.preprocessing.as_dict()}
    return backbone


@contextlib.contextmanager
def hubs_offline() -> Iterator[None]:
    """Compute jobs never download (docs/methods.md P-60): weights come from a download rule, so a missing file is an error."""
    import huggingface_hub.constants as hub_constants

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_constant = hub_constants.HF_HUB_OFFLINE
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_constant
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cache_key(entry: Mapping[str, Any], provenance: Mapping[str, Any], inputs_sha: str) -> str:
    """Weights (hash), preprocessing, code and library versions, inputs: change any and a feature file is stale (docs/methods.md P-64)."""
    payload = json.dumps({"entry": dict(entry), "provenance": dict(provenance), "inputs": inputs_sha,
                          "code": EXTRACTION_CODE_VERSION, "libraries": library_versions()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()

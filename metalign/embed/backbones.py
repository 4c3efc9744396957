"""Backbone registry: one config entry (source library, id, weights, layer(s), pooling) → a feature extractor.

Adding a model is a config entry. The same code path loads the real models and the tests' random-init ones:
`transformers` (`from_pretrained(<hub id or local dir>)`), `timm` (`create_model`, weights from a local checkpoint file,
e.g. one fetched by a download rule or shipped inside a PyPI package), `open_clip` (`create_model_and_transforms`,
`pretrained` = a tag or a local file) and `torchvision` (`torchvision.models.get_model`, weights from a local checkpoint
file; `pretrained: false` is random init, as for timm).

Outputs: `features` is the entry's `layer` (`final` = the model's own output; an integer k = the output of block k,
0-based; any other string = the output of that module, named as in `model.named_modules()`) pooled with `pooling`;
every block in `extra_layers` adds `layer_<k>` (pooled with `extra_pooling`), captured in the same forward pass by
hooks, which stops once every hooked module has run when `layer` is not `final` (docs/methods.md §2: CLIP blocks 6 and
11 from one pass). The hooked output of block k *is* the model's residual stream: the hook sees exactly the tensor the
next block receives. Outputs with positions are pooled to one vector per image: tokens (B, N, D) by `cls`,
`mean_patches`, `avg`, `max` or `flatten`, spatial maps (B, C, H, W) by `avg`, `max` or `flatten`. Loading runs one
image through the model, so an output that does not pool to (B, D) is an error before any file is written.

Weights never come from a hub in a compute job (docs/methods.md P-60): a missing local file, or hub weights while the
hubs are offline, is an error naming the file and the download rule that makes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torchvision import transforms as T

from metalign.io import file_sha256, library_versions

# Bump when the extraction logic changes in a way that changes numbers or outputs: part of every feature file's
# cache key and attributes. 2: outputs by block hooks, `extra_layers`, library versions in the key. 3: spatial outputs
# pooled, module-name layers, torchvision, weights in the key by content only (no file locations). 4: resize to
# floor(size / crop_pct) as timm's own transform (was round: 249 px instead of 248 for 224 px at crop_pct 0.9),
# timm's crop_mode, torchvision's published resize size.
EXTRACTION_CODE_VERSION = 4

_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}
CROP_MODES = ("center", "squash")  # timm's eval crop modes ("border", padding instead of cropping, is not supported)
SPATIAL_POOLINGS = ("avg", "max", "flatten")  # over all positions: H × W of a (B, C, H, W) map, or all N tokens
POSITION_POOLINGS = ("cls", "mean_patches", *SPATIAL_POOLINGS)  # what a block or module output may take

# Where each library keeps its blocks; an entry's `blocks` (a dotted attribute path) overrides this.
_BLOCK_PATHS = {"timm": ("blocks", "stages"), "open_clip": ("visual.transformer.resblocks",),
                "transformers": ("layers", "encoder.layer", "encoder.layers", "vision_model.encoder.layers"),
                "torchvision": ("features", "encoder.layers")}
# The download rule of a `requires` receipt <resources>/downloads/<item>.json (workflow/rules/download.smk).
_RECEIPT_FOLDER = "downloads"


@dataclass(frozen=True)
class Preprocessing:
    """The resolved transform; it is written into every feature file because it changes the numbers.

    The evaluation transform of timm (`transforms_imagenet_eval`): resize to `resize_size` = floor(size / crop_pct)
    (timm floors; rounding gives 249 px instead of 248 for 224 px at crop_pct 0.9), the shorter side (`crop_mode`
    center) or both sides (squash), then centre crop size × size. torchvision publishes its resize size, which
    `resize` carries so that no crop_pct round trip can move it by a pixel.
    """

    size: int
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_mode: str = "center"
    resize: int | None = None

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"preprocessing crop_mode {self.crop_mode!r} is not supported; known: {CROP_MODES}")

    @property
    def resize_size(self) -> int:
        return self.resize if self.resize is not None else math.floor(self.size / self.crop_pct)

    def build(self) -> Callable:
        side = self.resize_size
        return T.Compose([
            T.Resize(side if self.crop_mode == "center" else (side, side),
                     interpolation=_INTERPOLATION[self.interpolation]),
            T.CenterCrop(self.size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.size, "crop_pct": self.crop_pct, "resize_size": self.resize_size,
                "crop_mode": self.crop_mode, "interpolation": self.interpolation, "mean": list(self.mean),
                "std": list(self.std)}


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
    """Raised by a hook once every hooked module has run: the rest of the network is not run."""


@dataclass(frozen=True)
class _Spec:
    """The entry's output request, validated once."""

    layer: int | str  # "final", a block index or a module name
    pooling: str
    extra: tuple[int, ...]
    extra_pooling: str

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], default_pooling: str, final_poolings: tuple[str, ...]) -> "_Spec":
        """`final_poolings`: what the source's own final output takes (block and module outputs: any position
        pooling)."""
        layer = entry.get("layer", "final")
        layer = int(layer) if isinstance(layer, int) or str(layer).isdigit() else str(layer)
        spec = cls(layer, entry.get("pooling") or default_pooling, tuple(int(k) for k in entry.get("extra_layers", [])),
                   entry.get("extra_pooling", "cls"))
        name = entry.get("name")
        if layer == "final" and spec.pooling not in final_poolings:
            raise ValueError(f"backbone {name!r}: layer: final takes pooling one of {final_poolings}; {spec.pooling!r} "
                             f"needs a block index or module name as `layer`")
        if layer != "final" and spec.pooling not in POSITION_POOLINGS:
            declared = f"pooling {spec.pooling!r} needs layer: final" if entry.get("pooling") else \
                "no `pooling` declared"
            raise ValueError(f"backbone {name!r}: {declared}; the output of layer {layer!r} takes one of "
                             f"{POSITION_POOLINGS}")
        if spec.extra and spec.extra_pooling not in POSITION_POOLINGS:
            raise ValueError(f"backbone {name!r}: extra_pooling must be one of {POSITION_POOLINGS}")
        return spec

    @property
    def hooked(self) -> list[int | str]:
        """Blocks (by index) and modules (by name) whose outputs this request reads."""
        blocks = set(self.extra) | ({self.layer} if isinstance(self.layer, int) else set())
        return [*sorted(blocks), *([self.layer] if isinstance(self.layer, str) and self.layer != "final" else [])]

    @property
    def outputs(self) -> list[str]:
        return ["features"] + [f"layer_{k}" for k in self.extra]


def _pool(output: Any, pooling: str, prefix_tokens: int, what: str) -> torch.Tensor:
    """One vector per image: a (B, D) output as it is, tokens (B, N, D) or a spatial map (B, C, H, W) pooled."""
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"{what} is a {type(output).__name__}, not a tensor; name a module that returns one")
    if output.ndim == 2:
        return output
    if output.ndim == 3 and pooling in POSITION_POOLINGS:
        if pooling == "cls":
            return output[:, 0]
        if pooling == "mean_patches":
            return output[:, prefix_tokens:].mean(dim=1)
        positions: tuple[int, ...] = (1,)
    elif output.ndim == 4 and pooling in SPATIAL_POOLINGS:
        positions = (2, 3)
    else:
        layout = {3: "token (B, N, D)", 4: "spatial (B, C, H, W)"}.get(output.ndim, f"{output.ndim}-D")
        fits = {3: POSITION_POOLINGS, 4: SPATIAL_POOLINGS}.get(output.ndim, ())
        raise ValueError(f"{what}: pooling {pooling!r} does not apply to a {layout} output "
                         f"{tuple(output.shape)}; declare `pooling` as one of {fits}")
    if pooling == "avg":
        return output.mean(dim=positions)
    if pooling == "max":
        return output.amax(dim=positions)
    return output.flatten(1)


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


def _hooked_modules(spec: _Spec, model: nn.Module, source: str, entry: Mapping[str, Any]) -> dict[int | str, nn.Module]:
    """The modules the request reads: block k of the model's block list, or a module by its `named_modules()` name."""
    targets: dict[int | str, nn.Module] = {}
    indices = [k for k in spec.hooked if isinstance(k, int)]
    if indices:
        blocks = find_blocks(model, source, entry.get("blocks"))
        bad = [k for k in indices if not 0 <= k < len(blocks)]
        if bad:
            raise ValueError(f"block index {bad} out of range: the model has blocks 0..{len(blocks) - 1}")
        targets |= {k: blocks[k] for k in indices}
    for name in (k for k in spec.hooked if isinstance(k, str)):
        try:
            targets[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"backbone {entry.get('name')!r}: {type(model).__name__} has no module {name!r}; its "
                             f"top-level modules are {[n for n, _ in model.named_children()]}") from None
    return targets


@contextlib.contextmanager
def _captured(targets: Mapping[int | str, nn.Module], stop: bool,
              to_nld: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[dict[int | str, Any]]:
    """Record the targets' outputs during one forward pass (a module that runs twice: its first output); with `stop`,
    raise _StopForward once all have run."""
    store: dict[int | str, Any] = {}

    def hook_for(key: int | str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if key in store:
                return
            output = output[0] if isinstance(output, tuple) else output
            store[key] = to_nld(output) if isinstance(key, int) else output
            if stop and len(store) == len(targets):
                raise _StopForward
        return hook

    handles = [module.register_forward_hook(hook_for(key)) for key, module in targets.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _make_forward(spec: _Spec, targets: Mapping[int | str, nn.Module], final: Callable[[torch.Tensor], torch.Tensor],
                  trunk: Callable[[torch.Tensor], Any], prefix: int,
                  to_nld: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Callable:
    """`final` computes the entry's own final output; `trunk` is any call that runs every hooked module. Block
    outputs go through `to_nld` (a library's own token layout → (B, N, D))."""

    def forward(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with _captured(targets, spec.layer != "final", to_nld) as store:
            try:
                main = final(images) if spec.layer == "final" else trunk(images)
            except _StopForward:
                main = None
        silent = [k for k in targets if k not in store]
        if silent:
            raise ValueError(f"layer(s) {silent} did not run in the model's forward pass")
        out = {"features": main if spec.layer == "final" else
               _pool(store[spec.layer], spec.pooling, prefix, f"layer {spec.layer!r}")}
        out |= {f"layer_{k}": _pool(store[k], spec.extra_pooling, prefix, f"block {k}") for k in spec.extra}
        return out

    return forward


def _preprocessing_from(entry: Mapping[str, Any], resolved: Mapping[str, Any]) -> Preprocessing:
    """Config values win over the model's own pretrained configuration (recorded either way); a configured size or
    crop_pct replaces a published resize size by timm's rule."""
    override = entry.get("preprocessing") or {}
    merged = {**resolved, **override}
    if "size" not in merged:
        raise ValueError(f"backbone {entry.get('name')!r}: preprocessing.size is not in the config and the model has none")
    if {"size", "crop_pct"} & set(override):
        merged.pop("resize", None)
    return Preprocessing(size=int(merged["size"]), crop_pct=float(merged.get("crop_pct", 1.0)),
                         interpolation=merged.get("interpolation", "bicubic"),
                         mean=tuple(merged.get("mean", Preprocessing.mean)), std=tuple(merged.get("std", Preprocessing.std)),
                         crop_mode=merged.get("crop_mode", "center"), resize=merged.get("resize"))


def _checkpoint_file(spec: Mapping[str, Any]) -> Path:
    """A checkpoint given as a plain path (checked by `_check_weights`), or as a file inside an installed package (the
    demo's real weights)."""
    if "package" in spec:
        return Path(str(importlib.resources.files(spec["package"]).joinpath(spec["path"])))
    return Path(spec["path"])


def _is_path(value: Any) -> bool:
    """open_clip's `pretrained` is a local file when it has a folder in it, a tag otherwise."""
    return isinstance(value, str) and ("/" in value or os.sep in value)


def _is_local_dir(model_id: str) -> bool:
    """A transformers id is a local folder unless it has the hub's `name` or `namespace/name` form and no such
    folder exists."""
    path = Path(model_id)
    return path.exists() or path.is_absolute() or model_id.startswith(".") or len(path.parts) > 2


def _local_weights(entry: Mapping[str, Any]) -> list[str]:
    """The local files or folders (as written in the entry) that the entry's weights come from."""
    checkpoint = entry.get("checkpoint") or {}
    paths = [checkpoint["path"]] if "path" in checkpoint and "package" not in checkpoint else []
    if entry.get("source") == "open_clip" and _is_path(entry.get("pretrained")):
        paths.append(entry["pretrained"])
    if entry.get("source") == "transformers" and _is_local_dir(entry["id"]):
        paths.append(entry["id"])
    return paths


def _hub_weights(entry: Mapping[str, Any]) -> str | None:
    """What the entry would fetch from a model hub (None: local weights, or random init by `pretrained: false`)."""
    source, model_id, pretrained = entry.get("source"), entry["id"], entry.get("pretrained", True)
    if source in ("timm", "torchvision") and not entry.get("checkpoint") and pretrained is not False:
        return f"{source}'s pretrained weights for {model_id!r} (no `checkpoint`)"
    if source == "open_clip" and isinstance(pretrained, str) and not _is_path(pretrained):
        return f"open_clip's pretrained tag {pretrained!r}"
    if source == "transformers" and not _is_local_dir(model_id):
        return f"the hub model {model_id!r} (no local folder of that name)"
    return None


def _how_to_get(entry: Mapping[str, Any]) -> str:
    """The Snakemake targets that make the entry's weights: the download rule of each `requires` receipt, else the
    required file itself."""
    targets = []
    for required in entry.get("requires", []):
        path = Path(required)
        if path.parent.name == _RECEIPT_FOLDER and path.suffix == ".json":
            targets.append("download_" + "".join(c if c.isalnum() else "_" for c in path.stem))  # as download.smk
        else:
            targets.append(required)
    if targets:
        return f"get it with `snakemake {' '.join(targets)}`"
    return ("weights come from a download rule (docs/methods.md P-60): add the item to `downloads.items` and name its "
            "receipt <resources>/downloads/<item>.json in the entry's `requires`")


def _hubs_are_offline() -> bool:
    import huggingface_hub.constants as hub_constants

    return bool(hub_constants.HF_HUB_OFFLINE)


def _check_weights(entry: Mapping[str, Any]) -> None:
    """Fail before any library call: a missing file otherwise surfaces as a hub's "check your connection"."""
    name = entry.get("name")
    for path in _local_weights(entry):
        if not Path(path).exists():
            raise FileNotFoundError(f"backbone {name!r}: weights file {path} does not exist; {_how_to_get(entry)}")
    hub = _hub_weights(entry)
    if hub and _hubs_are_offline():
        raise FileNotFoundError(f"backbone {name!r}: {hub} would come from a model hub, and the hubs are offline "
                                f"(compute jobs never download, docs/methods.md P-60). Point the entry at a local file "
                                f"made by a download rule ({_how_to_get(entry)}), or set `pretrained: false` for "
                                f"random init")


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
    spec = _Spec.from_entry(entry, "cls", ("pooled", *POSITION_POOLINGS))
    prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)

    def final(images: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=images)
        return out.pooler_output if spec.pooling == "pooled" else \
            _pool(out.last_hidden_state, spec.pooling, prefix, "the final output")

    forward = _make_forward(spec, _hooked_modules(spec, model, "transformers", entry), final,
                            lambda images: model(pixel_values=images), prefix)
    provenance = {"revision": entry.get("revision") or _local_weights_hash(entry["id"])}
    return Backbone(entry["name"], model, _preprocessing_from(entry, resolved), forward, spec.outputs, provenance)


def _local_weights_hash(model_id: str) -> str | None:
    """For a local model directory, the hash of its weights and configuration (the architecture) stands in for the hub
    revision in the cache key."""
    folder = Path(model_id)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.json")):
        digest.update(f"{path.name}:{file_sha256(path)}".encode())
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
    resolved = timm_preprocessing(model)
    spec = _Spec.from_entry(entry, "pooled", ("pooled", *POSITION_POOLINGS))
    prefix = getattr(model, "num_prefix_tokens", 1)

    def final(images: torch.Tensor) -> torch.Tensor:
        return model(images) if spec.pooling == "pooled" else \
            _pool(model.forward_features(images), spec.pooling, prefix, "the final output")

    forward = _make_forward(spec, _hooked_modules(spec, model, "timm", entry), final, model, prefix)
    return Backbone(entry["name"], model, _preprocessing_from(entry, resolved), forward, spec.outputs, provenance)


def timm_preprocessing(model: nn.Module) -> dict[str, Any]:
    """timm's resolved data config of the instantiated model, as `Preprocessing` fields.

    timm's data config describes the *pretrained* input size; with `model_kwargs: {img_size: …}` the instantiated
    model takes another (DINOv2 at 224 px, not its 518), and feeding it the other size fails or misleads.
    """
    import timm

    data_config = timm.data.resolve_model_data_config(model)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = built[-1] if built and not getattr(model, "dynamic_img_size", False) else data_config["input_size"][-1]
    return {"size": size, "crop_pct": data_config.get("crop_pct") or timm.data.DEFAULT_CROP_PCT,
            "interpolation": data_config.get("interpolation", "bicubic"), "mean": data_config["mean"],
            "std": data_config["std"], "crop_mode": data_config.get("crop_mode") or "center"}


def _load_open_clip(entry: Mapping[str, Any]) -> Backbone:
    import open_clip

    pretrained = entry.get("pretrained")
    provenance: dict[str, Any] = {"pretrained": pretrained}
    if _is_path(pretrained):  # a local weights file, not a tag
        provenance |= _weights(Path(pretrained))
    model, _, _ = open_clip.create_model_and_transforms(entry["id"], pretrained=pretrained)
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    resolved = {"size": size, "crop_pct": 1.0, "interpolation": cfg.get("interpolation", "bicubic"),
                "mean": cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), "std": cfg.get("std", open_clip.OPENAI_DATASET_STD)}
    # open_clip's own final output is the projected image embedding; token poolings need a block or module `layer`.
    spec = _Spec.from_entry(entry, "embedding", ("embedding",))
    transformer = visual.transformer
    # Older open_clip keeps the residual stream as (L, N, D); outputs are always (N, L, D).
    to_nld = (lambda t: t) if getattr(transformer, "batch_first", True) else (lambda t: t.transpose(0, 1))
    forward = _make_forward(spec, _hooked_modules(spec, model, "open_clip", entry), model.encode_image, visual, 1,
                            to_nld)
    return Backbone(entry["name"], model, _preprocessing_from(entry, resolved), forward, spec.outputs, provenance)


def _torchvision_preprocessing(model_id: str) -> dict[str, Any]:
    """The evaluation transform torchvision publishes with the model's default weights (metadata only: nothing is
    fetched)."""
    import torchvision

    try:
        transform = torchvision.models.get_model_weights(model_id).DEFAULT.transforms()
        crop, resize = transform.crop_size[0], transform.resize_size[0]
        return {"size": crop, "crop_pct": crop / resize, "resize": resize, "interpolation": transform.interpolation.value,
                "mean": transform.mean, "std": transform.std}
    except (ValueError, AttributeError, IndexError):  # no published weights, or not an image classifier's transform
        return {}


def _load_torchvision(entry: Mapping[str, Any]) -> Backbone:
    import torchvision

    checkpoint = entry.get("checkpoint")
    from_hub = checkpoint is None and entry.get("pretrained", True) is not False  # torchvision's own download
    model = torchvision.models.get_model(entry["id"], weights="DEFAULT" if from_hub else None,
                                         **dict(entry.get("model_kwargs") or {}))
    provenance: dict[str, Any] = {"revision": str(torchvision.models.get_model_weights(entry["id"]).DEFAULT)
                                  if from_hub else None}
    if checkpoint:
        path = _checkpoint_file(checkpoint)
        _load_state_dict(model, path, checkpoint)
        provenance |= _weights(path)
    # The model's own output (a classifier's logits); earlier features are module outputs, e.g. `layer: avgpool`.
    spec = _Spec.from_entry(entry, "pooled", ("pooled",))
    forward = _make_forward(spec, _hooked_modules(spec, model, "torchvision", entry), model, model, 1)
    return Backbone(entry["name"], model, _preprocessing_from(entry, _torchvision_preprocessing(entry["id"])), forward,
                    spec.outputs, provenance)


_LOADERS: dict[str, Callable[[Mapping[str, Any]], Backbone]] = {
    "transformers": _load_transformers, "timm": _load_timm, "open_clip": _load_open_clip,
    "torchvision": _load_torchvision}


def load_backbone(entry: Mapping[str, Any]) -> Backbone:
    """Instantiate the backbone described by one registry entry, in eval mode without gradients, and check that every
    output pools to one vector per image."""
    source = entry.get("source")
    if source not in _LOADERS:
        raise ValueError(f"backbone {entry.get('name')!r}: unknown source {source!r}; known: {sorted(_LOADERS)}")
    _check_weights(entry)
    backbone = _LOADERS[source](entry)
    backbone.module.eval().requires_grad_(False)
    backbone.provenance |= {"source": source, "model_id": entry["id"], "layer": str(entry.get("layer", "final")),
                            "pooling": entry.get("pooling"), "extra_layers": list(entry.get("extra_layers", [])),
                            "outputs": backbone.outputs, "preprocessing": backbone.preprocessing.as_dict()}
    _check_outputs(backbone)
    return backbone


def _check_outputs(backbone: Backbone) -> None:
    """One blank image through the model: a layer that does not run, or whose output does not pool to (B, D), fails
    here, before extraction writes any file."""
    size = backbone.preprocessing.size
    try:
        with torch.inference_mode():
            backbone.forward(torch.zeros(1, 3, size, size))
    except ValueError as err:
        raise ValueError(f"backbone {backbone.name!r}: {err}") from None


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


# Where files are, not what they hold: `requires` (Snakemake's inputs) and the resolved weights path.
_LOCATION_KEYS = ("requires", "weights")


def _without_locations(value: Any, locations: set[str]) -> Any:
    """`value` with every local weights path replaced by a placeholder: their content is in the key by hash."""
    if isinstance(value, Mapping):
        return {k: _without_locations(v, locations) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_locations(v, locations) for v in value]
    return "<local weights>" if isinstance(value, str) and value in locations else value


def cache_key(entry: Mapping[str, Any], provenance: Mapping[str, Any], inputs_sha: str) -> str:
    """Weights (hash), settings, preprocessing, code and library versions, inputs: change any and a feature file is
    stale (docs/methods.md P-64). Nothing machine-specific: a weights file enters by its content hash, never by its
    (absolute, venv or checkout) path, so a moved checkout still resumes its partial files."""
    written = _local_weights(entry)
    locations = set(written) | {str(Path(path)) for path in written}
    settings = {k: v for k, v in entry.items() if k not in _LOCATION_KEYS}
    recorded = {k: v for k, v in provenance.items() if k not in _LOCATION_KEYS}
    payload = json.dumps({"entry": _without_locations(settings, locations),
                          "provenance": _without_locations(recorded, locations), "inputs": inputs_sha,
                          "code": EXTRACTION_CODE_VERSION, "libraries": library_versions()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()

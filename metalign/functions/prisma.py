"""Pretrained ViT-Prisma top-k SAEs (`weights.pt`, the legacy single-file format with an embedded config).

The file is a pickled dict {"cfg": <a ViT-Prisma config object>, "state_dict": {W_enc, b_enc, W_dec, b_dec, ...}}.
Its config is a class instance, so `torch.load(weights_only=True)` refuses it and plain unpickling would need
ViT-Prisma installed and would run whatever the pickle names. Here it is unpickled with an allow-list: tensors,
storages, dtypes and a few containers resolve to the real objects; every other class becomes an inert record of its
fields (read back as a plain dict), and no other callable is ever looked up.
"""

from __future__ import annotations

import collections
import copyreg
import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from metalign.functions.sae import WEIGHT_NAMES, TopKSAE
from metalign.io import DataContractError, file_sha256

_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
# Config keys that hold the number of active latents, in the order they are trusted.
K_KEYS = ("activation_fn_kwargs.k", "k", "top_k", "topk")


class _Record:
    """Stand-in for any class the pickle names: accepts any construction and keeps the fields it is given."""

    def __init__(self, *args: Any, **kwargs: Any):
        if args:
            self.__dict__["_args"] = list(args)
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Record,), {"__module__": f"record:{module}"})


_PICKLE = SimpleNamespace(Unpickler=_Unpickler, __name__="pickle", load=pickle.load)


def plain(value: Any) -> Any:
    """A JSON-safe copy of an unpickled config: records become dicts, tensors short descriptions."""
    if isinstance(value, _Record):
        return {key: plain(item) for key, item in vars(value).items()}
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(item) for item in value]
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def read_legacy(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config as a plain dict) of a legacy Prisma/SAELens `.pt` file; a file without an embedded config
    takes the `config.json` beside it, if any."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained SAE weights not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise DataContractError(f"{path}: not a readable torch pickle ({err})") from None
    if isinstance(payload, _Record):
        payload = vars(payload)
    if not isinstance(payload, dict):
        raise DataContractError(f"{path}: expected a dict with a state dict and a config, found {type(payload).__name__}")
    state = next((payload[key] for key in ("state_dict", "model_state_dict", "weights") if key in payload), payload)
    config = next((payload[key] for key in ("cfg", "config") if key in payload), {})
    tensors = {str(key): value for key, value in dict(state).items() if isinstance(value, torch.Tensor)}
    config = plain(config)
    sibling = path.with_name("config.json")  # hub repos that keep the config beside the weights
    if not config and sibling.is_file():
        config = json.loads(sibling.read_text())
    return tensors, config


def _weight(tensors: dict[str, torch.Tensor], name: str, source: Path) -> torch.Tensor:
    """The tensor called `name`, possibly prefixed (`sae.W_enc`, `_orig_mod.W_enc`); exactly one must match."""
    matches = [key for key in tensors if key == name or key.endswith("." + name)]
    if len(matches) != 1:
        found = "none" if not matches else matches
        raise DataContractError(f"{source}: need exactly one tensor named {name!r} (any prefix), found {found}; "
                                f"keys: {sorted(tensors)[:12]}")
    return tensors[matches[0]].detach().to(torch.float32)


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def config_k(config: dict[str, Any]) -> int | None:
    """k of a top-k SAE as its config states it (None if the config does not say)."""
    for key in K_KEYS:
        value = _lookup(config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def load_pretrained_sae(path: str | os.PathLike, k: int | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """A TopKSAE with a legacy file's weights, d_in and d_sae read from W_enc's shape (docs/methods.md P-5).

    `k` (from our config) and the file's own k must agree when both exist; one of them must.
    """
    path = Path(path)
    tensors, config = read_legacy(path)
    W_enc, b_enc, W_dec, b_dec = (_weight(tensors, name, path) for name in WEIGHT_NAMES)
    if W_enc.ndim != 2:
        raise DataContractError(f"{path}: W_enc must be 2-D (d_in, d_sae), got {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, tensor in zip(("b_enc", "W_dec", "b_dec"), (b_enc, W_dec, b_dec)):
        if tuple(tensor.shape) != expected[name]:
            raise DataContractError(f"{path}: {name} has shape {tuple(tensor.shape)}; W_enc {(d_in, d_sae)} "
                                    f"implies {expected[name]}")
    stated = config_k(config)
    if k is not None and stated is not None and k != stated:
        raise DataContractError(f"{path}: the file's config says k={stated}, the function-set config k={k}")
    k = k if k is not None else stated
    if k is None:
        raise DataContractError(f"{path}: the config names no k ({', '.join(K_KEYS)}); give k in the function set")
    sae = TopKSAE(int(d_in), int(d_sae), int(k))
    sae.load_state_dict({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    meta = {"pretrained": {"path": str(path), "sha256": file_sha256(path), "format": "legacy single-file (cfg + state_dict)",
                           "config": config, "hook": _lookup(config, "hook_point"),
                           "layer": _lookup(config, "hook_point_layer"), "k_source": "config" if stated else "argument"}}
    return sae.eval(), meta

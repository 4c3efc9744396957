"""Pretrained ViT-Prisma top-k SAEs (`weights.pt`, the legacy single-file format with an embedded config).

The file is a pickled dict {"cfg": <a ViT-Prisma config object>, "state_dict": {W_enc, b_enc, W_dec, b_dec, ...}}.
Its config is a class instance, so `torch.load(weights_only=True)` refuses it and plain unpickling would need
ViT-Prisma installed and would run whatever the pickle names. Here it is unpickled with an allow-list: tensors,
storages, dtypes and a few containers resolve to the real objects; every other class becomes an inert record of its
fields (read back as a plain dict), and no other callable is ever looked up.

Every config field is then classified: those that change encoding (input normalisation, b_dec subtraction, the
top-k activation) are applied, those that must fit the weights or the pipeline (widths, architecture, hook, dtype)
are checked, training and provenance fields are recorded, and an unknown field or unsupported value is an error
naming it (docs/methods.md §2).
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
# Every field that a ViT-Prisma SAE config has held (VisionModelSAERunnerConfig in all versions of ViT-Prisma, with the
# SAELens-derived fields of its predecessors), by what it does to encoding (docs/methods.md §2). A field in none of
# these sets is an error: its effect on the codes is unknown until someone reads ViT-Prisma's forward pass for it.
APPLIED = frozenset({"normalize_activations", "activation_fn_str", "activation_fn", "activation_fn_kwargs",
                     "apply_b_dec_to_input"})
CHECKED = frozenset({"d_in", "d_sae", "expansion_factor", "architecture", "is_transcoder", "hook_point_head_index",
                     "hook_head_index", "layer_subtype", "hook_point", "hook_name", "_custom_hook_point", "_dtype",
                     "dtype"})
NO_EFFECT = frozenset({
    # where the SAE reads and what it was trained on (recorded, not part of the formula)
    "model_class_name", "model_name", "model_path", "model_kwargs", "model_from_pretrained_kwargs", "vit_model_cfg",
    "hook_point_layer", "hook_layer", "cls_token_only", "use_patches_only", "context_size", "image_size",
    "prepend_bos", "dataset_name", "dataset_path", "dataset_train_path", "dataset_val_path",
    "dataset_trust_remote_code", "is_dataset_tokenized", "streaming", "sae_lens_version", "sae_lens_training_version",
    "vit_prisma_version", "run_name", "from_pretrained_path", "sae_path", "checkpoint_path", "seed",
    # training, initialisation, logging and runtime placement only
    "_device", "device", "act_store_device", "adam_beta1", "adam_beta2", "autocast", "autocast_lm",
    "b_dec_init_method", "cached_activations_path", "compile_llm", "compile_sae", "llm_compilation_mode",
    "sae_compilation_mode", "dead_feature_threshold", "dead_feature_window", "decoder_heuristic_init",
    "decoder_orthogonal_init", "init_encoder_as_decoder_transpose", "initialization_method", "eval_batch_size_prompts",
    "eval_every_n_wandb_logs", "feature_sampling_window", "finetuning_method", "finetuning_tokens", "hook_eval",
    "is_training", "l1_coefficient", "l1_loss_wd_norm", "l1_warm_up_steps", "log_activations_store_to_wandb",
    "log_optimizer_state_to_wandb", "log_to_wandb", "lp_norm", "lr", "lr_decay_steps", "lr_end", "lr_scheduler_name",
    "lr_warm_up_steps", "max_grad_norm", "min_explained_variance", "min_l0", "mse_loss_normalization",
    "n_batches_in_buffer", "n_checkpoints", "n_eval_batches", "n_restart_cycles", "n_validation_runs", "noise_scale",
    "normalize_sae_decoder", "num_epochs", "num_workers", "post_training_eval", "resume",
    "scale_sparsity_penalty_by_decoder_norm", "store_batch_size", "store_batch_size_prompts", "tokens_per_buffer",
    "total_training_steps", "train_batch_size", "train_batch_size_tokens", "training_eval", "training_tokens",
    "use_cached_activations", "use_ghost_grads", "verbose", "wandb_entity", "wandb_id", "wandb_log_frequency",
    "wandb_project",
    # transcoder outputs (refused below through is_transcoder)
    "d_out", "out_hook_point_layer", "layer_out_subtype", "transcoder_with_skip_connection",
})
# ViT-Prisma's `normalize_activations` → our input_norm; any other value is identity in its SAE but may have scaled
# the training inputs (e.g. expected_average_only_in), so it is refused.
_NORMS = {"none": "none", None: "none", "constant_norm_rescale": "constant_norm_rescale", "layer_norm": "layer_norm"}
_FLOAT32 = ("float32", "float", "torch.float32", "torch.float")
_HOOK = "hook_resid_post"  # the block outputs that extraction captures (docs/methods.md §1.3)


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


def _field_error(source: Path, field: str, value: Any, supported: str) -> DataContractError:
    return DataContractError(f"{source}: SAE config field {field!r} = {value!r} is not supported ({supported})")


def encoding_from_config(config: dict[str, Any], d_in: int, d_sae: int, source: Path) -> dict[str, Any]:
    """The encoding a ViT-Prisma config asks for, as TopKSAE options (k, input_norm, subtract_b_dec) plus the hook.

    ViT-Prisma's encoder: x ← normalize_activations(x); h = (x − b_dec) W_enc + b_enc; a = ReLU(top-k(h)). Every
    field that changes this is applied or checked; an unknown field or an unsupported value is an error naming it.
    """
    unknown = sorted(set(config) - APPLIED - CHECKED - NO_EFFECT)
    if unknown:
        raise DataContractError(f"{source}: unknown SAE config field(s) {unknown}: their effect on encoding is not "
                                f"known; read ViT-Prisma's forward pass and classify them in metalign.functions.prisma")

    def need(field: str) -> Any:
        if field not in config:
            raise DataContractError(f"{source}: the SAE config lacks {field!r}, which changes encoding (its default "
                                    f"differs between ViT-Prisma versions)")
        return config[field]

    activation = "activation_fn_str" if "activation_fn_str" in config or "activation_fn" not in config \
        else "activation_fn"  # the SAE reads activation_fn_str; older SAELens-style configs name it activation_fn
    if need(activation) != "topk":
        raise _field_error(source, activation, config[activation], "only topk gives the fixed-width (N, k) codes")
    kwargs = need("activation_fn_kwargs")
    extra = sorted(set(kwargs) - {"k"}) if isinstance(kwargs, dict) else []
    if extra:
        raise _field_error(source, f"activation_fn_kwargs.{extra[0]}", kwargs[extra[0]], "top-k takes only k, "
                           "followed by ReLU")
    k = kwargs.get("k") if isinstance(kwargs, dict) else None
    if not isinstance(k, int) or isinstance(k, bool):
        raise _field_error(source, "activation_fn_kwargs.k", k, "an integer number of active latents")
    norm = need("normalize_activations")
    if norm not in _NORMS:
        raise _field_error(source, "normalize_activations", norm, f"one of {sorted(n for n in _NORMS if n)} or null")
    subtract = config.get("apply_b_dec_to_input", True)  # absent: ViT-Prisma's SAE always subtracts b_dec
    if not isinstance(subtract, bool):
        raise _field_error(source, "apply_b_dec_to_input", subtract, "true or false")

    checks = {
        "d_in": (lambda v: v == d_in, f"W_enc has d_in = {d_in}"),
        "d_sae": (lambda v: v is None or v == d_sae, f"W_enc has d_sae = {d_sae}"),
        "architecture": (lambda v: v == "standard", "standard"),
        "is_transcoder": (lambda v: not v, "an SAE, not a transcoder"),
        "hook_point_head_index": (lambda v: v is None, "the whole residual stream, not one head"),
        "hook_head_index": (lambda v: v is None, "the whole residual stream, not one head"),
        "layer_subtype": (lambda v: v == _HOOK, f"{_HOOK}, the block output that extraction captures"),
        "_dtype": (lambda v: v in _FLOAT32, "float32"),
        "dtype": (lambda v: v in _FLOAT32, "float32"),
    }
    if config.get("d_sae") is None:  # ViT-Prisma builds d_sae = d_in × expansion_factor
        checks["expansion_factor"] = (lambda v: v * d_in == d_sae, f"W_enc has d_sae = {d_sae} = {d_sae / d_in} × d_in")
    for field in ("hook_point", "hook_name", "_custom_hook_point"):
        checks[field] = (lambda v: not isinstance(v, str) or v.endswith(_HOOK), f"a {_HOOK} hook")
    for field, (fits, supported) in checks.items():
        if field in config and not fits(config[field]):
            raise _field_error(source, field, config[field], supported)

    layer = next((config[f] for f in ("hook_point_layer", "hook_layer") if config.get(f) is not None), None)
    hook = next((config[f] for f in ("hook_point", "hook_name", "_custom_hook_point") if isinstance(config.get(f), str)),
                f"blocks.{layer}.{config.get('layer_subtype', _HOOK)}" if layer is not None else None)
    return {"k": k, "input_norm": _NORMS[norm], "subtract_b_dec": subtract, "hook": hook, "layer": layer}


def load_pretrained_sae(path: str | os.PathLike, k: int | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """A TopKSAE with a legacy file's weights and the encoding its config states (input normalisation, b_dec
    subtraction, top-k), d_in and d_sae read from W_enc's shape (docs/methods.md P-5). `k` (from our config), when
    given, must equal the file's."""
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
    if not config:
        raise DataContractError(f"{path}: no SAE config (neither embedded nor config.json beside it); the encoding "
                                f"cannot be known")
    encoding = encoding_from_config(config, int(d_in), int(d_sae), path)
    if k is not None and k != encoding["k"]:
        raise DataContractError(f"{path}: the file's config says k={encoding['k']}, the function-set config k={k}")
    sae = TopKSAE(int(d_in), int(d_sae), encoding["k"], encoding["input_norm"], encoding["subtract_b_dec"])
    sae.load_state_dict({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    meta = {"pretrained": {"path": str(path), "sha256": file_sha256(path), "format": "legacy single-file (cfg + state_dict)",
                           "config": config, "hook": encoding["hook"], "layer": encoding["layer"]}}
    return sae.eval(), meta

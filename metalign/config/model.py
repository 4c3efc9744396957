"""Model and training settings: one flat, JSON-able dict (docs/methods.md §5, §7) with documented defaults.

A flat dict is what the workflow passes (`train` defaults overridden by a variant). Unknown keys are errors so that
a misspelt key never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Self

MODEL_TYPES = ("transformer", "lstm", "static_linear")
SEQUENCE_TYPES = ("transformer", "lstm")  # episodic models; static_linear sees all functions of an image at once
MAGNITUDE_UNITS = ("raw", "sigma")        # units of the magnitude head and of the hurdle MSE (docs/methods.md §6)
R2_AVERAGES = ("batch", "pooled")         # how the selection R² combines evaluation batches (docs/methods.md §7)
SAVE_RULES = ("min_delta", "any")         # improvements saved as a new best under early stopping (docs/methods.md §7)


@dataclass(frozen=True)
class ModelSettings:
    """The meta-learner's architecture keys, declared once: `TrainConfig` (the config block) and
    `metalign.train.model.ModelConfig` (what a checkpoint is built from) both extend this class."""

    hidden: int | None = None              # width H of the embedding and the core; None = input dimension D
    n_layers: int = 1
    n_heads: int = 16                      # transformer only
    use_mlp: bool = False                  # transformer only
    mlp_size: int = 3072
    dropout: float = 0.1                   # attention dropout (training only)
    rope_base: float = 10_000.0
    model_type: str = "transformer"        # transformer | lstm | static_linear
    no_embed: bool = False                 # sequence models without an embed layer (ICL curves only)
    magnitude_units: str | None = None     # raw | sigma; None = the study's: raw for sequence models, sigma (per
                                           # function) for static_linear (docs/methods.md §6)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Self:
        """Build from a flat dict; an unknown key is an error, so a misspelt key never falls back to a default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**dict(cfg))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {list(MODEL_TYPES)}")
        for name in ("n_layers", "n_heads", "mlp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"model config: hidden must be >= 1, got {self.hidden}")
        if self.model_type == "transformer" and self.hidden is not None and (
                self.hidden % self.n_heads or (self.hidden // self.n_heads) % 2):
            raise ValueError(f"model config: hidden ({self.hidden}) / n_heads ({self.n_heads}) must be an even integer "
                             "(RoPE rotates pairs of head dimensions)")
        if self.no_embed and self.model_type not in SEQUENCE_TYPES:
            raise ValueError(f"model config: no_embed applies to sequence models {list(SEQUENCE_TYPES)} only")
        if self.magnitude_units not in (None, *MAGNITUDE_UNITS):
            raise ValueError(f"magnitude_units {self.magnitude_units!r} is not one of {list(MAGNITUDE_UNITS)} or null")

    @property
    def mag_units(self) -> str:
        """The resolved magnitude units: the study fitted raw magnitudes in sequence models and per-function standard
        units in static_linear (docs/methods.md §6)."""
        if self.magnitude_units is not None:
            return self.magnitude_units
        return "sigma" if self.model_type == "static_linear" else "raw"


MODEL_KEYS = tuple(f.name for f in fields(ModelSettings))


@dataclass(frozen=True)
class TrainConfig(ModelSettings):
    """Defaults follow upstream (docs/methods.md §5, §7) unless noted."""

    seed: int = 1234
    sl: int = 120                          # episode length (tokens per episode)
    batch_size: int = 1024                 # global episodes (static_linear: distinct images) per optimiser step;
                                           # 1024 = upstream's effective batch (docs/methods.md P-15); the study's
                                           # static_linear saw 4096 distinct images per step (its variant sets it)
    steps: int = 10_000                    # maximum optimiser steps
    lr: float = 2.5e-4
    weight_decay: float = 0.0              # applied to every parameter except, unless decay_embed, the embed layer
    decay_embed: bool = False              # (the evaluated representation; docs/methods.md P-27) and, unless
    decay_loss_weights: bool = True        # ... true (the study's rule): loss weights s1, s2 too (docs/methods.md §7)
    eval_every: int = 100                  # steps between evaluations on the fixed validation episodes
    checkpoint_every: int = 100            # steps between resumable `.last.pt` checkpoints
    log_every: int = 10                    # steps averaged into one `train` row of the metrics CSV
    n_eval_episodes_per_function: int = 20
    eval_seed: int = 1234                  # seed of the fixed validation episodes: keep it equal across runs (docs/methods.md P-17)
    eval_batch_size: int | None = None     # episodes per evaluation forward pass; None = batch_size
    min_step: int = 1000                   # early stopping is active once the 0-based step (step - 1) reaches
                                           # this (the study's counter: first active evaluation at step 1100) ...
    min_acc: float = 0.6                   # ... and when the current validation accuracy reaches this
    min_delta: float = 0.001               # improvement of S that resets the patience counter
    patience: int = 10                     # consecutive evaluations without such an improvement before stopping
    save_rule: str = "min_delta"           # once early stopping is active, save a new best only on an improvement
                                           # > min_delta (the study) | "any" improvement (docs/methods.md §7)
    r2_average: str = "batch"              # selection R²: positive-weighted mean of per-batch R² (the study) |
                                           # "pooled" over all fitted outputs (docs/methods.md §7)
    compile: bool = False                  # torch.compile the model (CUDA runs)
    gpus: int = 1                          # devices per run: > 1 runs data-parallel (DDP) under torchrun, one
                                           # process per GPU; batch_size stays the global batch (docs/methods.md P-15)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("sl", "batch_size", "steps", "eval_every", "checkpoint_every", "log_every",
                    "n_eval_episodes_per_function", "patience")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train config: {name} must be >= 1, got {getattr(self, name)}")
        if self.sl < 2:
            raise ValueError(f"train config: sl must be >= 2, got {self.sl}")
        if self.gpus < 0:
            raise ValueError(f"train config: gpus must be >= 0, got {self.gpus}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"train config: eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.save_rule not in SAVE_RULES:
            raise ValueError(f"train config: save_rule {self.save_rule!r} is not one of {list(SAVE_RULES)}")
        if self.r2_average not in R2_AVERAGES:
            raise ValueError(f"train config: r2_average {self.r2_average!r} is not one of {list(R2_AVERAGES)}")

    def model_dict(self, d_in: int, n_functions: int) -> dict[str, Any]:
        """The model part of the config, for `ModelConfig.from_dict` (static_linear also needs the function count)."""
        extra = {"n_functions": int(n_functions)} if self.model_type == "static_linear" else {}
        return {"d_in": int(d_in), **{key: getattr(self, key) for key in MODEL_KEYS}, **extra}

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size


def has_representation(params: Mapping[str, Any]) -> bool:
    """Whether a variant's checkpoint defines encode() (docs/methods.md §8): every variant except those without an embed
    layer, which the workflow must never ask to encode."""
    return not params.get("no_embed", False)

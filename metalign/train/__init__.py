"""Meta-learner training: episodes (§4), models and loss (§5, §6), training loop (§7), encode (§8), ICL curves.

Exports load lazily, so that `metalign.train.config` (used when the workflow validates its config) never imports
torch.
"""

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "config", "Features": "data", "aligned_features": "data", "read_features": "data",
    "TrainResult": "loop", "train": "loop", "MetaLearner": "model", "ModelConfig": "model", "StaticLinear": "model",
    "build_model": "model", "load_encoder": "model", "Batch": "sampler", "EpisodeSampler": "sampler",
    "EpisodeSet": "sampler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metalign.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"metalign.train.{_EXPORTS[name]}"), name)

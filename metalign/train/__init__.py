"""Meta-learner training: episodes (§4), model and loss (§5, §6), training loop (§7), encode (§8)."""

from metalign.train.config import TrainConfig
from metalign.train.data import Features, aligned_features, read_features
from metalign.train.loop import TrainResult, train
from metalign.train.model import MetaLearner, ModelConfig, build_model, load_encoder
from metalign.train.sampler import Batch, EpisodeSampler, EpisodeSet

__all__ = ["Batch", "EpisodeSampler", "EpisodeSet", "Features", "MetaLearner", "ModelConfig", "TrainConfig",
           "TrainResult", "aligned_features", "build_model", "load_encoder", "read_features", "train"]

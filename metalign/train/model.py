"""The meta-learners (docs/methods.md §5, §6, §8) and their evaluated representation `encode(x)`.

Sequence models read episode tokens z_t = [m_{t-1}/sigma_m, x_t] through a causal core (`transformer`: RoPE
attention blocks; `lstm`), a final LayerNorm and two heads (binary logit, magnitude). `no_embed` drops the embed
layer: the token is x_t + w·m_{t-1}/sigma_m + b (hidden = D), so the model has no representation to encode (docs/methods.md §8).
`static_linear` sees no episodes: r = LayerNorm(W x + c) and one binary + one magnitude head per training function.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from metalign.config.model import SEQUENCE_TYPES, ModelSettings
from metalign.io import DataContractError
from metalign.train.checkpoint import load_checkpoint


@dataclass(frozen=True)
class ModelConfig(ModelSettings):
    """What a checkpoint is built from: the architecture keys plus the sizes the data fixes."""

    d_in: int = 0                   # backbone feature dimension D
    n_functions: int | None = None  # static_linear: number of training functions (output heads)

    def __post_init__(self) -> None:
        if self.d_in < 1:
            raise ValueError(f"model config: d_in must be >= 1, got {self.d_in}")
        if self.hidden is None:
            object.__setattr__(self, "hidden", self.d_in)
        super().__post_init__()
        if self.no_embed and self.hidden != self.d_in:
            raise ValueError(f"model config: no_embed needs hidden = d_in = {self.d_in} (got hidden {self.hidden})")
        if (self.model_type == "static_linear") != (self.n_functions is not None):
            raise ValueError("model config: n_functions is set for (and only for) static_linear")
        if self.n_functions is not None and self.n_functions < 1:
            raise ValueError(f"model config: n_functions must be >= 1, got {self.n_functions}")

    @property
    def episodic(self) -> bool:
        return self.model_type in SEQUENCE_TYPES


@functools.lru_cache(maxsize=8)
def _rotation(length: int, dim: int, base: float, device: torch.device) -> torch.Tensor:
    """e^{i t base^(-2i/dim)}, complex (length, dim/2): the RoPE phases, the same for every step of a run. Made as an
    ordinary tensor even under inference_mode, so a cached one also serves a later forward that trains."""
    with torch.inference_mode(False):
        inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        angle = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        return torch.polar(torch.ones_like(angle), angle)


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on (…, T, head_dim): rotate interleaved pairs (2i, 2i+1) by t * base^(-2i/head_dim) (torchtune), as one
    complex product per pair (a third of the CPU time of the real-valued form, forward and backward)."""
    phase = _rotation(x.shape[-2], x.shape[-1], base, x.device)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (x.shape[-1] // 2, 2)))
    return torch.view_as_real(pairs * phase).flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout, self.rope_base = c.n_heads, c.dropout, c.rope_base
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.out = nn.Linear(c.hidden, c.hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape
        qkv = self.qkv(h).view(batch, length, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        (q, k), v = rotary(qkv[:2], self.rope_base), qkv[2]   # one rotation of q and k together
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LayerNorm block: h + attn(ln(h)), then optionally h + mlp(ln(h))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.hidden)
        self.attn = CausalSelfAttention(c)
        self.mlp = None
        if c.use_mlp:
            self.ln2 = nn.LayerNorm(c.hidden)
            self.mlp = nn.Sequential(nn.Linear(c.hidden, c.mlp_size), nn.GELU(), nn.Linear(c.mlp_size, c.hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln1(h))
        if self.mlp is not None:
            h = h + self.mlp(self.ln2(h))
        return h


class TransformerCore(nn.Module):
    """n_layers pre-LayerNorm causal blocks."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return h


class LSTMCore(nn.Module):
    """An LSTM of width H over the embedded tokens (causal by construction)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.lstm = nn.LSTM(c.hidden, c.hidden, num_layers=c.n_layers, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lstm(h)[0]


# Sequence cores map embedded tokens (B, T, H) to (B, T, H) causally; they share embed, heads and encode().
CORES: dict[str, Callable[[ModelConfig], nn.Module]] = {"transformer": TransformerCore, "lstm": LSTMCore}


def hurdle_objective(bce: torch.Tensor, mse: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """L = exp(-s1)·BCE + 0.5·exp(-s2)·MSE + 0.5·(s1 + s2) (docs/methods.md §6; Kendall-style weights)."""
    s1, s2 = log_var[0], log_var[1]
    return torch.exp(-s1) * bce + 0.5 * torch.exp(-s2) * mse + 0.5 * (s1 + s2)


class HurdleModel(nn.Module):
    """Shared loss of every model type: BCE over all outputs, MSE over the fitted ones, in `mag_scale` units.

    The study's units (`magnitude_units: null`, docs/methods.md §6): sequence models fit raw magnitudes (mag_scale =
    1), static_linear fits each function in its own std units (mag_scale = sigma_m per function). Option
    `magnitude_units: sigma` fits sequence models in sigma_m units too. Either way `forward` returns raw magnitudes
    (head output x mag_scale) and the loss divides residuals by mag_scale. sigma_m is one scalar (sequence models:
    it also scales the previous-magnitude input) or one value per function (static_linear). The loss weights s1, s2
    (`loss_log_var`, init 0) live in the model.
    """

    representation: tuple[str, ...] = ()  # submodules that encode() uses
    decay_spared: tuple[str, ...] = ()    # spared by weight decay unless decay_embed (study's rule, docs/methods.md §7)

    def __init__(self, c: ModelConfig, sigma_m: float | Sequence[float]):
        super().__init__()
        sigma = torch.tensor(np.array(sigma_m, dtype=np.float32))
        if not torch.isfinite(sigma).all() or (sigma <= 0).any():
            raise ValueError(f"sigma_m must be positive and finite, got {sigma_m}")
        self.config = c
        self.loss_log_var = nn.Parameter(torch.zeros(2))
        self.register_buffer("sigma_m", sigma)

    @property
    def mag_scale(self) -> torch.Tensor:
        """Magnitudes per unit of the magnitude head and of the loss: sigma_m, or 1 for raw units."""
        return self.sigma_m if self.config.mag_units == "sigma" else torch.ones_like(self.sigma_m)

    def loss(self, logits: torch.Tensor, mag_pred: torch.Tensor, labels: torch.Tensor, mags: torch.Tensor,
             mse_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hurdle loss in fp32: MSE over the tokens of `mse_mask` (positives; all tokens of dense functions)."""
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
        residual = (mag_pred.float() - mags) / self.mag_scale
        mse = (residual.square() * mse_mask).sum() / mse_mask.sum().clamp(min=1)
        return hurdle_objective(bce, mse, self.loss_log_var), bce.detach(), mse.detach()


class MetaLearner(HurdleModel):
    """embed -> causal core -> final LayerNorm -> (binary logit, magnitude) per token."""

    def __init__(self, c: ModelConfig, sigma_m: float = 1.0):
        super().__init__(c, sigma_m)
        if c.no_embed:
            self.previous = nn.Linear(1, c.d_in)
        else:
            self.embed = nn.Linear(c.d_in + 1, c.hidden)
            self.representation = self.decay_spared = ("embed",)
        self.core = CORES[c.model_type](c)
        self.ln_f = nn.LayerNorm(c.hidden)
        self.logit_head = nn.Linear(c.hidden, 1)
        self.mag_head = nn.Linear(c.hidden, 1)

    def forward(self, x: torch.Tensor, mags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) features, mags (B, T) true raw magnitudes (teacher forcing) -> logits, magnitudes (B, T)."""
        previous = (F.pad(mags[:, :-1], (1, 0)) / self.sigma_m).unsqueeze(-1).to(x.dtype)  # m_0 = 0
        if self.config.no_embed:
            tokens = x + self.previous(previous)
        else:  # embed([m, x]) without materialising the (B, T, D+1) concatenation
            weight = self.embed.weight
            tokens = F.linear(x, weight[:, 1:], self.embed.bias) + previous * weight[:, 0]
        h = self.ln_f(self.core(tokens))
        return self.logit_head(h).squeeze(-1), self.mag_head(h).squeeze(-1) * self.mag_scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluated representation (docs/methods.md §8): embed([0, x]), an affine map R^D -> R^H."""
        if self.config.no_embed:
            raise ValueError("a model without an embed layer (no_embed=true) has no representation to encode "
                             "(docs/methods.md §8); use it for in-context-learning curves only")
        return self.embed(F.pad(x, (1, 0)))


class StaticLinear(HurdleModel):
    """Multi-task baseline: r = LayerNorm(W x + c), then a binary and a magnitude head per training function.

    sigma_m holds each function's magnitude std; by default (the study's) magnitudes are fitted in these per-function
    standard units (docs/methods.md §5, §6). Weight decay reaches every layer, as in the study, whose name for `embed`
    was `proj` (only sequence models' `embed.*` was spared).
    """

    representation = ("embed", "embed_norm")

    def __init__(self, c: ModelConfig, sigma_m: float | Sequence[float] = 1.0):
        sigma = np.broadcast_to(np.asarray(sigma_m, dtype=np.float32), (c.n_functions,))
        super().__init__(c, sigma)
        self.embed = nn.Linear(c.d_in, c.hidden)
        self.embed_norm = nn.LayerNorm(c.hidden)
        self.logit_head = nn.Linear(c.hidden, c.n_functions)
        self.mag_head = nn.Linear(c.hidden, c.n_functions)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> logits and raw magnitudes (B, F) of every training function."""
        r = self.encode(x)
        return self.logit_head(r), self.mag_head(r) * self.mag_scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(self.embed(x))


def build_model(config: ModelConfig, sigma_m: float | Sequence[float]) -> HurdleModel:
    if config.model_type == "static_linear":
        return StaticLinear(config, sigma_m)
    return MetaLearner(config, float(np.asarray(sigma_m)))


def parameter_groups(model: HurdleModel, weight_decay: float, decay_embed: bool = False,
                     decay_loss_weights: bool = True) -> list[dict[str, Any]]:
    """The study's rule (docs/methods.md §7): every parameter is decayed except a sequence model's `embed` layer, so
    the loss weights s1, s2 are decayed too. decay_embed: decay the embed as well (docs/methods.md P-27);
    decay_loss_weights=False: spare s1, s2 (our option: decay pulls the learned log-variances towards 0)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        spared = (name == "loss_log_var" and not decay_loss_weights) or (
            not decay_embed and name.split(".")[0] in model.decay_spared)
        (no_decay if spared else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


LEGACY_MAGNITUDE_UNITS = "sigma"  # checkpoints written before `magnitude_units` existed fitted sigma_m units


def model_from_checkpoint(ckpt: Mapping[str, Any]) -> HurdleModel:
    config = ModelConfig.from_dict({"magnitude_units": LEGACY_MAGNITUDE_UNITS, **ckpt["model_config"]})
    model = build_model(config, ckpt["sigma_m"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def encoder_from_checkpoint(ckpt: Mapping[str, Any], source: str, batch_size: int = 4096,
                            device: str | torch.device = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    model = model_from_checkpoint(ckpt).to(device)
    d_in, hidden = model.config.d_in, model.config.hidden
    if model.config.no_embed:
        raise ValueError(f"{source}: variant trained with no_embed=true has no embed layer, so encode() is undefined "
                         "(docs/methods.md §8); it is evaluated by in-context-learning curves only")

    @torch.no_grad()
    def encode(features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != d_in:
            raise DataContractError(f"{source}: encoder expects (N, {d_in}) features, got {features.shape}")
        out = np.empty((len(features), hidden), dtype=np.float32)
        for start in range(0, len(features), batch_size):
            chunk = torch.from_numpy(features[start:start + batch_size]).to(device)
            out[start:start + batch_size] = model.encode(chunk).float().cpu().numpy()
        return out

    return encode


def load_encoder(ckpt_path: str | Path, batch_size: int = 4096,
                 device: str | torch.device = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """(N, D) features -> (N, H) float32 meta representations, in fp32 without gradients (docs/methods.md §8)."""
    return encoder_from_checkpoint(load_checkpoint(ckpt_path), str(ckpt_path), batch_size, device)

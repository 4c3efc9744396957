"""The meta-learner (protocols §5, §6, §8): a causal sequence model over episode tokens z_t = [m_{t-1}/sigma_m, x_t].

Only the `transformer` model type exists here. Other sequence cores (e.g. an LSTM) plug in through `CORES`; model
types with a different interface (static_linear, noemb) add their own entry to `MODEL_BUILDERS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from metalign.io import DataContractError
from metalign.train.checkpoint import load_checkpoint


@dataclass(frozen=True)
class ModelConfig:
    d_in: int                     # backbone feature dimension D
    hidden: int | None = None     # width H of the embedding and the blocks; None = D (upstream)
    n_layers: int = 1
    n_heads: int = 16
    use_mlp: bool = False
    mlp_size: int = 3072
    dropout: float = 0.1          # attention dropout (training only)
    rope_base: float = 10_000.0
    model_type: str = "transformer"

    def __post_init__(self) -> None:
        if self.hidden is None:
            object.__setattr__(self, "hidden", self.d_in)
        if self.model_type not in MODEL_BUILDERS:
            raise ValueError(f"model_type {self.model_type!r} is not implemented; known: {sorted(MODEL_BUILDERS)}")
        if self.d_in < 1 or self.hidden < 1 or self.n_layers < 1 or self.n_heads < 1:
            raise ValueError(f"model config: d_in, hidden, n_layers and n_heads must be >= 1: {self}")
        if self.hidden % self.n_heads or (self.hidden // self.n_heads) % 2:
            raise ValueError(f"model config: hidden ({self.hidden}) / n_heads ({self.n_heads}) must be an even "
                             "integer (RoPE rotates pairs of head dimensions)")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}")
        return cls(**dict(cfg))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on (B, heads, T, head_dim): rotate interleaved pairs (2i, 2i+1) by t * base^(-2i/head_dim) (torchtune)."""
    length, dim = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angle = torch.arange(length, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    pairs = x.float().unflatten(-1, (dim // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout, self.rope_base = c.n_heads, c.dropout, c.rope_base
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.out = nn.Linear(c.hidden, c.hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, self.rope_base), rotary(k, self.rope_base)
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
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return h


# Sequence cores map embedded tokens (B, T, H) to (B, T, H) causally; they share embed, heads and encode().
CORES: dict[str, Callable[[ModelConfig], nn.Module]] = {"transformer": TransformerCore}


def hurdle_objective(bce: torch.Tensor, mse: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """L = exp(-s1)·BCE + 0.5·exp(-s2)·MSE + 0.5·(s1 + s2) (protocols §6; Kendall-style weights)."""
    s1, s2 = log_var[0], log_var[1]
    return torch.exp(-s1) * bce + 0.5 * torch.exp(-s2) * mse + 0.5 * (s1 + s2)


class MetaLearner(nn.Module):
    """embed -> causal core -> final LayerNorm -> (binary logit, magnitude) per token.

    `forward` returns magnitudes in raw units (head output x sigma_m); the loss measures them in sigma_m units, i.e.
    MSE = mean over positives of ((m_hat - m) / sigma_m)^2, so its scale does not depend on the SAE's magnitude scale.
    The loss weights s1, s2 (`loss_log_var`, init 0) live in the model so that one state dict holds everything.
    """

    def __init__(self, c: ModelConfig, sigma_m: float = 1.0):
        super().__init__()
        if not np.isfinite(sigma_m) or sigma_m <= 0:
            raise ValueError(f"sigma_m must be positive and finite, got {sigma_m}")
        self.config = c
        self.embed = nn.Linear(c.d_in + 1, c.hidden)
        self.core = CORES[c.model_type](c)
        self.ln_f = nn.LayerNorm(c.hidden)
        self.logit_head = nn.Linear(c.hidden, 1)
        self.mag_head = nn.Linear(c.hidden, 1)
        self.loss_log_var = nn.Parameter(torch.zeros(2))
        self.register_buffer("sigma_m", torch.tensor(float(sigma_m), dtype=torch.float32))

    def forward(self, x: torch.Tensor, mags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) features, mags (B, T) true raw magnitudes (teacher forcing) -> logits, magnitudes (B, T)."""
        previous = F.pad(mags[:, :-1], (1, 0)) / self.sigma_m  # m_0 = 0
        tokens = torch.cat([previous.unsqueeze(-1).to(x.dtype), x], dim=-1)
        h = self.ln_f(self.core(self.embed(tokens)))
        return self.logit_head(h).squeeze(-1), self.mag_head(h).squeeze(-1) * self.sigma_m

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluated representation (protocols §8): embed([0, x]), an affine map R^D -> R^H."""
        return self.embed(F.pad(x, (1, 0)))

    def loss(self, logits: torch.Tensor, mag_pred: torch.Tensor, labels: torch.Tensor,
             mags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hurdle loss (sparse targets: MSE over positive tokens only), computed in fp32; returns (L, BCE, MSE)."""
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
        positive = labels > 0
        residual = (mag_pred.float() - mags) / self.sigma_m
        mse = (residual.square() * positive).sum() / positive.sum().clamp(min=1)
        return hurdle_objective(bce, mse, self.loss_log_var), bce.detach(), mse.detach()


MODEL_BUILDERS: dict[str, Callable[[ModelConfig, float], nn.Module]] = {"transformer": MetaLearner}


def build_model(config: ModelConfig, sigma_m: float) -> nn.Module:
    return MODEL_BUILDERS[config.model_type](config, sigma_m)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """embed.* is never decayed (protocols §7, P-27), nor are the loss weights s1, s2; the rest is decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.startswith("embed.") or name == "loss_log_var" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def model_from_checkpoint(ckpt: Mapping[str, Any]) -> nn.Module:
    config = ModelConfig.from_dict(ckpt["model_config"])
    model = build_model(config, float(ckpt["sigma_m"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def encoder_from_checkpoint(ckpt: Mapping[str, Any], source: str, batch_size: int = 4096,
                            device: str | torch.device = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    model = model_from_checkpoint(ckpt).to(device)
    d_in, hidden = model.config.d_in, model.config.hidden

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
    """(N, D) features -> (N, H) float32 meta representations, in fp32 without gradients (protocols §8)."""
    return encoder_from_checkpoint(load_checkpoint(ckpt_path), str(ckpt_path), batch_size, device)

"""Top-k sparse autoencoder: the encoder of docs/methods.md §2, a short trainer, and weights-only checkpoints.

The encoder is a function of the weight tensors so that our own SAEs and pretrained Prisma SAEs
(dicts with W_enc/b_enc/W_dec/b_dec) produce codes through exactly the same code path.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from metalign.io import _json_default, atomic_path
from metalign.progress import progress

WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
# Per-row input normalisation before encoding (ViT-Prisma's `normalize_activations`, docs/methods.md §2): none;
# constant_norm_rescale, x·√d_in/‖x‖; layer_norm, (x − mean(x)) / (std(x) + 1e−5) with the sample std (ddof 1).
INPUT_NORMS = ("none", "constant_norm_rescale", "layer_norm")
_LN_EPS = 1e-5


def normalise_input(x: torch.Tensor, input_norm: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised rows, scale, shift): codes live in the normalised space, and a reconstruction r maps back to x's
    units as r·scale + shift, as ViT-Prisma does (for layer_norm its scale omits the 1e−5)."""
    ones = torch.ones_like(x[..., :1])
    if input_norm == "none":
        return x, ones, torch.zeros_like(ones)
    if input_norm == "constant_norm_rescale":
        scale = x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5
        return x / scale, scale, torch.zeros_like(ones)
    if input_norm == "layer_norm":
        shift = x.mean(dim=-1, keepdim=True)
        scale = (x - shift).std(dim=-1, keepdim=True)
        return (x - shift) / (scale + _LN_EPS), scale, shift
    raise ValueError(f"input_norm {input_norm!r} is not one of {INPUT_NORMS}")


def topk_activations(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
                     input_norm: str = "none", subtract_b_dec: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse code of each row of `x`: (indices ascending, values), ReLU applied after the top-k selection (docs/methods.md §2)."""
    s = normalise_input(x, input_norm)[0]
    h = ((s - b_dec) if subtract_b_dec else s) @ W_enc + b_enc
    top_values, top_indices = torch.topk(h, k, dim=-1)
    indices, order = torch.sort(top_indices, dim=-1)
    return indices, torch.gather(top_values, -1, order).relu()


class TopKSAE(nn.Module):
    """x_hat = a @ W_dec + b_dec with a = top-k ReLU code; decoder rows are kept at unit norm by the trainer.

    `input_norm` and `subtract_b_dec` are the encoding options of a pretrained SAE (docs/methods.md §2); our own SAEs
    use the defaults (raw input, b_dec subtracted).
    """

    def __init__(self, d_in: int, d_sae: int, k: int, input_norm: str = "none", subtract_b_dec: bool = True):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm {input_norm!r} is not one of {INPUT_NORMS}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.input_norm, self.subtract_b_dec = input_norm, subtract_b_dec
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @property
    def config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "d_sae": self.d_sae, "k": self.k, "input_norm": self.input_norm,
                "subtract_b_dec": self.subtract_b_dec}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_activations(x, self.W_enc, self.b_enc, self.b_dec, self.k, self.input_norm, self.subtract_b_dec)

    def decode(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Sum of the k selected decoder rows (in the normalised input space); never forms the dense (B, d_sae) code."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x in x's own units."""
        _, scale, shift = normalise_input(x, self.input_norm)
        return self.decode(*self.encode(x)) * scale + shift

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def encode_topk(X: np.ndarray, W_enc: Any, b_enc: Any, b_dec: Any, k: int, batch_size: int = 1024,
                device: str = "cpu", input_norm: str = "none", subtract_b_dec: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Codes of all rows of X as fixed-width (N, k) arrays: int32 latent ids (ascending per row), float32 values.

    Works batch by batch so that at most (batch_size, d_sae) pre-activations exist at once.
    """
    weights = [torch.as_tensor(np.asarray(w) if not torch.is_tensor(w) else w.detach(), dtype=torch.float32).to(device)
               for w in (W_enc, b_enc, b_dec)]
    W_enc_t, b_enc_t, b_dec_t = weights
    if X.ndim != 2 or X.shape[1] != W_enc_t.shape[0]:
        raise ValueError(f"features have shape {X.shape}; the SAE expects (N, {W_enc_t.shape[0]})")
    indices = np.empty((len(X), k), dtype=np.int32)
    values = np.empty((len(X), k), dtype=np.float32)
    with torch.no_grad():
        for start in progress(range(0, len(X), batch_size), desc="sae encode"):
            x = torch.as_tensor(np.asarray(X[start:start + batch_size], dtype=np.float32)).to(device)
            idx, val = topk_activations(x, W_enc_t, b_enc_t, b_dec_t, k, input_norm, subtract_b_dec)
            indices[start:start + len(x)] = idx.cpu().numpy()
            values[start:start + len(x)] = val.cpu().numpy()
    return indices, values


def sae_quality(sae: TopKSAE, X: np.ndarray, batch_size: int = 1024, device: str = "cpu") -> dict[str, float]:
    """One pass over X: explained variance 1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖² (the Prisma quality figure) and the
    fraction of alive latents (non-zero on at least one row)."""
    mean = torch.as_tensor(X.mean(axis=0, dtype=np.float64), device=device)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    sse = sst = 0.0
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            x = torch.as_tensor(X[start:start + batch_size], dtype=torch.float32, device=device)
            indices, values = sae.encode(x)
            fired[indices[values != 0]] = True
            _, scale, shift = normalise_input(x, sae.input_norm)
            sse += float(((x - (sae.decode(indices, values) * scale + shift)) ** 2).sum(dtype=torch.float64))
            sst += float(((x.double() - mean) ** 2).sum())
    return {"explained_variance": 1.0 - sse / sst, "alive_fraction": float(fired.double().mean())}


def train_sae(X: np.ndarray, expansion: float, k: int, steps: int, batch_size: int, lr: float,
              seed: int, device: str = "cpu") -> tuple[TopKSAE, dict[str, Any]]:
    """Train a top-k SAE with Adam on the rows of X; deterministic on CPU given `seed` (random draws are
    made on the CPU generator, so a GPU run starts from the same initialisation and batch order).

    Inputs are divided by one scalar (the RMS norm of the centred rows divided by sqrt(d_in)) so that
    the learning rate means the same for every backbone; per-dimension standardisation is not used
    because it would change the geometry the SAE explains. The scale is folded back into b_enc and b_dec
    at the end (top-k and ReLU are positively homogeneous), so the returned SAE acts on raw features with
    the docs/methods.md §2 formula and its decoder rows stay unit norm. Initialisation: random unit decoder rows, W_enc =
    W_decᵀ (tied), b_enc = 0, b_dec = data mean.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"need a 2-D feature matrix with at least 2 rows, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("features contain non-finite values")
    n, d_in = X.shape
    generator = torch.Generator().manual_seed(seed)
    mean = X.mean(axis=0, dtype=np.float64)
    scale = float(np.sqrt(((X - mean) ** 2).sum(axis=1, dtype=np.float64).mean() / d_in))
    if scale == 0.0:
        raise ValueError("features are constant; nothing to explain")
    data = (torch.from_numpy(X) / scale).to(device)

    d_sae = int(round(expansion * d_in))  # < 1 gives an undercomplete dictionary: the demo's small function set
    if d_sae <= k:
        raise ValueError(f"expansion {expansion} gives d_sae={d_sae} latents for d_in={d_in}; need more than k={k}")
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(sae.d_sae, d_in, generator=generator))
        sae.normalise_decoder()
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(torch.as_tensor(mean / scale, dtype=torch.float32))
    sae.to(device)
    optimiser = torch.optim.Adam(sae.parameters(), lr=lr)

    batch_size = min(batch_size, n)
    order, cursor = torch.randperm(n, generator=generator), 0
    trace: list[dict[str, float]] = []
    log_every = max(1, steps // 20)
    for step in progress(range(steps), desc="sae train"):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        x = data[order[cursor:cursor + batch_size].to(device)]
        cursor += batch_size
        loss = ((sae(x) - x) ** 2).sum(dim=1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        sae.normalise_decoder()
        if step % log_every == 0 or step == steps - 1:
            trace.append({"step": step, "mse": loss.item() * scale ** 2 / d_in})

    sae.eval()
    with torch.no_grad():
        sae.b_enc.mul_(scale)
        sae.b_dec.mul_(scale)
    metrics = {
        **sae_quality(sae, X, batch_size, device),
        "quality_measured_on": "training rows",
        "input_scale": scale,
        "input_scaling": "one scalar (centred RMS / sqrt(d_in)), folded back into b_enc and b_dec",
        "n_rows": n, "d_in": d_in, "d_sae": sae.d_sae, "k": k, "expansion": expansion, "steps": steps,
        "batch_size": batch_size, "lr": lr, "seed": seed, "optimiser": "Adam", "device": device, "loss_trace": trace,
    }
    return sae.cpu(), metrics


def save_sae(path: str | os.PathLike, sae: TopKSAE, meta: Mapping[str, Any]) -> None:
    """Write plain tensors + plain config + JSON-safe meta, loadable with torch.load(weights_only=True) (docs/methods.md P-19)."""
    payload = {
        "weights": {name: getattr(sae, name).detach().cpu().clone() for name in WEIGHT_NAMES},
        "config": sae.config,
        "meta": json.loads(json.dumps(dict(meta), default=_json_default)),
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def load_sae(path: str | os.PathLike) -> tuple[TopKSAE, dict[str, Any]]:
    """Inverse of `save_sae`; returns the SAE (eval mode, on CPU) and its meta dict."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"SAE checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in ("weights", "config") if key not in payload]
    if missing:
        raise ValueError(f"{path} is not a metalign SAE checkpoint: it lacks {missing}")
    sae = TopKSAE(**payload["config"])
    sae.load_state_dict(payload["weights"])
    return sae.eval(), payload.get("meta", {})

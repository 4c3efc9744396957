"""Episode sampler, meta-learner and training loop on small planted data (docs/methods.md §4–§8)."""

from __future__ import annotations

import argparse
import json
import logging

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from metalign.config.model import TrainConfig
from metalign.functions.codes import Codes, write_codes
from metalign.functions.select import function_stats, max_episode_draw, select_functions
from metalign.io import DataContractError, file_sha256, read_h5, write_h5
from metalign.train import cli as train_cli
from metalign.train import sampler as sampler_module
from metalign.train.checkpoint import MODEL_FORMAT
from metalign.train.data import Features
from metalign.train.loop import METRIC_COLUMNS, train
from metalign.train.model import ModelConfig, build_model, load_encoder
from metalign.train.sampler import EpisodeSampler

D = 16
SMALL = dict(seed=7, sl=20, batch_size=32, lr=3e-3, log_every=5, n_eval_episodes_per_function=4, min_step=0,
             min_acc=0.0, min_delta=0.0, patience=1000, hidden=24, n_heads=4, dropout=0.1)


def planted(n: int, n_functions: int, seed: int, prefix: str) -> tuple[Features, Codes, dict]:
    """Features x ~ N(0, I); latent 3j+1 fires with magnitude x·w_j when positive, w_j near one shared direction.

    Latent 0 fires on only 5 images, so selection drops it and the sampler must ignore it.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    shared = np.random.default_rng(0).standard_normal(D)
    w = shared + 0.3 * rng.standard_normal((n_functions, D))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    latent = 3 * np.arange(n_functions) + 1
    values = np.concatenate([(np.arange(n) < 5)[:, None] * 1.0, np.maximum(x @ w.T, 0)], axis=1).astype(np.float32)
    indices = np.broadcast_to(np.concatenate([[0], latent]), values.shape).astype(np.int32)
    ids = [f"{prefix}{i:04d}" for i in range(n)]
    d_sae = int(latent.max()) + 1
    stats = function_stats(indices, values, d_sae)
    kept = select_functions(stats.nnz, min_nonzero=20, sl=40, n_images=n).latent_id
    codes = Codes(ids=ids, indices=indices, values=values, latent_id=kept, nnz=stats.nnz[kept], mean=stats.mean[kept],
                  std=stats.std[kept], attrs={"d_sae": d_sae})
    truth = {"dense": np.stack([values[:, 1 + (k - 1) // 3] for k in kept], axis=1), "kept": kept}
    return Features(ids, x), codes, truth


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add contention


@pytest.fixture(scope="module")
def data():
    return planted(400, 8, seed=1, prefix="tr"), planted(200, 6, seed=2, prefix="va")


# ------------------------------------------------------------------------------------------------- sampler


def test_sampler_statistics_labels_and_uniqueness(data):
    (_, codes, truth), _ = data
    assert list(truth["kept"]) == [3 * j + 1 for j in range(8)]  # latent 0 (5 images) was dropped
    sl = 40
    sampler = EpisodeSampler.from_codes(codes, sl=sl, seed=3)
    rows, labels, mags, mse_mask = sampler.sample(4000, step=0)
    assert rows.shape == labels.shape == mags.shape == (4000, sl) and rows.dtype == np.int64
    np.testing.assert_array_equal(mse_mask, labels)  # sparse targets: magnitudes are fitted on positives only
    n_pos = labels.sum(axis=1)
    # round(N(20, 2)): mean 20, sd sqrt(4 + 1/12)
    assert abs(n_pos.mean() - sl / 2) < 0.1 and abs(n_pos.std() - np.sqrt(4 + 1 / 12)) < 0.1
    assert n_pos.min() >= sl - max_episode_draw(sl) and n_pos.max() <= max_episode_draw(sl)
    assert all(len(set(r)) == sl for r in rows)
    # naive reference: the function of each episode is the one whose dense column matches every label
    batch = sampler.evaluation_set(n_per_function=50, seed=11)
    dense = truth["dense"][batch.rows, batch.functions[:, None]]
    np.testing.assert_array_equal(batch.labels, (dense > 0).astype(np.float32))
    np.testing.assert_array_equal(batch.mags, dense)
    assert np.array_equal(batch.functions, np.repeat(np.arange(8), 50))


# keyed subsets (≤ KEYED_NNZ·sl), draws with rejection, and negatives rejected so often that spares run out
@pytest.mark.parametrize("n_positives", [30, 150, 320])
def test_sampler_draws_uniformly_without_replacement(n_positives):
    """Every positive, and every other row as a negative, equally often (chi-square), despite redraws."""
    from scipy.stats import chisquare

    from metalign.train.sampler import KEYED_NNZ

    n, sl = 400, 20
    assert (n_positives > KEYED_NNZ * sl) == (n_positives >= 150)
    offsets, rows = np.array([0, n_positives]), np.sort(np.random.default_rng(2).permutation(n)[:n_positives])
    sampler = EpisodeSampler(offsets, rows, np.ones(n_positives), n, np.array([5]), sl=sl, seed=0)
    batch = sampler.evaluation_set(n_per_function=3000, seed=1)
    assert all(len(set(r)) == sl for r in batch.rows)
    positives = np.bincount(batch.rows[batch.labels == 1], minlength=n)
    negatives = np.bincount(batch.rows[batch.labels == 0], minlength=n)
    assert negatives[rows].sum() == 0
    assert chisquare(positives[rows]).pvalue > 1e-3
    assert chisquare(np.delete(negatives, rows)).pvalue > 1e-3
    # the test has power: a sampler that favoured low rows by up to 25 % would fail it
    assert chisquare(positives[rows] * np.linspace(1.25, 0.75, n_positives)).pvalue < 1e-3


def test_sampler_integers_are_exactly_uniform_and_never_read_past_the_words():
    """Lemire's multiply-shift with rejection: for n = 3·2^30 a plain multiply-shift gives the multiples of 3 half of
    the draws (two words each); rejecting the 2^32 mod n low products makes every value equally likely, at 4/3 words
    a draw. A rejected draw stops before the last `headroom` words and reports failure."""
    from metalign.train.episode_kernel import _below

    n = 3 << 30
    words = np.random.default_rng(0).integers(0, 1 << 32, 120_000, dtype=np.uint32)
    values, at = [], 0
    while at < len(words) - 2:
        value, at = _below(words, at, n, 2)
        values.append(value)
    values = np.array(values)
    assert values.min() >= 0 and values.max() < n
    naive = (words.astype(np.uint64) * np.uint64(n)) >> np.uint64(32)
    assert abs((naive % 3 == 0).mean() - 1 / 2) < 0.01              # the bias that rejection removes
    assert abs((values % 3 == 0).mean() - 1 / 3) < 0.01
    assert abs(len(words) / len(values) - 4 / 3) < 0.02
    zeros = np.array([0, 0, 0, 5], dtype=np.uint32)                   # a zero word is always rejected for this n
    assert tuple(_below(zeros, 0, n, 1)) == (-1, 3)                   # never reads the last word
    assert tuple(_below(zeros, 0, n, 0)) == (3, 4)                    # floor(5·3·2^30 / 2^32) = 3


def test_an_episode_cut_short_of_words_is_redone_even_without_negatives():
    """sl = 3 allows n_pos = sl (no negatives). A positive draw that fails for want of words must end the call at
    that episode (to be redone with more words), not return rows left in the scratch from an earlier episode."""
    from metalign.train.episode_kernel import fill_episodes

    sl, count, n_rows = 3, 13, 20              # 13 > 4·sl positives: drawn with rejection; 2^32 mod 13 = 9 rejects 0
    out = np.full((1, sl), -7, np.int64), np.zeros((1, sl), np.float32), np.zeros((1, sl), np.float32)
    stale = np.array([999, 888, 777], np.int64)
    done = fill_episodes(np.array([0, 1, 2, 3], np.uint32), 0, np.array([0]), np.array([sl]),
                         np.array([0, count]), np.arange(count, dtype=np.int64), np.ones(count, np.float32), n_rows,
                         4 * sl, np.zeros((0, 0), bool), *out, np.empty(4 * sl, np.int64),
                         seen := np.zeros(n_rows, np.uint8), stale, np.zeros(sl, np.float32), np.empty(sl, np.int64),
                         np.zeros(1, np.int64))
    assert tuple(done) == (0, 0) and (out[0] == -7).all() and not seen.any()


def test_dense_labels_must_match_the_positive_lists():
    """Labels that call more rows positive than the lists would leave short and long functions with different
    negatives (or none to draw): refused when the sampler is built."""
    n, sl = 200, 20
    rows = np.arange(0, n, 2)
    labels = np.zeros((n, 1), bool)
    labels[rows, 0] = True
    dense = np.where(labels, 1.0, -1.0).astype(np.float32)
    args = (np.array([0, len(rows)]), rows, np.ones(len(rows)), n, np.array([9]), sl, 0, 0, "neuron codes", dense)
    EpisodeSampler(*args, labels, np.array([True]))
    labels[1, 0] = True
    with pytest.raises(DataContractError, match="neuron codes: dense labels disagree with the positive lists"):
        EpisodeSampler(*args, labels, np.array([True]))


def test_sampler_determinism_and_ranks(data, monkeypatch):
    (_, codes, _), _ = data
    a, b = (EpisodeSampler.from_codes(codes, sl=20, seed=3) for _ in range(2))
    for x, y in zip(a.sample(16, step=5), b.sample(16, step=5)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.sample(1100, step=2, threads=1), b.sample(1100, step=2, threads=3)):  # 3 blocks of episodes
        np.testing.assert_array_equal(x, y)
    expected = a.sample(1100, step=2)
    monkeypatch.setattr(sampler_module, "WORDS_PER_TOKEN", 0)  # 16 words a block: nearly every episode runs short,
    for x, y in zip(expected, b.sample(1100, step=2, threads=2)):  # is redone after more words: the same episodes
        np.testing.assert_array_equal(x, y)
    monkeypatch.undo()
    other_rank = EpisodeSampler.from_codes(codes, sl=20, seed=3, rank=1).sample(16, step=5)
    assert not np.array_equal(a.sample(16, step=5).rows, other_rank.rows)
    assert not np.array_equal(a.sample(16, step=5).rows, a.sample(16, step=6).rows)
    e1, e2 = a.evaluation_set(2, seed=9), EpisodeSampler.from_codes(codes, sl=20, seed=99, rank=2).evaluation_set(2, 9)
    np.testing.assert_array_equal(e1.rows, e2.rows)
    monkeypatch.setattr(sampler_module, "CHUNK", 3)                    # several blocks, cut word streams: same episodes
    sets = []
    for words in (2, 0):
        monkeypatch.setattr(sampler_module, "WORDS_PER_TOKEN", words)
        sets.append(EpisodeSampler.from_codes(codes, sl=20, seed=3).evaluation_set(3, seed=9))
    for x, y in zip(*sets):
        np.testing.assert_array_equal(x, y)


def test_sampler_mixes_keyed_and_drawn_functions(monkeypatch):
    """A batch of functions with few and with many positives: valid episodes, the same for any threads or passes."""
    n, sl = 400, 20
    rng = np.random.default_rng(4)
    lists = [np.sort(rng.permutation(n)[:count]) for count in (30, 200, 60, 320)]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in lists])])
    sampler = EpisodeSampler(offsets, np.concatenate(lists), rng.uniform(1, 2, offsets[-1]), n, np.arange(4), sl=sl,
                             seed=5)
    rows, labels, mags, mse_mask = sampler.sample(1500, step=1)
    functions = np.concatenate([sampler._rng(0, 0, 1, block).integers(0, 4, size=size)
                                for block, size in enumerate((512, 512, 476))])
    assert set(functions) == {0, 1, 2, 3}
    member = np.array([[row in set(lists[j]) for row in episode] for j, episode in zip(functions, rows)])
    np.testing.assert_array_equal(labels, member.astype(np.float32))
    np.testing.assert_array_equal(mse_mask, labels)
    assert all(len(set(r)) == sl for r in rows) and (mags[labels == 0] == 0).all() and (mags[labels == 1] >= 1).all()
    monkeypatch.setattr(sampler_module, "WORDS_PER_TOKEN", 0)
    for x, y in zip((rows, labels, mags), sampler.sample(1500, step=1, threads=2)):
        np.testing.assert_array_equal(x, y)


def test_sampler_rejects_function_that_cannot_fill_episodes():
    with pytest.raises(DataContractError, match="latent id 42"):
        EpisodeSampler(np.array([0, 5]), np.arange(5), np.ones(5), 100, np.array([42]), sl=20, seed=0)


# ------------------------------------------------------------------------------------------------- model


def small_model(hidden: int = 24) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(d_in=D, hidden=hidden, n_layers=2, n_heads=4, use_mlp=True, mlp_size=32), 1.7)


def test_causal_masking():
    model = small_model().eval()
    x, mags = torch.randn(2, 12, D), torch.rand(2, 12)
    logits, mag = model(x, mags)
    x2, mags2 = x.clone(), mags.clone()
    x2[:, 5] += 1.0
    mags2[:, 5] += 1.0  # enters token 6 only (teacher forcing)
    logits2, mag2 = model(x2, mags2)
    torch.testing.assert_close(logits[:, :5], logits2[:, :5])
    torch.testing.assert_close(mag[:, :5], mag2[:, :5])
    assert not torch.allclose(logits[:, 5:], logits2[:, 5:])


def test_rotary_matches_complex_rotation_and_serves_training_after_inference():
    """RoPE against the 2×2 rotation of each pair (2i, 2i+1) by t θ_i written out in numpy (float64), on a strided
    view as the attention passes it; the phases cached by an inference_mode forward must serve a later forward that
    trains."""
    from metalign.train.model import rotary

    qkv = torch.randn(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)    # (3, batch, heads, T, head_dim), not contiguous
    x = qkv[:2]
    t, theta = np.arange(7)[:, None], 10000.0 ** (-np.arange(0, 8, 2) / 8)
    cos, sin = np.cos(t * theta), np.sin(t * theta)
    even, odd = x.double().numpy()[..., 0::2], x.double().numpy()[..., 1::2]
    expected = np.empty(x.shape)
    expected[..., 0::2], expected[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    with torch.inference_mode():
        np.testing.assert_allclose(rotary(x, 10000.0).double().numpy(), expected, rtol=1e-5, atol=1e-5)
    model = small_model().train()
    with torch.inference_mode():                 # first use of this length: the angles are cached here
        model(torch.randn(2, 13, D), torch.rand(2, 13))
    logits, _ = model(torch.randn(2, 13, D), torch.rand(2, 13))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.core.parameters())


@pytest.mark.parametrize("model_type", ["transformer", "lstm", "static_linear"])
def test_bfloat16_autocast_step_tracks_float32(model_type):
    """The training step's mixed precision (forward under bfloat16 autocast, the hurdle loss in float32 outside it, as
    in the loop on CUDA), run under CPU autocast: outputs and gradients follow the float32 step to bfloat16 accuracy
    (8 mantissa bits: a few 1e-3 relative), the loss stays float32 and every gradient is float32 and finite."""
    torch.manual_seed(0)
    static = model_type == "static_linear"
    extra = {"n_functions": 3} if static else {"n_layers": 2, "n_heads": 4, "use_mlp": True, "mlp_size": 32}
    model = build_model(ModelConfig(d_in=D, hidden=24, model_type=model_type, **extra), 1.7).eval()  # no dropout
    shape = (4, 3) if static else (4, 11)                  # (images, functions) or (episodes, tokens)
    x = torch.randn(4, D) if static else torch.randn(4, 11, D)
    labels = (torch.rand(shape) > 0.5).float()
    mags = labels * torch.rand(shape) * 3

    def step(autocast: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, mag_pred = model(x) if static else model(x, mags)
        loss, _, _ = model.loss(logits, mag_pred, labels, mags, labels)
        loss.backward()
        return logits, loss, [p.grad.clone() for p in model.parameters()]

    logits32, loss32, grads32 = step(False)
    logits16, loss16, grads16 = step(True)
    assert logits16.dtype == torch.bfloat16 and logits32.dtype == torch.float32  # the autocast took effect
    assert loss16.dtype == torch.float32 and all(g.dtype == torch.float32 and g.isfinite().all() for g in grads16)
    torch.testing.assert_close(logits16.float(), logits32, rtol=0.03, atol=0.03)   # measured: <= 0.007 of ~1
    assert abs(loss16.item() - loss32.item()) < 0.01 * abs(loss32.item())           # measured: <= 0.0014
    flat32, flat16 = torch.cat([g.ravel() for g in grads32]), torch.cat([g.ravel() for g in grads16])
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.9995     # measured: >= 0.99999


def test_encode_is_embed_of_zero_and_x_with_free_hidden_size():
    model = small_model(hidden=40)
    assert model.embed.in_features == D + 1 and model.embed.out_features == 40
    x = torch.randn(7, D)
    z = model.encode(x)
    assert z.shape == (7, 40)
    torch.testing.assert_close(z, model.embed(torch.cat([torch.zeros(7, 1), x], dim=1)))
    torch.testing.assert_close(z, x @ model.embed.weight[:, 1:].T + model.embed.bias)
    assert ModelConfig(d_in=D, n_heads=4).hidden == D


def test_hurdle_loss_matches_formula():
    model = small_model()
    with torch.no_grad():
        model.loss_log_var.copy_(torch.tensor([0.3, -0.2]))
    logits, pred = torch.randn(3, 5), torch.rand(3, 5)
    labels = (torch.rand(3, 5) > 0.5).float()
    mags = labels * torch.rand(3, 5)
    loss, bce, mse = model.loss(logits, pred, labels, mags, labels)
    ref_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    ref_mse = ((pred - mags)[labels == 1] ** 2).mean()  # raw magnitudes (the study), not sigma_m units
    torch.testing.assert_close(loss, np.exp(-0.3) * ref_bce + 0.5 * np.exp(0.2) * ref_mse + 0.5 * 0.1)
    torch.testing.assert_close(mse, ref_mse)


def test_hurdle_loss_is_the_studys_on_raw_magnitudes():
    """The study's loss (bin/train.py, BaseMetaLearner.compute_loss): exp(−s1)·BCE + 0.5·exp(−s2)·MSE + 0.5·(s1 + s2),
    s1 = s2 = 0 at initialisation, MSE of raw magnitudes over the positives, the magnitude head read in raw units.
    Hand-built: logits 0 (BCE ln 2), positive m = 3 predicted 1, negative predicted 5, sigma_m = 2."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_in=D, hidden=24, n_heads=4), 2.0)
    assert model.config.mag_units == "raw" and torch.equal(model.loss_log_var.detach(), torch.zeros(2))
    logits, pred = torch.zeros(1, 2), torch.tensor([[1.0, 5.0]])
    labels, mags = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    loss, bce, mse = (t.detach() for t in model.loss(logits, pred, labels, mags, labels))
    assert float(bce) == pytest.approx(np.log(2)) and float(mse) == pytest.approx(4.0)  # (1 − 3)², not ((1 − 3)/2)²
    assert float(loss) == pytest.approx(np.log(2) + 0.5 * 4.0)
    with torch.no_grad():
        model.loss_log_var.copy_(torch.tensor([0.3, -0.2]))
    loss = model.loss(logits, pred, labels, mags, labels)[0].detach()
    assert float(loss) == pytest.approx(np.exp(-0.3) * np.log(2) + 0.5 * np.exp(0.2) * 4.0 + 0.5 * 0.1, rel=1e-6)
    # the magnitude head's output is the raw prediction (not × sigma_m); sigma_m scales only the previous-magnitude input
    model.eval()
    captured = {}
    model.mag_head.register_forward_hook(lambda module, args, out: captured.update(out=out))
    _, magnitude = model(torch.randn(2, 6, D), torch.rand(2, 6))
    torch.testing.assert_close(magnitude, captured["out"].squeeze(-1))

    # option `magnitude_units: sigma` (ours before): residuals in sigma_m units, the head × sigma_m
    option = build_model(ModelConfig(d_in=D, hidden=24, n_heads=4, magnitude_units="sigma"), 2.0)
    loss, _, mse = (t.detach() for t in option.loss(logits, pred, labels, mags, labels))
    assert float(mse) == pytest.approx(1.0) and float(loss) == pytest.approx(np.log(2) + 0.5 * 1.0)
    # static_linear: the study fitted each function in its own std units, which stays its default
    assert ModelConfig(d_in=D, model_type="static_linear", n_functions=3).mag_units == "sigma"
    with pytest.raises(ValueError, match="magnitude_units 'log'"):
        ModelConfig(d_in=D, n_heads=4, magnitude_units="log")


def test_checkpoints_without_magnitude_units_load_in_sigma_units():
    """Checkpoints written before `magnitude_units` existed were trained in sigma_m units and load as such."""
    from metalign.train.model import model_from_checkpoint

    model = build_model(ModelConfig(d_in=D, hidden=24, n_heads=4, magnitude_units="sigma"), 1.7)
    config = model.config.to_dict()
    del config["magnitude_units"]
    loaded = model_from_checkpoint({"model_config": config, "sigma_m": 1.7, "state_dict": model.state_dict()})
    assert loaded.config.mag_units == "sigma"
    x, mags = torch.randn(2, 5, D), torch.rand(2, 5)
    torch.testing.assert_close(loaded(x, mags)[1], model.eval()(x, mags)[1])


def _step(mags: list[float], preds: list[float]) -> tuple:
    """A hand-built evaluation batch: the given positives, then as many negatives (magnitude 0, not fitted)."""
    from metalign.train.tasks import Step

    n = len(mags)
    labels = torch.tensor([1.0] * n + [0.0] * n)
    step = Step(torch.arange(2 * n), labels, torch.tensor(mags + [0.0] * n), labels.clone())
    return torch.where(labels > 0, 3.0, -3.0), torch.tensor(preds + [0.0] * n), step


def test_selection_r2_is_the_positive_weighted_mean_of_batch_r2():
    """The study's eval R² (bin/train.py, utils.calc_r2): each batch's R² over its positives, 0 for a batch with < 2
    positives, averaged with the batches' positive counts as weights. Option `r2_average: pooled` pools every output."""
    from metalign.train.loop import MetricSums

    batches = [_step([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]),  # mean 2, SS 2, SSE 1: R² 0.5, weight 3
               _step([10.0, 12.0], [11.0, 12.0]),         # mean 11, SS 2, SSE 1: R² 0.5, weight 2
               _step([5.0], [0.0])]                       # one positive: R² 0, weight 1
    scores = {}
    for average in ("batch", "pooled"):
        sums = MetricSums(torch.device("cpu"), average)
        for logits, preds, step in batches:
            sums.add(logits, preds, step, torch.tensor(1.0))
        scores[average] = sums.summary(torch.zeros(2))
    assert scores["batch"]["r2"] == pytest.approx((0.5 * 3 + 0.5 * 2 + 0.0 * 1) / 6)
    m, p = np.array([1, 2, 3, 10, 12, 5.0]), np.array([1, 2, 4, 11, 12, 0.0])
    assert scores["pooled"]["r2"] == pytest.approx(1 - ((m - p) ** 2).sum() / ((m - m.mean()) ** 2).sum())
    assert scores["batch"]["acc"] == 1.0 and scores["batch"]["score"] == pytest.approx(0.5 + 0.5 * 2.5 / 6)
    assert TrainConfig().r2_average == "batch"


def _trace(config: TrainConfig, trace: list[tuple[int, float]]) -> tuple[list[int], list[int], int | None]:
    """Runs `_select` over a scripted validation trace of (1-based step, S) at accuracy 0.7: the steps that save a new
    best, the patience count after each evaluation and the step that stops training."""
    from metalign.train.loop import _select, _State

    state, saved, stale = _State(), [], []
    for step, score in trace:
        improved, stop = _select(state, step, {"score": score, "acc": 0.7}, config)
        saved += [step] if improved else []
        stale.append(state.stale)
        if stop:
            return saved, stale, step
    return saved, stale, None


def test_selection_rule_is_the_studys():
    """The study (bin/train.py): with the 0-based step counter t, early stopping is active once t ≥ 1000 and acc ≥ 0.6,
    i.e. from the evaluation at (1-based) step 1100; while active a new best is saved only on an improvement > 0.001."""
    trace = [(900, 0.6000), (1000, 0.6005), (1100, 0.6008), (1200, 0.6020)] + \
            [(step, 0.6020) for step in range(1300, 2400, 100)]
    saved, stale, stopped = _trace(TrainConfig(), trace)
    assert saved == [900, 1000, 1200]  # 1000 is not yet active (any increase saves); 1100's +0.0003 does not save
    assert stale[:4] == [0, 0, 1, 0] and stopped == 2200  # ten evaluations without improvement after 1200
    # options: save on any increase (save_rule: any) and start at step 1000 (min_step: 999) = the previous rule
    saved, stale, stopped = _trace(TrainConfig(save_rule="any", min_step=999), trace)
    assert saved == [900, 1000, 1100, 1200] and stale[:4] == [0, 1, 2, 0] and stopped == 2200
    with pytest.raises(ValueError, match="save_rule 'best'"):
        TrainConfig(save_rule="best")


# ------------------------------------------------------------------------------------------------- training


def test_training_learns_planted_task(data, tmp_path):
    (xt, ct, _), (xv, cv, _) = data
    result = train({**SMALL, "steps": 150, "eval_every": 50, "checkpoint_every": 50}, xt, ct, xv, cv,
                   tmp_path / "m.pt", tmp_path / "m.csv")
    metrics = pd.read_csv(tmp_path / "m.csv")
    assert tuple(metrics.columns) == METRIC_COLUMNS
    tr, va = metrics[metrics.split == "train"], metrics[metrics.split == "val"]
    assert list(va.step) == [50, 100, 150]
    assert tr.loss.iloc[-5:].mean() < tr.loss.iloc[:2].mean() - 0.3
    assert va.acc.max() > 0.8 and va.r2.max() > 0.3  # chance accuracy is 0.5
    assert result.best_step == int(va.step[va.score.idxmax()])
    assert not (tmp_path / "m.last.pt").exists()

    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ckpt["format"] == MODEL_FORMAT and ckpt["step"] == result.best_step
    assert ckpt["scores"]["score"] == pytest.approx(va.score.max())
    assert ckpt["kept_latent_ids"].tolist() == ct.latent_id.tolist()
    assert json.loads(json.dumps(ckpt["model_config"]))["hidden"] == 24
    assert not any(k.startswith("_orig_mod.") for k in ckpt["state_dict"])
    z = load_encoder(tmp_path / "m.pt")(xv.values)
    assert z.shape == (200, 24) and z.dtype == np.float32
    w, b = ckpt["state_dict"]["embed.weight"], ckpt["state_dict"]["embed.bias"]
    np.testing.assert_allclose(z, xv.values @ w[:, 1:].numpy().T + b.numpy(), rtol=1e-5, atol=1e-5)


def test_identical_runs_write_identical_bytes(data, tmp_path):
    """Provenance that hashes a checkpoint must not change on an identical retrain, whatever the output's name."""
    (xt, ct, _), (xv, cv, _) = data
    cfg = {**SMALL, "steps": 20, "eval_every": 10, "checkpoint_every": 10}
    train(cfg, xt, ct, xv, cv, tmp_path / "a" / "m.pt", tmp_path / "a" / "m.csv")
    train(cfg, xt, ct, xv, cv, tmp_path / "b" / "other.pt", tmp_path / "b" / "other.csv")
    assert file_sha256(tmp_path / "a" / "m.pt") == file_sha256(tmp_path / "b" / "other.pt")
    ma, mb = (pd.read_csv(path) for path in (tmp_path / "a" / "m.csv", tmp_path / "b" / "other.csv"))
    pd.testing.assert_frame_equal(ma.drop(columns="elapsed_s"), mb.drop(columns="elapsed_s"))  # wall clock only


def test_resume_gives_identical_weights_and_provenance(data, tmp_path, monkeypatch, caplog):
    (xt, ct, _), (xv, cv, _) = data
    cfg = {**SMALL, "steps": 40, "eval_every": 10, "checkpoint_every": 7}
    with caplog.at_level(logging.INFO, logger="metalign.train.loop"):
        straight = train(cfg, xt, ct, xv, cv, tmp_path / "a.pt", tmp_path / "a.csv")
    evaluations = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [m.split(":")[0] for m in evaluations] == [f"step {s}/40" for s in (10, 20, 30, 40)]
    assert all(" loss " in m and " acc " in m and "elapsed" in m for m in evaluations)

    original = EpisodeSampler.sample

    def crash(self, batch_size, step, **kwargs):
        if step == 31:
            raise RuntimeError("killed")
        return original(self, batch_size, step, **kwargs)

    monkeypatch.setattr(EpisodeSampler, "sample", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, xt, ct, xv, cv, tmp_path / "b.pt", tmp_path / "b.csv")
    assert torch.load(tmp_path / "b.last.pt", weights_only=True)["step"] == 28
    assert not (tmp_path / "b.pt").exists()
    # the rows of every evaluation so far are in the metrics file while training runs (here: after it died at 31)
    ma = pd.read_csv(tmp_path / "a.csv").drop(columns="elapsed_s")
    live = pd.read_csv(tmp_path / "b.csv").drop(columns="elapsed_s")
    pd.testing.assert_frame_equal(live, ma[ma.step <= 30])
    monkeypatch.setattr(EpisodeSampler, "sample", original)
    resumed = train(cfg, xt, ct, xv, cv, tmp_path / "b.pt", tmp_path / "b.csv")

    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "ab")
    assert a["step"] == b["step"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # the recorded hash is of step 1's batch, not of the first batch the resumed process drew (step 29)
    assert b["first_batch_sha256"] == a["first_batch_sha256"]
    assert file_sha256(tmp_path / "a.pt") == file_sha256(tmp_path / "b.pt")
    mb = pd.read_csv(tmp_path / "b.csv").drop(columns="elapsed_s")
    pd.testing.assert_frame_equal(ma, mb)  # rows of steps 29-30 written before the crash are not duplicated
    assert not (tmp_path / "b.last.pt").exists()

    # a `.last.pt` written under another config is not resumed: the run starts afresh
    monkeypatch.setattr(EpisodeSampler, "sample", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, xt, ct, xv, cv, tmp_path / "c.pt", tmp_path / "c.csv")
    monkeypatch.setattr(EpisodeSampler, "sample", original)
    changed = {**cfg, "lr": 1e-3}
    fresh = train(changed, xt, ct, xv, cv, tmp_path / "c.pt", tmp_path / "c.csv")
    reference = train(changed, xt, ct, xv, cv, tmp_path / "d.pt", tmp_path / "d.csv")
    assert all(torch.equal(v, reference.model.state_dict()[k]) for k, v in fresh.model.state_dict().items())
    mc, md = (pd.read_csv(tmp_path / f"{n}.csv").drop(columns="elapsed_s") for n in "cd")
    pd.testing.assert_frame_equal(mc, md)  # the rows of the abandoned run are gone


def test_early_stopping(data, tmp_path):
    (xt, ct, _), (xv, cv, _) = data
    cfg = {**SMALL, "steps": 100, "eval_every": 5, "checkpoint_every": 100, "min_delta": 10.0, "patience": 2}
    result = train(cfg, xt, ct, xv, cv, tmp_path / "m.pt", tmp_path / "m.csv")
    assert result.stopped_early and result.last_step == 15  # first evaluation sets the best, two more fail


def test_id_mismatch_names_the_id(data, tmp_path):
    (xt, ct, _), (xv, cv, _) = data
    broken = Features(xt.ids[:-1] + ["stray"], xt.values)
    with pytest.raises(DataContractError, match="'tr0399'"):
        train({**SMALL, "steps": 1}, broken, ct, xv, cv, tmp_path / "m.pt", tmp_path / "m.csv")
    with pytest.raises(DataContractError, match="'stray'"):
        train({**SMALL, "steps": 1}, Features(xt.ids + ["stray"], np.vstack([xt.values, xt.values[:1]])), ct, xv, cv,
              tmp_path / "m.pt", tmp_path / "m.csv")
    with pytest.raises(ValueError, match="unknown key"):
        train({**SMALL, "stepz": 1}, xt, ct, xv, cv, tmp_path / "m.pt", tmp_path / "m.csv")


def test_cli_train_and_encode(data, tmp_path):
    (xt, ct, _), (xv, cv, _) = data
    paths = {}
    for name, (x, codes) in {"train": (xt, ct), "val": (xv, cv)}.items():
        order = np.random.default_rng(0).permutation(len(x.ids))  # features stored in another row order
        write_h5(tmp_path / f"{name}_x.h5", {"features": x.values[order]}, np.array(x.ids)[order], {"model": "toy"})
        write_codes(tmp_path / f"{name}_c.h5", codes.ids, codes.indices, codes.values, codes.attrs["d_sae"],
                    min_nonzero=20, sl=20, provenance={})
        paths[name] = (tmp_path / f"{name}_x.h5", tmp_path / f"{name}_c.h5")
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    params = json.dumps({**SMALL, "steps": 10, "eval_every": 5, "checkpoint_every": 5})
    args = parser.parse_args([
        "train", "--train-features", str(paths["train"][0]), "--train-codes", str(paths["train"][1]),
        "--val-features", str(paths["val"][0]), "--val-codes", str(paths["val"][1]), "--params", params,
        "--out-ckpt", str(tmp_path / "m.pt"), "--out-metrics", str(tmp_path / "m.csv"), "--device", "cpu"])
    args.func(args)
    args = parser.parse_args(["encode", "--ckpt", str(tmp_path / "m.pt"), "--features", str(paths["val"][0]),
                              "--out", str(tmp_path / "z.h5"), "--device", "cpu"])
    args.func(args)
    arrays, ids, attrs = read_h5(tmp_path / "z.h5")
    order = np.random.default_rng(0).permutation(len(xv.ids))  # the stored row order of the val features
    assert ids == list(np.array(xv.ids)[order]) and arrays["features"].dtype == np.float32
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    w, b = ckpt["state_dict"]["embed.weight"].numpy(), ckpt["state_dict"]["embed.bias"].numpy()
    assert w.shape == (24, D + 1)  # embed([m, x]): column 0 reads the previous magnitude, 0 when encoding
    np.testing.assert_allclose(arrays["features"], xv.values[order] @ w[:, 1:].T + b, rtol=1e-5, atol=1e-5)
    assert attrs["checkpoint_step"] == ckpt["step"]
    assert attrs["model_config"]["d_in"] == D and attrs["source_attrs"]["model"] == "toy"
    with h5py.File(tmp_path / "z.h5") as handle:
        assert set(handle) == {"features", "ids"}

    # features of another width: the error names the checkpoint and both widths, and nothing is written
    write_h5(tmp_path / "wide.h5", {"features": np.zeros((5, D + 3), np.float32)}, list("abcde"), {})
    args = parser.parse_args(["encode", "--ckpt", str(tmp_path / "m.pt"), "--features", str(tmp_path / "wide.h5"),
                              "--out", str(tmp_path / "wide_z.h5"), "--device", "cpu"])
    with pytest.raises(DataContractError, match=rf"m\.pt: encoder expects \(N, {D}\) features, got \(5, {D + 3}\)"):
        args.func(args)
    assert not (tmp_path / "wide_z.h5").exists()


@pytest.mark.parametrize("params, message", [
    ('{"steps": 10,', r"^--params is neither a JSON object nor a JSON file: Expecting"),
    ("[1, 2]", r"^--params must be a JSON object, got list"),
    ("scalar.json", r"^--params file scalar\.json must be a JSON object, got int"),
    ("broken.json", r"^--params file broken\.json is not valid JSON: Expecting"),
    ("absent.json", r"^--params 'absent\.json' is neither a JSON object nor a JSON file"),
])
def test_cli_train_rejects_bad_params(tmp_path, monkeypatch, params, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scalar.json").write_text("7")
    (tmp_path / "broken.json").write_text('{"steps": 10')
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--train-features", "tx.h5", "--train-codes", "tc.h5", "--val-features", "vx.h5",
                              "--val-codes", "vc.h5", "--params", params, "--out-ckpt", "m.pt",
                              "--out-metrics", "m.csv", "--device", "cpu"])
    with pytest.raises(ValueError, match=message):
        args.func(args)
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.csv").exists()

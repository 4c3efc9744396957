"""Model variants (docs/methods.md §5, §8, §12): encode() of each, LSTM and no-embed sequence models, static_linear,
weight decay on the embedding, dense (neuron) targets, and in-context-learning curves."""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import pytest
import torch

from metalign.config.model import TrainConfig
from metalign.functions.codes import Codes, read_codes, write_codes, write_neurons
from metalign.functions.select import function_stats, select_functions
from metalign.io import DataContractError, write_h5
from metalign.train import cli as train_cli
from metalign.train import figures as train_figures
from metalign.train import icl
from metalign.train.data import Features
from metalign.train.loop import train
from metalign.train.model import ModelConfig, build_model, load_encoder, model_from_checkpoint, parameter_groups
from tests.test_figures import keep_saved_figures

D = 16
FAST = dict(seed=7, sl=20, batch_size=32, lr=3e-3, log_every=5, n_eval_episodes_per_function=4, min_step=0,
            min_acc=0.0, min_delta=0.0, patience=1000, hidden=24, n_heads=4, eval_every=50, checkpoint_every=1000)
VARIANTS = {
    "main": {}, "lstm": {"model_type": "lstm"}, "mlp": {"use_mlp": True, "mlp_size": 32}, "2layers": {"n_layers": 2},
    "8heads": {"hidden": 32, "n_heads": 8}, "h40": {"hidden": 40}, "static_linear": {"model_type": "static_linear"},
    "noemb": {"no_embed": True, "hidden": D},
}


def planted_pair(n_functions: int = 6, seed: int = 0) -> dict[str, tuple[Features, Codes]]:
    """Train and validation splits of the same planted functions: latent 2j+1 fires with magnitude relu(x·w_j),
    w_j near one shared direction (which a sequence model can learn across episodes)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(D) + 0.3 * rng.standard_normal((n_functions, D))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    latent = 2 * np.arange(n_functions) + 1
    out = {}
    for split, n in (("train", 400), ("val", 240)):
        x = rng.standard_normal((n, D)).astype(np.float32)
        values = np.maximum(x @ w.T, 0).astype(np.float32)
        indices = np.broadcast_to(latent, values.shape).astype(np.int32)
        stats = function_stats(indices, values, 2 * n_functions)
        kept = select_functions(stats.nnz, 20, 20, n).latent_id
        ids = [f"{split}{i:04d}" for i in range(n)]
        codes = Codes(ids=ids, latent_id=kept, nnz=stats.nnz[kept], mean=stats.mean[kept], std=stats.std[kept],
                      attrs={"d_sae": 2 * n_functions, "n_columns": 2 * n_functions}, indices=indices, values=values)
        out[split] = (Features(ids, x), codes)
    return out


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add contention


@pytest.fixture(scope="module")
def data():
    return planted_pair()


def fit(data, tmp_path, name: str, steps: int = 150, **overrides):
    (xt, ct), (xv, cv) = data["train"], data["val"]
    result = train({**FAST, "steps": steps, **overrides}, xt, ct, xv, cv, tmp_path / f"{name}.pt",
                   tmp_path / f"{name}.csv")
    return result, tmp_path / f"{name}.pt"


# ------------------------------------------------------------------------------------------------- encode()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encode_shape_of_every_variant(variant):
    config = TrainConfig.from_dict({**FAST, **VARIANTS[variant]})
    model_config = ModelConfig.from_dict(config.model_dict(D, n_functions=5))
    torch.manual_seed(0)
    model = build_model(model_config, 1.3 if model_config.episodic else np.full(5, 1.3)).eval()
    x = torch.randn(7, D)
    if variant == "noemb":
        assert not any(name.startswith("embed") for name, _ in model.named_parameters())
        with pytest.raises(ValueError, match="no representation to encode"):
            model.encode(x)
        logits, mags = model(torch.randn(2, 9, D), torch.rand(2, 9))
        assert logits.shape == mags.shape == (2, 9)
        return
    z = model.encode(x)
    assert z.shape == (7, model_config.hidden)
    if variant == "static_linear":
        torch.testing.assert_close(z, torch.nn.functional.layer_norm(model.embed(x), (model_config.hidden,),
                                                                     model.embed_norm.weight, model.embed_norm.bias))
        logits, mags = model(x)
        assert logits.shape == mags.shape == (7, 5)
    else:  # every sequence variant is evaluated through embed([0, x]) alone (docs/methods.md §8)
        torch.testing.assert_close(z, model.embed(torch.cat([torch.zeros(7, 1), x], dim=1)))
        logits, mags = model(torch.randn(2, 9, D), torch.rand(2, 9))
        assert logits.shape == mags.shape == (2, 9)


def test_lstm_is_causal_and_config_errors():
    model = build_model(ModelConfig(d_in=D, hidden=12, model_type="lstm", n_layers=2), 1.0).eval()
    x, mags = torch.randn(2, 10, D), torch.rand(2, 10)
    logits, _ = model(x, mags)
    x2 = x.clone()
    x2[:, 6] += 1.0
    logits2, _ = model(x2, mags)
    torch.testing.assert_close(logits[:, :6], logits2[:, :6])
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:])
    with pytest.raises(ValueError, match="no_embed needs"):
        ModelConfig(d_in=D, hidden=24, n_heads=4, no_embed=True)
    with pytest.raises(ValueError, match="n_functions"):
        ModelConfig(d_in=D, model_type="static_linear")
    with pytest.raises(ValueError, match="is not one of"):
        ModelConfig(d_in=D, model_type="gru")
    # the same checks where the workflow validates its config (before D is known, without torch)
    with pytest.raises(ValueError, match="model_type 'gru'"):
        TrainConfig.from_dict({"model_type": "gru"})
    with pytest.raises(ValueError, match="no_embed applies to sequence models"):
        TrainConfig.from_dict({"model_type": "static_linear", "no_embed": True})
    with pytest.raises(ValueError, match=r"hidden \(24\) / n_heads \(16\)"):
        TrainConfig.from_dict({"hidden": 24})


def test_weight_decay_reaches_the_embedding_only_when_asked(data, tmp_path):
    model = build_model(ModelConfig(d_in=D, hidden=24, n_heads=4), 1.0)
    spared = {id(p) for p in parameter_groups(model, 0.1)[1]["params"]}
    assert id(model.embed.weight) in spared and id(model.embed.bias) in spared and len(spared) == 2
    assert id(model.core.blocks[0].attn.qkv.weight) not in spared
    spared = {id(p) for p in parameter_groups(model, 0.1, decay_embed=True)[1]["params"]}
    assert id(model.embed.weight) not in spared and not spared

    norms = {}
    for decay_embed in (False, True):
        result, _ = fit(data, tmp_path, f"wd{decay_embed}", steps=40, weight_decay=10.0, decay_embed=decay_embed)
        norms[decay_embed] = float(result.model.embed.weight.detach().norm())
    assert norms[True] < 0.6 * norms[False]


def test_weight_decay_reaches_the_loss_weights_as_in_the_study():
    """The study (bin/train.py) spared only `embed.*` from decay, so the learned loss weights s1, s2 were decayed;
    option `decay_loss_weights: false` spares them."""
    model = build_model(ModelConfig(d_in=D, hidden=24, n_heads=4), 1.0)
    config = TrainConfig.from_dict({**FAST, "weight_decay": 1e-4})
    groups = parameter_groups(model, config.weight_decay, config.decay_embed, config.decay_loss_weights)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and id(model.loss_log_var) in decayed
    assert id(model.embed.weight) not in decayed
    groups = parameter_groups(model, 1e-4, decay_loss_weights=False)
    assert id(model.loss_log_var) in {id(p) for p in groups[1]["params"]} and groups[1]["weight_decay"] == 0.0
    # static_linear: the study's rule spared only a sequence model's `embed.*` (its static layer was `proj`)
    static = build_model(ModelConfig(d_in=D, hidden=24, model_type="static_linear", n_functions=3), np.ones(3))
    assert not parameter_groups(static, 1e-4)[1]["params"]


def _study_config() -> dict:
    import yaml

    from tests.conftest import REPO

    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_study_width_is_the_backbones():
    """The study's meta-learner is as wide as its backbone (hidden: null): for the 1024-d MAE the embed maps
    1025 → 1024 with 16 heads of 64; only the width sweep h128/h256/h512 sets a width, and the heads of every
    variant split every backbone's width into even head widths."""
    from metalign.config.backbones import output_dim
    from metalign.config.schema import variant_params

    config = _study_config()
    dims = {name: output_dim(config, name) for name in config["backbones"]}
    assert dims["mae"] == 1024 and dims["clip"] == 768
    sweep = {"h128": 128, "h256": 256, "h512": 512}
    for variant in config["variants"]:
        params = TrainConfig.from_dict(variant_params(config, variant))
        for backbone, dim in dims.items():
            model = ModelConfig.from_dict(params.model_dict(dim, n_functions=7))
            assert model.hidden == sweep.get(variant, dim), (variant, backbone)
            assert (model.hidden // model.n_heads) % 2 == 0 and model.hidden % model.n_heads == 0
    main = TrainConfig.from_dict(variant_params(config, "main"))
    model = build_model(ModelConfig.from_dict(main.model_dict(1024, 1)), 1.0)
    assert (model.embed.in_features, model.embed.out_features) == (1025, 1024)
    assert model.config.hidden // model.config.n_heads == 64


def test_static_linear_sees_distinct_images_per_step(data):
    """The study's static_linear drew 4096 distinct images per step (a distributed sampler over the finite image set,
    4 GPUs × 1024, epochs reshuffled); here every step's global batch is distinct images, epochs are permutations,
    ranks split the step's batch, and the draws are seeded."""
    from metalign.config.schema import variant_params
    from metalign.train.tasks import StaticTask

    assert variant_params(_study_config(), "static_linear")["batch_size"] == 4096
    (xt, ct), (xv, cv) = data["train"], data["val"]
    config = TrainConfig.from_dict({**FAST, "model_type": "static_linear", "batch_size": 64})
    task = StaticTask(config, xt.values, ct, xv.values, cv, 0, 1, torch.device("cpu"))
    assert task.steps_per_epoch == 400 // 64
    epoch = [task.sample(64, step) for step in range(1, 7)]
    assert all(len(np.unique(rows)) == 64 for rows in epoch)
    assert len(np.unique(np.concatenate(epoch))) == 6 * 64  # no image twice within an epoch
    assert not np.array_equal(task.sample(64, 7), epoch[0])  # the next epoch is reshuffled
    again = StaticTask(config, xt.values, ct, xv.values, cv, 0, 1, torch.device("cpu"))
    np.testing.assert_array_equal(again.sample(64, 3), epoch[2])  # seeded, independent of call order (resume)
    ranks = [StaticTask(config, xt.values, ct, xv.values, cv, r, 2, torch.device("cpu")).sample(32, 3) for r in (0, 1)]
    np.testing.assert_array_equal(np.sort(np.concatenate(ranks)), np.sort(epoch[2]))  # ranks split the global batch
    with pytest.raises(DataContractError, match="only 400"):
        StaticTask(TrainConfig.from_dict({**config.to_dict(), "batch_size": 401}), xt.values, ct, xv.values, cv, 0, 1,
                   torch.device("cpu"))



# ------------------------------------------------------------------------------------------------- training


def test_static_linear_learns_all_functions_per_image(data, tmp_path):
    result, path = fit(data, tmp_path, "static", steps=200, model_type="static_linear", lr=1e-2)
    assert result.best_scores["acc"] > 0.85 and result.best_scores["r2"] > 0.5
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model_config"]["n_functions"] == 6 and len(ckpt["sigma_m"]) == 6
    np.testing.assert_allclose(ckpt["sigma_m"], data["train"][1].std, rtol=1e-6)
    z = load_encoder(path)(data["val"][0].values)
    assert z.shape == (240, 24)
    state = ckpt["state_dict"]
    standard = (z - state["embed_norm.bias"].numpy()) / state["embed_norm.weight"].numpy()  # r = LayerNorm(Wx + c)
    np.testing.assert_allclose(standard.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(standard.std(axis=1), 1, atol=1e-3)
    with pytest.raises(ValueError, match="sees no episodes"):
        icl.icl_curves(ckpt, data["val"][0], data["val"][1], 2, 0)


def test_lstm_and_neuron_targets_learn(data, tmp_path):
    result, _ = fit(data, tmp_path, "lstm", steps=150, model_type="lstm")
    assert result.best_scores["acc"] > 0.75
    # dense targets: the neurons of a planted representation y = x·W (median split), magnitudes fitted everywhere
    rng = np.random.default_rng(5)
    W = (rng.standard_normal((D, 1)) + 0.3 * rng.standard_normal((D, 4))).astype(np.float32)
    splits = {}
    for split, (features, _) in data.items():
        write_neurons(tmp_path / f"{split}_raw.h5", features.ids, features.values @ W, 20, 20, {})
        splits[split] = (features, read_codes(tmp_path / f"{split}_raw.h5"))
    assert splits["train"][1].function_dense().all()
    result, _ = fit(splits, tmp_path, "raw", steps=150)
    assert result.best_scores["acc"] > 0.8 and result.best_scores["r2"] > 0.5


# ------------------------------------------------------------------------------------------------- ICL


def reference_icl(ckpt: dict, x: np.ndarray, rows: np.ndarray, labels: np.ndarray, mags: np.ndarray) -> dict:
    """ICL curves written out from docs/methods.md §5/§8: token t is [m_{t-1}/sigma_m, x_t] (m_0 = 0) through the
    checkpoint's own layers, one forward pass, then accuracy of 1[σ(ℓ) > .5] and the two MSEs per position."""
    model = model_from_checkpoint(ckpt)
    sigma = float(ckpt["sigma_m"])
    previous = np.concatenate([np.zeros((len(mags), 1), np.float32), mags[:, :-1]], axis=1) / sigma
    features = torch.from_numpy(x[rows])
    with torch.no_grad():
        if model.config.no_embed:  # the token is x_t + w·m_{t-1}/sigma_m + b
            tokens = features + model.previous(torch.from_numpy(previous[..., None].astype(np.float32)))
        else:
            tokens = model.embed(torch.cat([torch.from_numpy(previous[..., None].astype(np.float32)), features], -1))
        h = model.ln_f(model.core(tokens))
        logit = model.logit_head(h)[..., 0].numpy()
        scale = sigma if model.config.mag_units == "sigma" else 1.0
        mag_pred = model.mag_head(h)[..., 0].numpy() * scale
    positive = labels > 0
    squared = (mag_pred.astype(np.float64) - mags) ** 2
    return {"acc": ((1 / (1 + np.exp(-logit)) > 0.5) == positive).mean(axis=0),
            "mse_pos": np.array([squared[positive[:, t], t].mean() for t in range(rows.shape[1])]),
            "mse_all": squared.mean(axis=0), "n_pos": positive.sum(axis=0), "mag_pred": mag_pred}


def test_icl_curves_fixed_episodes_and_figure(data, tmp_path, monkeypatch):
    _, main = fit(data, tmp_path, "main", steps=150)
    _, noemb = fit(data, tmp_path, "noemb", steps=60, no_embed=True, hidden=D)
    features, codes = data["val"]
    ckpt = torch.load(main, weights_only=True)
    curves = icl.icl_curves(ckpt, features, codes, n_per_function=30, seed=3)
    episodes = curves["episodes"]
    assert episodes.rows.shape == (180, 20) and curves["acc"].shape == (20,)
    # the episodes are the codes: function j's label and magnitude at each row (planted latent 2j+1 = column j)
    column = (codes.latent_id[episodes.functions] - 1) // 2
    np.testing.assert_array_equal(episodes.mags, codes.values[episodes.rows, column[:, None]])
    np.testing.assert_array_equal(episodes.labels, episodes.mags > 0)
    reference = reference_icl(ckpt, features.values, episodes.rows, episodes.labels, episodes.mags)
    np.testing.assert_array_equal(curves["acc"], reference["acc"])
    np.testing.assert_allclose(curves["mag_pred"], reference["mag_pred"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curves["mse_pos"], reference["mse_pos"], rtol=1e-5)
    np.testing.assert_allclose(curves["mse_all"], reference["mse_all"], rtol=1e-5)
    np.testing.assert_array_equal(curves["n_pos"], reference["n_pos"])
    assert reference["acc"].mean() > 0.8 and reference["acc"][1:].min() > 0.6  # chance: 0.5

    # the same episodes for another model and another backbone (other features, same image ids in another order)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    train_cli.register(sub)
    other_values = np.random.default_rng(1).standard_normal((240, D)).astype(np.float32)
    other_backbone = tmp_path / "other.h5"
    write_h5(other_backbone, {"features": other_values}, features.ids[::-1], {})
    write_h5(tmp_path / "val.h5", {"features": features.values}, features.ids, {})
    write_codes(tmp_path / "val_codes.h5", codes.ids, codes.indices, codes.values, 12, 20, 20, {})
    runs = {"main": (main, features.values), "noemb": (noemb, features.values), "other": (main, other_values[::-1])}
    outputs, expected = [], {}
    for name, (ckpt_path, aligned) in runs.items():
        feature_path = other_backbone if name == "other" else tmp_path / "val.h5"
        out = tmp_path / "icl" / name / "model.h5"
        args = parser.parse_args(["icl-eval", "--ckpt", str(ckpt_path), "--features", str(feature_path), "--codes",
                                  str(tmp_path / "val_codes.h5"), "--out", str(out), "--n-per-function", "30",
                                  "--seed", "3", "--device", "cpu"])
        args.func(args)
        outputs.append(out)
        expected[name] = reference_icl(torch.load(ckpt_path, weights_only=True), np.ascontiguousarray(aligned),
                                       episodes.rows, episodes.labels, episodes.mags)
        with h5py.File(out) as handle:
            np.testing.assert_array_equal(handle["episodes/rows"][:], episodes.rows)
            np.testing.assert_array_equal(handle["episodes/labels"][:], episodes.labels)
            np.testing.assert_array_equal(handle["acc"][:], expected[name]["acc"])
            np.testing.assert_allclose(handle["mse_pos"][:], expected[name]["mse_pos"], rtol=1e-5)
            np.testing.assert_allclose(handle["mse_all"][:], expected[name]["mse_all"], rtol=1e-5)
            assert handle["outputs/prob"].shape == (180, 20)
            hash_ = handle.attrs["episodes_sha256"]
        assert hash_ == expected.setdefault("hash", hash_)
    assert expected["other"]["acc"].mean() < 0.7 < expected["main"]["acc"].mean()  # noise features carry no function

    # the figure plots exactly these curves: one row per backbone, one column per curve, one line per variant
    drawn = keep_saved_figures(monkeypatch, train_figures)
    args = parser.parse_args(["figure-icl", "--inputs", *map(str, outputs), "--out", str(tmp_path / "icl.png")])
    args.func(args)
    (fig,) = drawn
    axes = np.array(fig.axes[:9]).reshape(3, 3)
    for row, name in enumerate(sorted(runs)):
        for col, curve in enumerate(icl.CURVES):
            (line,) = [line for line in axes[row, col].get_lines() if line.get_gid() == f"{name}/model"]
            np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 21))
            np.testing.assert_allclose(line.get_ydata(), expected[name][curve], rtol=1e-5)
    # noemb has no representation: encode fails with a clear message
    args = parser.parse_args(["encode", "--ckpt", str(noemb), "--features", str(tmp_path / "val.h5"),
                              "--out", str(tmp_path / "z.h5"), "--device", "cpu"])
    with pytest.raises(ValueError, match="no_embed=true has no embed layer"):
        args.func(args)
    assert not (tmp_path / "z.h5").exists()

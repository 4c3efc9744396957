"""Functions stage: top-k encoder vs a dense reference, SAE training on a planted dictionary, statistics,
selection, code files and the CLI."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from metalign.functions.cli import register
from metalign.functions.codes import check_codes, read_codes, write_codes
from metalign.functions.sae import TopKSAE, encode_topk, load_sae, save_sae, train_sae
from metalign.functions.select import function_stats, max_episode_draw, select_functions
from metalign.io import DataContractError, write_h5

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only add contention


def random_weights(d_in: int = 16, d_sae: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.standard_normal((d_in, d_sae)).astype(np.float32),
            "b_enc": (rng.standard_normal(d_sae) - 5.0).astype(np.float32),  # some top-k values are negative -> 0
            "W_dec": rng.standard_normal((d_sae, d_in)).astype(np.float32),
            "b_dec": rng.standard_normal(d_in).astype(np.float32)}


def naive_codes(X: np.ndarray, w: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense reference: full pre-activation, argsort, keep the k largest, ReLU, sort by latent id."""
    h = (X.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    ordered = np.sort(h, axis=1)
    assert (ordered[:, -k] - ordered[:, -k - 1] > 1e-4).all(), "test data must be free of near-ties at the k-th value"
    top = np.sort(np.argsort(-h, axis=1)[:, :k], axis=1)
    return top, np.maximum(np.take_along_axis(h, top, axis=1), 0)


def planted_data(n: int = 8192, d: int = 32, atoms: int = 64, active: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    support = np.argsort(rng.random((n, atoms)), axis=1)[:, :active]
    codes = np.zeros((n, atoms))
    np.put_along_axis(codes, support, rng.uniform(0.5, 1.5, (n, active)), axis=1)
    return (codes @ dictionary).astype(np.float32), dictionary


# ----------------------------------------------------------------------------------------------- encoder


def test_encode_matches_dense_reference():
    w, k = random_weights(), 8
    X = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    indices, values = encode_topk(X, w["W_enc"], w["b_enc"], w["b_dec"], k, batch_size=64)
    ref_indices, ref_values = naive_codes(X, w, k)
    assert indices.dtype == np.int32 and values.dtype == np.float32 and indices.shape == (300, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-5)
    assert (np.diff(indices, axis=1) > 0).all()
    assert (values == 0).any() and (values > 0).any()  # ReLU after top-k is exercised


def test_encode_is_batch_size_invariant_and_matches_module():
    w, k = random_weights(seed=3), 5
    X = np.random.default_rng(4).standard_normal((257, 16)).astype(np.float32)
    small = encode_topk(X, w["W_enc"], w["b_enc"], w["b_dec"], k, batch_size=7)
    large = encode_topk(X, w["W_enc"], w["b_enc"], w["b_dec"], k, batch_size=1000)
    np.testing.assert_array_equal(small[0], large[0])
    np.testing.assert_allclose(small[1], large[1], rtol=1e-6, atol=1e-6)
    sae = TopKSAE(16, 48, k)
    sae.load_state_dict({name: torch.from_numpy(array) for name, array in w.items()})
    indices, values = sae.encode(torch.from_numpy(X))
    np.testing.assert_array_equal(indices.numpy(), large[0])
    dense = np.zeros((257, 48), dtype=np.float32)
    np.put_along_axis(dense, large[0], large[1], axis=1)
    np.testing.assert_allclose(sae(torch.from_numpy(X)).detach().numpy(), dense @ w["W_dec"] + w["b_dec"],
                               rtol=1e-5, atol=1e-5)


def test_encode_rejects_wrong_width():
    w = random_weights()
    with pytest.raises(ValueError, match="expects"):
        encode_topk(np.zeros((3, 15), np.float32), w["W_enc"], w["b_enc"], w["b_dec"], 4)


# ----------------------------------------------------------------------------------------------- training


def test_trainer_recovers_planted_dictionary():
    X, dictionary = planted_data()
    X = X * 3.0 + 2.0  # the scalar input scaling and the mean initialisation are folded back correctly
    sae, metrics = train_sae(X, expansion=4, k=4, steps=1000, batch_size=256, lr=3e-3, seed=0)
    assert metrics["explained_variance"] > 0.9
    learned = sae.W_dec.detach().numpy()
    np.testing.assert_allclose(np.linalg.norm(learned, axis=1), 1.0, atol=1e-5)
    assert (dictionary @ learned.T).max(axis=1).min() > 0.9  # every planted atom has a learned twin

    # the reported explained variance is that of the raw-feature SAE under the docs/methods.md §2 formula
    weights = {name: getattr(sae, name).detach().numpy() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    indices, values = encode_topk(X, weights["W_enc"], weights["b_enc"], weights["b_dec"], 4)
    dense = np.zeros((len(X), sae.d_sae))
    np.put_along_axis(dense, indices, values, axis=1)
    residual = X - (dense @ weights["W_dec"] + weights["b_dec"])
    expected = 1 - (residual ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert metrics["explained_variance"] == pytest.approx(expected, abs=1e-4)
    # alive = latents non-zero on at least one training row, out of d_sae
    assert metrics["alive_fraction"] == (dense != 0).any(axis=0).sum() / sae.d_sae


def test_trainer_is_deterministic_given_seed():
    X = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    first, m1 = train_sae(X, expansion=2, k=3, steps=30, batch_size=64, lr=1e-3, seed=7)
    second, m2 = train_sae(X, expansion=2, k=3, steps=30, batch_size=64, lr=1e-3, seed=7)
    other, _ = train_sae(X, expansion=2, k=3, steps=30, batch_size=64, lr=1e-3, seed=8)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert m1 == m2
    assert not torch.equal(first.W_dec, other.W_dec)


def test_trainer_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        train_sae(np.full((10, 4), np.nan, np.float32), 2, 2, 1, 4, 1e-3, 0)
    with pytest.raises(ValueError, match="constant"):
        train_sae(np.ones((10, 4), np.float32), 2, 2, 1, 4, 1e-3, 0)


def test_save_load_round_trip_weights_only(tmp_path):
    w = random_weights()
    sae = TopKSAE(16, 48, 6, input_norm="layer_norm", subtract_b_dec=False)
    sae.load_state_dict({name: torch.from_numpy(array) for name, array in w.items()})
    path = tmp_path / "sae.pt"
    save_sae(path, sae, {"n": np.int64(3), "ev": np.float32(0.5), "source": {"path": tmp_path / "f.h5"}})
    payload = torch.load(path, weights_only=True)
    assert payload["config"] == {"d_in": 16, "d_sae": 48, "k": 6, "input_norm": "layer_norm", "subtract_b_dec": False}
    loaded, meta = load_sae(path)
    assert (loaded.input_norm, loaded.subtract_b_dec) == ("layer_norm", False)
    assert meta == {"n": 3, "ev": 0.5, "source": {"path": str(tmp_path / "f.h5")}}
    for name, array in w.items():
        np.testing.assert_array_equal(getattr(loaded, name).detach().numpy(), array)
    assert os.listdir(tmp_path) == ["sae.pt"]  # atomic write leaves no temporary file


# ----------------------------------------------------------------------------------------------- statistics


def random_codes(n: int = 400, d_sae: int = 30, k: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    popularity = rng.random(d_sae) ** 3 + 1e-3  # skewed: some latents rare, a few never used
    popularity[:3] = 0
    indices = np.sort(np.stack([rng.choice(d_sae, k, replace=False, p=popularity / popularity.sum())
                                for _ in range(n)]), axis=1).astype(np.int32)
    values = rng.exponential(1.0, (n, k)).astype(np.float32)
    values[rng.random((n, k)) < 0.1] = 0  # ReLU zeros inside the top-k are not positives
    return indices, values


def test_stats_equal_dense_computation():
    indices, values = random_codes()
    stats = function_stats(indices, values, d_sae=30)
    dense = np.zeros((len(indices), 30))
    np.put_along_axis(dense, indices, values, axis=1)
    nnz = (dense != 0).sum(0)
    np.testing.assert_array_equal(stats.nnz, nnz)
    for j in np.flatnonzero(nnz):
        column = dense[:, j][dense[:, j] != 0]
        assert stats.mean[j] == pytest.approx(column.mean(), rel=1e-9)
        assert stats.std[j] == pytest.approx(column.std(), rel=1e-9, abs=1e-12)
    assert (stats.mean[nnz == 0] == 0).all() and (stats.std[nnz == 0] == 0).all()


def test_max_episode_draw():
    assert max_episode_draw(120) == 84  # ceil(60 + 4 * 6)
    assert max_episode_draw(1) == 1 and max_episode_draw(2) == 2 and max_episode_draw(10) == 7
    draws = np.clip(np.round(np.random.default_rng(0).normal(60, 6, 200_000)), 0, 120)
    assert ((draws <= 84) & (draws >= 120 - 84)).mean() > 0.9999
    with pytest.raises(ValueError):
        max_episode_draw(0)


def test_select_functions_edge_cases():
    #            below   at-min  too few negatives  ok   never  exactly fillable negatives
    nnz = np.array([119, 120, 1000 - 83, 500, 0, 1000 - 84])
    selection = select_functions(nnz, min_nonzero=120, sl=120, n_images=1000)
    np.testing.assert_array_equal(selection.latent_id, [1, 3, 5])
    assert selection.latent_id.dtype == np.int64
    assert (selection.n_below_min, selection.n_dropped, selection.max_draw) == (1, 1, 84)

    # min_nonzero below sl: the coupling check (docs/methods.md P-16) drops functions that cannot fill an episode
    selection = select_functions(np.array([10, 83, 84, 90]), min_nonzero=10, sl=120, n_images=1000)
    np.testing.assert_array_equal(selection.latent_id, [2, 3])
    assert selection.n_dropped == 2

    with pytest.raises(ValueError, match="no function survives.*min_nonzero=120"):
        select_functions(np.array([5, 119]), min_nonzero=120, sl=120, n_images=1000)
    with pytest.raises(ValueError, match="84 negatives"):
        select_functions(np.array([950]), min_nonzero=120, sl=120, n_images=1000)
    with pytest.raises(ValueError, match="n_images"):
        select_functions(np.array([1001]), min_nonzero=120, sl=120, n_images=1000)


# ----------------------------------------------------------------------------------------------- code files


def test_code_file_round_trip(tmp_path):
    indices, values = random_codes()
    ids = [f"img{i:04d}" for i in range(len(indices))]
    path = tmp_path / "codes.h5"
    selection = write_codes(path, ids, indices, values, d_sae=30, min_nonzero=40, sl=20,
                            provenance={"source": {"path": "features.h5", "attrs": {"layer": 11}}, "sae": {"k": 6}})
    codes = read_codes(path)
    assert codes.ids == ids
    np.testing.assert_array_equal(codes.indices, indices)
    np.testing.assert_array_equal(codes.values, values)
    stats = function_stats(indices, values, 30)
    kept = np.flatnonzero((stats.nnz >= 40) & (stats.nnz >= max_episode_draw(20))
                          & (len(ids) - stats.nnz >= max_episode_draw(20)))
    np.testing.assert_array_equal(codes.latent_id, kept)
    np.testing.assert_array_equal(selection.latent_id, kept)
    np.testing.assert_array_equal(codes.nnz, stats.nnz[kept])
    np.testing.assert_allclose(codes.std, stats.std[kept])
    assert codes.attrs["d_sae"] == 30 and codes.attrs["k"] == 6 and codes.attrs["sl"] == 20
    assert codes.attrs["min_nonzero"] == 40 and codes.attrs["n_dropped"] == selection.n_dropped
    assert codes.attrs["source"] == {"path": "features.h5", "attrs": {"layer": 11}}
    assert "numpy" in codes.attrs["library_versions"]

    # kept columns and per-function positive lists agree with a dense computation
    dense = np.zeros((len(ids), 30))
    np.put_along_axis(dense, indices, values, axis=1)
    columns = codes.kept_columns()
    for f, latent in enumerate(codes.latent_id):
        assert ((columns == f).sum(axis=1) == (dense[:, latent] != 0)).all()
    assert codes.kept_mask().sum() == codes.nnz.sum()
    offsets, rows, magnitudes = codes.by_function()
    for f, latent in enumerate(codes.latent_id):
        expected_rows = np.flatnonzero(dense[:, latent])
        np.testing.assert_array_equal(rows[offsets[f]:offsets[f + 1]], expected_rows)
        np.testing.assert_array_equal(magnitudes[offsets[f]:offsets[f + 1]], dense[expected_rows, latent])


def test_check_codes_errors_name_the_source(tmp_path):
    indices, values = random_codes(n=5)
    ids = list("abcde")
    bad = indices.copy()
    bad[2] = bad[2][::-1]
    with pytest.raises(DataContractError, match=r"codes\.h5.*row 2.*'c'"):
        check_codes(bad, values, 30, ids, "codes.h5")
    with pytest.raises(DataContractError, match="d_sae=20"):
        check_codes(indices, values, 20, ids, "codes.h5")
    with pytest.raises(DataContractError, match="not unique"):
        check_codes(indices, values, 30, list("abcda"), "codes.h5")
    without_functions = tmp_path / "without_functions.h5"
    write_h5(without_functions, {"indices": indices, "values": values}, ids, {"d_sae": 30})
    with pytest.raises(DataContractError, match=r"without_functions\.h5 lacks.*functions/latent_id"):
        read_codes(without_functions)


# ----------------------------------------------------------------------------------------------- CLI


def cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_train_encode_select(tmp_path):
    X, _ = planted_data(n=2000, d=16, atoms=24, active=3, seed=5)
    ids = [f"coco/{i}.jpg" for i in range(len(X))]
    features = tmp_path / "features.h5"
    write_h5(features, {"features": X}, ids, {"model_id": "planted", "layer": 11})
    sae_path, codes_path, metrics = tmp_path / "sae.pt", tmp_path / "codes.h5", tmp_path / "metrics.json"
    cli(["sae-train", "--features", str(features), "--out", str(sae_path), "--expansion", "2", "--k", "3",
         "--steps", "200", "--batch-size", "256", "--lr", "3e-3", "--seed", "1", "--metrics", str(metrics)])
    sae, meta = load_sae(sae_path)
    assert meta["features"]["attrs"]["model_id"] == "planted" and meta["metrics"]["seed"] == 1
    # the metrics file: the quality of the saved SAE on the training rows, recomputed from its weights
    written = json.loads(metrics.read_text())
    assert written == meta["metrics"]
    assert [written[key] for key in ("n_rows", "d_in", "d_sae", "k", "steps")] == [2000, 16, 32, 3, 200]
    weights = {name: getattr(sae, name).detach().numpy() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    indices, values = encode_topk(X, weights["W_enc"], weights["b_enc"], weights["b_dec"], 3)  # = naive_codes (above)
    dense = np.zeros((len(X), 32))
    np.put_along_axis(dense, indices, values, axis=1)
    residual = X - (dense @ weights["W_dec"] + weights["b_dec"])
    assert written["explained_variance"] == pytest.approx(1 - (residual ** 2).sum() / ((X - X.mean(0)) ** 2).sum(),
                                                          abs=1e-4)
    assert written["explained_variance"] > 0.5
    assert written["alive_fraction"] == (dense != 0).any(axis=0).mean()
    trace = written["loss_trace"]
    assert trace[0]["step"] == 0 and trace[-1]["step"] == 199 and trace[-1]["mse"] < 0.5 * trace[0]["mse"]

    cli(["sae-encode", "--sae", str(sae_path), "--features", str(features), "--out", str(codes_path),
         "--min-nonzero", "50", "--sl", "40"])
    codes = read_codes(codes_path)
    assert codes.ids == ids and codes.indices.shape == (2000, 3)
    reference = encode_topk(X, sae.W_enc, sae.b_enc, sae.b_dec, 3)
    np.testing.assert_array_equal(codes.indices, reference[0])
    assert codes.attrs["d_sae"] == 32 and codes.attrs["source"]["attrs"]["model_id"] == "planted"
    assert codes.attrs["sae"]["config"] == {"d_in": 16, "d_sae": 32, "k": 3, "input_norm": "none", "subtract_b_dec": True}


def test_cli_errors_name_the_file(tmp_path):
    features = tmp_path / "no_features.h5"
    write_h5(features, {"embeddings": np.zeros((4, 3), np.float32)}, list("abcd"), {})
    with pytest.raises(DataContractError, match=r"no_features\.h5.*features"):
        cli(["sae-train", "--features", str(features), "--out", str(tmp_path / "sae.pt")])
    assert not (tmp_path / "sae.pt").exists()

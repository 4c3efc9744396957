"""Function sets: pretrained Prisma SAEs, neurons (median split), random and similarity subsets, config resolution."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from metalign.config.datasets import check_dataset, concat_parts, dataset_splits
from metalign.config.functions import members, resolve_function_sets
from metalign.config.schema import ConfigError
from metalign.functions.cli import register
from metalign.functions.codes import neuron_targets, read_codes, write_codes, write_neurons
from metalign.functions.prisma import load_pretrained_sae
from metalign.functions.sae import load_sae
from metalign.functions.subsets import mean_pairwise, random_subset, similarity_matrix, similarity_subset
from metalign.io import DataContractError, write_h5
from metalign.train.sampler import EpisodeSampler


def cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    args.func(args)


# ----------------------------------------------------------------------------------------------- Prisma SAEs


@dataclasses.dataclass
class LegacyConfig:
    """Stands in for ViT-Prisma's pickled VisionModelSAERunnerConfig (a class the loader must not need): the fields a
    recent version pickles that bear on encoding, and a few training-only ones."""

    model_name: str = "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"
    hook_point_layer: int = 11
    layer_subtype: str = "hook_resid_post"
    hook_point_head_index: int | None = None
    cls_token_only: bool = True
    architecture: str = "standard"
    d_in: int = 12
    expansion_factor: int = 4
    activation_fn_str: str = "topk"
    activation_fn_kwargs: dict = dataclasses.field(default_factory=lambda: {"k": 5})
    normalize_activations: str = "none"
    is_transcoder: bool = False
    _device: str = "cpu"
    _dtype: str = "float32"
    lr: float = 0.0004
    b_dec_init_method: str = "geometric_median"


class Payload:
    """Unpickling this with a plain unpickler would run a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def legacy_file(path, d_in: int = 12, d_sae: int = 48, prefix: str = "sae.", config=None, seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = {"W_enc": rng.standard_normal((d_in, d_sae)), "b_enc": rng.standard_normal(d_sae) - 2,
               "W_dec": rng.standard_normal((d_sae, d_in)), "b_dec": rng.standard_normal(d_in)}
    state = collections.OrderedDict((prefix + name, torch.tensor(w, dtype=torch.float32)) for name, w in weights.items())
    state[prefix + "threshold"] = torch.zeros(1)  # extra tensors are ignored
    torch.save({"cfg": LegacyConfig(d_in=d_in) if config is None else config, "state_dict": state}, path)
    return {name: w.astype(np.float32) for name, w in weights.items()}


def prisma_reference(X, w, cfg: LegacyConfig):
    """ViT-Prisma's SparseAutoencoder.encode/decode written out in float64 (independent of our encoder): input
    normalisation, b_dec subtraction, pre-activations, top-k then ReLU scattered into a dense code, reconstruction."""
    x = X.astype(np.float64)
    scale, shift = np.ones((len(x), 1)), np.zeros((len(x), 1))
    if cfg.normalize_activations == "constant_norm_rescale":
        coeff = np.sqrt(cfg.d_in) / np.linalg.norm(x, axis=1, keepdims=True)
        x, scale = x * coeff, 1 / coeff
    elif cfg.normalize_activations == "layer_norm":
        shift = x.mean(axis=1, keepdims=True)
        scale = (x - shift).std(axis=1, ddof=1, keepdims=True)
        x = (x - shift) / (scale + 1e-5)
    if getattr(cfg, "apply_b_dec_to_input", True):
        x = x - w["b_dec"]
    h = x @ w["W_enc"] + w["b_enc"]
    top = np.argsort(-h, axis=1)[:, :cfg.activation_fn_kwargs["k"]]
    dense = np.zeros_like(h)
    np.put_along_axis(dense, top, np.maximum(np.take_along_axis(h, top, axis=1), 0), axis=1)
    return dense, (dense @ w["W_dec"] + w["b_dec"]) * scale + shift


def dense_codes(indices, values, d_sae):
    dense = np.zeros((len(indices), d_sae))
    np.put_along_axis(dense, indices.astype(np.int64), values, axis=1)
    return dense


@dataclasses.dataclass
class SAELensStyleConfig(LegacyConfig):
    apply_b_dec_to_input: bool = False


@pytest.mark.parametrize("cfg", [LegacyConfig(), LegacyConfig(normalize_activations="layer_norm"),
                                 LegacyConfig(normalize_activations="constant_norm_rescale"),
                                 SAELensStyleConfig(normalize_activations="layer_norm")],
                         ids=["none", "layer_norm", "constant_norm_rescale", "layer_norm-no-b_dec"])
def test_prisma_legacy_file_encodes_like_prismas_forward(tmp_path, cfg):
    """Every config field that changes encoding is applied: our codes equal ViT-Prisma's formula (docs/methods.md §2)."""
    weights = legacy_file(tmp_path / "weights.pt", config=cfg)
    X = (np.random.default_rng(1).standard_normal((300, 12)) * 3 + 1).astype(np.float32)
    ids = [f"coco/{i}.jpg" for i in range(300)]
    write_h5(tmp_path / "cls11.h5", {"features": X}, ids, {"layer": "11", "pooling": "cls"})
    cli(["sae-import", "--weights", str(tmp_path / "weights.pt"), "--out", str(tmp_path / "sae.pt"), "--k", "5",
         "--repo", "Prisma-Multimodal/sae-top_k-64-cls_only-layer_11-hook_resid_post", "--revision", "abc123"])
    sae, meta = load_sae(tmp_path / "sae.pt")
    assert sae.config == {"d_in": 12, "d_sae": 48, "k": 5, "input_norm": cfg.normalize_activations,
                          "subtract_b_dec": getattr(cfg, "apply_b_dec_to_input", True)}
    assert (meta["pretrained"]["hook"], meta["pretrained"]["layer"]) == ("blocks.11.hook_resid_post", 11)
    cli(["sae-encode", "--sae", str(tmp_path / "sae.pt"), "--features", str(tmp_path / "cls11.h5"),
         "--out", str(tmp_path / "codes.h5"), "--min-nonzero", "10", "--sl", "8"])
    codes = read_codes(tmp_path / "codes.h5")
    reference, reconstruction = prisma_reference(X, weights, cfg)
    np.testing.assert_allclose(dense_codes(codes.indices, codes.values, 48), reference, rtol=1e-4, atol=1e-4)
    assert (np.diff(codes.indices, axis=1) > 0).all()
    with torch.no_grad():
        np.testing.assert_allclose(sae(torch.from_numpy(X)).numpy(), reconstruction, rtol=1e-4, atol=1e-3)
    attrs = codes.attrs
    assert (attrs["d_sae"], attrs["k"], attrs["layer"], attrs["hook"]) == (48, 5, 11, "blocks.11.hook_resid_post")
    assert attrs["sae_repo"].startswith("Prisma-Multimodal/") and attrs["sae_revision"] == "abc123"
    write_h5(tmp_path / "cls6.h5", {"features": X}, ids, {"layer": "6", "pooling": "cls"})
    with pytest.raises(DataContractError, match="reads block 11.*block 6"):
        cli(["sae-encode", "--sae", str(tmp_path / "sae.pt"), "--features", str(tmp_path / "cls6.h5"),
             "--out", str(tmp_path / "codes6.h5")])


@pytest.mark.parametrize("change, field", [
    ({"surprise_scale": 2.0}, "surprise_scale"),                          # unknown field
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    ({"activation_fn_str": "relu"}, "activation_fn_str"),
    ({"activation_fn_kwargs": {"k": 5, "postact_fn": "gelu"}}, "activation_fn_kwargs.postact_fn"),
    ({"architecture": "gated"}, "architecture"),
    ({"is_transcoder": True}, "is_transcoder"),
    ({"layer_subtype": "hook_mlp_out"}, "layer_subtype"),
    ({"hook_point_head_index": 3}, "hook_point_head_index"),
    ({"expansion_factor": 8}, "expansion_factor"),
    ({"_dtype": "float16"}, "_dtype"),
    ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input"),
])
def test_prisma_config_field_unknown_or_unsupported_is_named(tmp_path, change, field):
    config = {**dataclasses.asdict(LegacyConfig()), **change}
    legacy_file(tmp_path / "weights.pt", config=config)
    with pytest.raises(DataContractError, match=rf"weights\.pt.*{field}"):
        load_pretrained_sae(tmp_path / "weights.pt")


def test_prisma_loader_errors_and_no_code_execution(tmp_path):
    marker = tmp_path / "executed"
    legacy_file(tmp_path / "evil.pt", config={**dataclasses.asdict(LegacyConfig()), "payload": Payload(str(marker))})
    with pytest.raises(DataContractError, match="unknown SAE config field.*payload"):
        load_pretrained_sae(tmp_path / "evil.pt")
    assert not marker.exists()

    without = {key: value for key, value in dataclasses.asdict(LegacyConfig()).items() if key != "normalize_activations"}
    legacy_file(tmp_path / "no_norm.pt", config=without, prefix="")
    with pytest.raises(DataContractError, match=r"no_norm\.pt.*lacks 'normalize_activations'"):
        load_pretrained_sae(tmp_path / "no_norm.pt")
    legacy_file(tmp_path / "good.pt")
    assert load_pretrained_sae(tmp_path / "good.pt", k=5)[0].k == 5
    with pytest.raises(DataContractError, match="says k=5.*k=7"):
        load_pretrained_sae(tmp_path / "good.pt", k=7)

    hub = tmp_path / "hub"  # a bare state dict with the config beside it, as a hub repo keeps it
    hub.mkdir()
    torch.save({f"sae.{n}": torch.zeros(s) for n, s in (("W_enc", (4, 8)), ("b_enc", (8,)), ("W_dec", (8, 4)),
                                                          ("b_dec", (4,)))}, hub / "weights.pt")
    (hub / "config.json").write_text(json.dumps({**dataclasses.asdict(LegacyConfig(d_in=4, expansion_factor=2)),
                                                 "activation_fn_kwargs": {"k": 3}, "hook_point_layer": 6,
                                                 "normalize_activations": "layer_norm"}))
    sae, meta = load_pretrained_sae(hub / "weights.pt")
    assert (sae.k, sae.d_sae, sae.input_norm, meta["pretrained"]["layer"]) == (3, 8, "layer_norm", 6)
    torch.save(torch.load(hub / "weights.pt"), tmp_path / "bare.pt")
    with pytest.raises(DataContractError, match="no SAE config"):
        load_pretrained_sae(tmp_path / "bare.pt")

    cfg = dataclasses.asdict(LegacyConfig(d_in=4, expansion_factor=2))
    state = {"a.W_enc": torch.zeros(4, 8), "b.W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8),
             "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)}
    torch.save({"cfg": cfg, "state_dict": state}, tmp_path / "twice.pt")
    with pytest.raises(DataContractError, match="exactly one tensor named 'W_enc'"):
        load_pretrained_sae(tmp_path / "twice.pt")
    state = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(4, 8), "b_dec": torch.zeros(4)}
    torch.save({"cfg": cfg, "state_dict": state}, tmp_path / "shape.pt")
    with pytest.raises(DataContractError, match=r"W_dec has shape \(4, 8\).*\(8, 4\)"):
        load_pretrained_sae(tmp_path / "shape.pt")
    with pytest.raises(FileNotFoundError):
        load_pretrained_sae(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------------------------- neurons


def neuron_features(n: int = 600, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5)).astype(np.float32) + np.arange(5, dtype=np.float32)  # medians ≈ 0..4
    X[:, 4] = np.where(rng.random(n) < 0.7, 0.0, rng.exponential(1.0, n))  # 70 % zeros: a sparse column
    return X


def test_neurons_median_split_and_sparse_columns(tmp_path):
    X = neuron_features()
    ids = [f"img{i}" for i in range(len(X))]
    write_neurons(tmp_path / "raw.h5", ids, X, min_nonzero=50, sl=40, provenance={"source": {"path": "x.h5"}})
    codes = read_codes(tmp_path / "raw.h5")
    assert codes.kind == "neurons" and codes.attrs["n_dense_columns"] == 4
    np.testing.assert_array_equal(codes.latent_id, np.arange(5))
    median = np.median(X[:, :4], axis=0)
    np.testing.assert_allclose(codes.targets[:, :4], X[:, :4] - median, atol=1e-6)
    np.testing.assert_array_equal(codes.targets[:, 4], X[:, 4])  # sparse column: t = 0
    labels = np.concatenate([X[:, :4] > median, X[:, 4:] != 0], axis=1)
    np.testing.assert_array_equal(codes.nnz, labels.sum(0))
    fitted = [X[:, j] - median[j] for j in range(4)] + [X[X[:, 4] != 0, 4]]
    np.testing.assert_allclose(codes.mean, [f.mean() for f in fitted], atol=1e-5)
    np.testing.assert_allclose(codes.std, [f.std() for f in fitted], rtol=1e-5)
    np.testing.assert_array_equal(codes.function_dense(), [True] * 4 + [False])

    # the sampler: labels from the split, negatives carry x − median, dense functions fit every token
    sampler = EpisodeSampler.from_codes(codes, sl=40, seed=0)
    episodes = sampler.evaluation_set(30, seed=2)
    j, rows = episodes.functions[:, None], episodes.rows
    np.testing.assert_array_equal(episodes.labels, labels[rows, j])
    np.testing.assert_allclose(episodes.mags, codes.targets[rows, j])
    dense_episode = episodes.functions < 4
    assert (episodes.mse_mask[dense_episode] == 1).all()
    np.testing.assert_array_equal(episodes.mse_mask[~dense_episode], episodes.labels[~dense_episode])
    assert (episodes.mags[dense_episode][episodes.labels[dense_episode] == 0] <= 0).all()
    assert all(len(set(r)) == 40 for r in rows)
    expected_sigma = np.concatenate([X[:, :4] - median, X[X[:, 4] != 0, 4:]], axis=None).std()
    assert sampler.magnitude_std() == pytest.approx(expected_sigma, rel=1e-5)

    # a subset of neurons links the targets and the column flags
    cli(["functions-subset", "--parent", str(tmp_path / "raw.h5"), "--out", str(tmp_path / "sub.h5"),
         "--fraction", "0.6", "--seed", "0"])
    subset = read_codes(tmp_path / "sub.h5")
    assert subset.kind == "neurons" and subset.n_functions == 3
    np.testing.assert_array_equal(subset.targets, codes.targets)
    np.testing.assert_array_equal(subset.function_dense(), codes.column_dense[subset.latent_id])

    # medians come from each split's own rows
    other = X[:300] + 10.0
    write_neurons(tmp_path / "val.h5", ids[:300], other, min_nonzero=50, sl=40, provenance={})
    np.testing.assert_allclose(read_codes(tmp_path / "val.h5").targets[:, 0], other[:, 0] - np.median(other[:, 0]),
                               atol=1e-5)


def test_neurons_cli_reads_a_block_output(tmp_path):
    X = neuron_features()
    ids = [f"img{i}" for i in range(len(X))]
    write_h5(tmp_path / "clip.h5", {"features": X[:, ::-1].copy(), "layer_6": X}, ids, {"layer": "11"})
    cli(["functions-neurons", "--features", str(tmp_path / "clip.h5"), "--output", "layer_6",
         "--out", str(tmp_path / "raw6.h5"), "--min-nonzero", "50", "--sl", "40"])
    codes = read_codes(tmp_path / "raw6.h5")
    assert codes.attrs["layer"] == 6 and codes.attrs["source"]["attrs"]["output"] == "layer_6"
    dense_median = np.median(X[:, :4], axis=0)  # columns 0-3 are dense (median split), column 4 is 70 % zeros
    np.testing.assert_allclose(codes.targets[:, :4], X[:, :4] - dense_median, atol=1e-6)
    np.testing.assert_array_equal(codes.targets[:, 4], X[:, 4])
    with pytest.raises(DataContractError, match="layer_3"):
        cli(["functions-neurons", "--features", str(tmp_path / "clip.h5"), "--output", "layer_3",
             "--out", str(tmp_path / "raw3.h5")])


def test_neuron_targets_rejects_bad_input(tmp_path):
    X = neuron_features(40)
    X[3, 1] = np.nan
    with pytest.raises(DataContractError, match="non-finite"):
        write_neurons(tmp_path / "bad.h5", [str(i) for i in range(40)], X, 5, 4, {})
    with pytest.raises(DataContractError, match="rows but"):
        write_neurons(tmp_path / "bad.h5", ["a"], neuron_features(40), 5, 4, {})
    targets, threshold, dense = neuron_targets(np.array([[0, 1], [0, 2], [3, 3]], np.float32))
    np.testing.assert_array_equal(dense, [False, True])
    np.testing.assert_array_equal(threshold, [0, 2])


# ----------------------------------------------------------------------------------------------- subsets


def clustered_codes(tmp_path, n: int = 3000, clusters: int = 6, per_cluster: int = 6, k: int = 8, seed: int = 0):
    """Latents in clusters that co-fire (one shared cluster event per image), so similarities are planted."""
    rng = np.random.default_rng(seed)
    d_sae = clusters * per_cluster
    strength = np.linspace(0.1, 0.95, clusters)  # cluster c co-fires with probability strength[c]
    chosen = np.zeros((n, d_sae), dtype=bool)
    event = rng.integers(0, clusters, n)
    for c in range(clusters):
        members_c = np.arange(c * per_cluster, (c + 1) * per_cluster)
        on = event == c
        chosen[np.ix_(on, members_c)] = rng.random((on.sum(), per_cluster)) < strength[c]
    # fill up to k actives per image at random
    for i in range(n):
        free = np.flatnonzero(~chosen[i])
        need = k - chosen[i].sum()
        if need > 0:
            chosen[i, rng.choice(free, need, replace=False)] = True
        elif need < 0:
            chosen[i, rng.choice(np.flatnonzero(chosen[i]), -need, replace=False)] = False
    indices = np.sort(np.argsort(~chosen, axis=1, kind="stable")[:, :k], axis=1).astype(np.int32)
    values = rng.uniform(0.5, 2.0, indices.shape).astype(np.float32)
    ids = [f"img{i}" for i in range(n)]
    write_codes(tmp_path / "parent.h5", ids, indices, values, d_sae, min_nonzero=100, sl=20, provenance={})
    dense = np.zeros((n, d_sae))
    np.put_along_axis(dense, indices, values, axis=1)
    return read_codes(tmp_path / "parent.h5"), dense


def test_similarity_matrix_equals_dense_pearson(tmp_path):
    codes, dense = clustered_codes(tmp_path)
    sim = similarity_matrix(codes, block=7)  # blocks that do not divide F
    reference = np.corrcoef(dense[:, codes.latent_id], rowvar=False)
    np.testing.assert_allclose(sim, reference, atol=1e-5)
    X = neuron_features()
    write_neurons(tmp_path / "raw.h5", [str(i) for i in range(len(X))], X, 50, 40, {})
    np.testing.assert_allclose(similarity_matrix(read_codes(tmp_path / "raw.h5")), np.corrcoef(X, rowvar=False),
                               atol=1e-5)


def test_similarity_levels_are_ordered_and_extreme(tmp_path):
    codes, _ = clustered_codes(tmp_path)
    sim = similarity_matrix(codes)
    full = mean_pairwise(sim)
    achieved = {level: mean_pairwise(sim, similarity_subset(sim, 0.5, level)) for level in ("low", "medium", "high")}
    randoms = [mean_pairwise(sim, random_subset(len(sim), 0.5, seed)) for seed in range(300)]
    assert achieved["low"] < np.percentile(randoms, 1) and achieved["high"] > np.percentile(randoms, 99)
    assert achieved["low"] < achieved["medium"] < achieved["high"]
    assert abs(achieved["medium"] - full) < 0.1 * (achieved["high"] - achieved["low"])
    assert len(similarity_subset(sim, 0.5, "low")) == round(0.5 * codes.n_functions)


def documented_draw(n: int, fraction: float, seed: int) -> np.ndarray:
    """docs/methods.md §3: round(fraction·F) of the F functions drawn without replacement from a generator seeded
    with `seed`, kept in ascending order."""
    return np.sort(np.random.default_rng(seed).choice(n, round(fraction * n), replace=False))


def test_random_subset_fractions_and_files(tmp_path):
    codes, dense = clustered_codes(tmp_path)
    F = codes.n_functions
    for fraction in (0.2, 0.4, 0.6, 0.8):
        chosen = random_subset(F, fraction, seed=3)
        np.testing.assert_array_equal(chosen, documented_draw(F, fraction, 3))
        assert len(chosen) == round(fraction * F) and (np.diff(chosen) > 0).all()
    assert not np.array_equal(random_subset(F, 0.5, 3), random_subset(F, 0.5, 4))
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\], got 1.5"):
        random_subset(F, 1.5, 3)

    parent = tmp_path / "parent.h5"
    out = tmp_path / "sub" / "coco_train.h5"
    cli(["functions-subset", "--parent", str(parent), "--out", str(out), "--fraction", "0.4", "--seed", "3"])
    subset = read_codes(out)
    expected = documented_draw(F, 0.4, 3)
    np.testing.assert_array_equal(subset.latent_id, codes.latent_id[expected])
    np.testing.assert_array_equal(subset.nnz, codes.nnz[expected])
    np.testing.assert_array_equal(subset.indices, codes.indices)  # the parent's codes, through links
    with h5py.File(out) as handle:
        assert isinstance(handle.get("indices", getlink=True), h5py.ExternalLink)
        assert isinstance(handle.get("functions/latent_id", getlink=True), h5py.HardLink)
    assert out.stat().st_size < parent.stat().st_size / 4
    record = subset.attrs["subset"]
    assert record["method"] == "random" and record["n_functions"] == round(0.4 * F)
    pearson = np.corrcoef(dense[:, codes.latent_id[expected]], rowvar=False)
    assert record["mean_similarity"] == pytest.approx(pearson[~np.eye(len(expected), dtype=bool)].mean(), abs=1e-5)

    cli(["functions-subset", "--parent", str(parent), "--out", str(tmp_path / "high.h5"), "--fraction", "0.5",
         "--similarity", "high"])
    high = read_codes(tmp_path / "high.h5").attrs["subset"]
    assert high["level"] == "high" and high["mean_similarity"] > high["parent_mean_similarity"]

    cli(["functions-subset", "--parent", str(parent), "--out", str(tmp_path / "all.h5")])
    np.testing.assert_array_equal(read_codes(tmp_path / "all.h5").latent_id, codes.latent_id)

    parent.unlink()
    with pytest.raises(DataContractError, match="lacks"):
        read_codes(out)


def test_functions_summary_cli_reports_each_file(tmp_path):
    codes, dense = clustered_codes(tmp_path)
    root = tmp_path / "functions"
    main = root / "main" / "coco_train.h5"
    write_codes(main, codes.ids, codes.indices, codes.values, 36, min_nonzero=100, sl=20, provenance={})
    cli(["functions-subset", "--parent", str(main), "--out", str(root / "sub40" / "coco_train.h5"), "--fraction", "0.4",
         "--seed", "3"])
    cli(["functions-subset", "--parent", str(main), "--out", str(root / "simhigh" / "coco_train.h5"), "--fraction",
         "0.5", "--similarity", "high"])
    X = neuron_features()
    write_neurons(root / "raw" / "coco_val.h5", [f"img{i}" for i in range(len(X))], X, 50, 40, {})
    inputs = [root / name for name in ("main/coco_train.h5", "sub40/coco_train.h5", "simhigh/coco_train.h5",
                                       "raw/coco_val.h5")]
    cli(["functions-summary", "--inputs", *map(str, inputs), "--out", str(tmp_path / "summary.csv")])
    table = pd.read_csv(tmp_path / "summary.csv").set_index("function_set")

    # the reference: the planted codes themselves (nnz per latent, Pearson correlations of the dense activations)
    nnz = (dense != 0).sum(axis=0)
    kept = np.flatnonzero(nnz >= 100)
    pearson = np.corrcoef(dense[:, kept], rowvar=False)

    def mean_offdiagonal(positions: np.ndarray) -> float:
        block = pearson[np.ix_(positions, positions)]
        return block[~np.eye(len(positions), dtype=bool)].mean()

    random = documented_draw(len(kept), 0.4, 3)
    high = read_codes(root / "simhigh" / "coco_train.h5").latent_id
    high_positions = np.searchsorted(kept, high)
    np.testing.assert_array_equal(kept[high_positions], high)
    assert list(table.index) == ["main", "sub40", "simhigh", "raw"]
    assert list(table["split"]) == ["coco_train"] * 3 + ["coco_val"]
    assert list(table["kind"]) == ["sparse"] * 3 + ["neurons"]
    assert list(table["n_functions"]) == [len(kept), len(random), round(0.5 * len(kept)), 5]
    assert list(table["n_columns"]) == [36, 36, 36, 5] and list(table["n_rows"]) == [3000] * 3 + [600]
    median = np.median(X[:, :4], axis=0)
    neuron_nnz = np.concatenate([(X[:, :4] > median).sum(axis=0), [(X[:, 4] != 0).sum()]])
    np.testing.assert_allclose(table["mean_nnz"], [nnz[kept].mean(), nnz[kept][random].mean(),
                                                   nnz[high].mean(), neuron_nnz.mean()])
    assert table.loc["main", ["method", "fraction", "seed", "level"]].isna().all()
    assert table.loc["sub40", "method"] == "random" and table.loc["sub40", "seed"] == 3
    assert table.loc["simhigh", "method"] == "similarity" and table.loc["simhigh", "level"] == "high"
    assert table.loc["sub40", "fraction"] == 0.4 and table.loc["simhigh", "fraction"] == 0.5
    assert table.loc["sub40", "mean_similarity"] == pytest.approx(mean_offdiagonal(random), abs=1e-5)
    assert table.loc["simhigh", "mean_similarity"] == pytest.approx(mean_offdiagonal(high_positions), abs=1e-5)
    for name in ("sub40", "simhigh"):
        assert table.loc[name, "parent_mean_similarity"] == pytest.approx(mean_offdiagonal(np.arange(len(kept))),
                                                                          abs=1e-5)
    assert table.loc["simhigh", "mean_similarity"] > table.loc["sub40", "mean_similarity"]


# ----------------------------------------------------------------------------------------------- config


SETS = {
    "main": {"method": "pretrained", "source": {"backbone": "clip"}, "train_split": "coco_train",
             "eval_split": "coco_val", "min_nonzero": 120, "sae": {"weights": "w.pt", "k": 64}},
    "raw": {"method": "neurons", "source": {"backbone": "clip"}, "train_split": "coco_train", "eval_split": "coco_val",
            "min_nonzero": 120},
    "sub20": {"method": "subset", "parent": "main", "fraction": 0.2, "seed": 1},
    "deeper": {"method": "subset", "parent": "sub20", "fraction": 0.5, "similarity": "low"},
}


def test_resolve_function_sets():
    resolved = resolve_function_sets(SETS)
    assert resolved["deeper"].root == "main" and resolved["deeper"].source_backbone == "clip"
    assert resolved["deeper"].splits == ("coco_train", "coco_val") and resolved["deeper"].parent == "sub20"
    assert sorted(members(resolved, "main")) == ["deeper", "main", "sub20"]
    bad = {
        "unknown parent": ({**SETS, "x": {"method": "subset", "parent": "nope", "fraction": 0.5, "seed": 1}},
                           r"x\.parent: unknown function set 'nope'"),
        "cycle": ({"a": {"method": "subset", "parent": "b", "fraction": 0.5, "seed": 1},
                   "b": {"method": "subset", "parent": "a", "fraction": 0.5, "seed": 1}}, "cycle"),
        "both": ({**SETS, "x": {"method": "subset", "parent": "main", "fraction": 0.5, "seed": 1, "similarity": "low"}},
                 "exactly one of seed"),
        "fraction": ({**SETS, "x": {"method": "subset", "parent": "main", "fraction": 1.5, "seed": 1}},
                     r"x\.fraction"),
        "level": ({**SETS, "x": {"method": "subset", "parent": "main", "fraction": 0.5, "similarity": "mid"}},
                  "similarity"),
        "keys": ({"x": {**SETS["raw"], "sae": {}}}, r"unknown \['sae'\]"),
        "sae": ({"x": {**SETS["main"], "sae": {"k": 64}}}, r"x\.sae: method 'pretrained' needs \['weights'\]"),
        "method": ({"x": {**SETS["raw"], "method": "magic"}}, r"x\.method"),
    }
    for name, (sets, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            resolve_function_sets(sets)


def test_study_evaluation_split_is_coco_val_then_test(tmp_path):
    """The full config's evaluation functions come from val2017 + test2017 (45,670 images, upstream's coco_eval): every
    function set evaluates on the concat dataset, and the planned jobs read both parts, val first (docs/methods.md §3)."""
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "config" / "config.yaml").read_text())
    datasets = config["datasets"]
    assert concat_parts(datasets) == {"coco_eval": ["coco_val", "coco_test"]}
    assert datasets["coco_eval"]["expected_count"] == datasets["coco_val"]["expected_count"] + \
        datasets["coco_test"]["expected_count"] == 45670
    resolved = resolve_function_sets(config["function_sets"])
    assert {fset.eval_split for fset in resolved.values()} == {"coco_eval"}
    assert all(fset.entry.get("min_nonzero", 120) == 120 for fset in resolved.values())

    plan = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--nolock", "--configfile", "config/config.yaml",
                           "--", "results/checkpoints/dinov3/main.pt", "results/icl/dinov3/main.h5",
                           "results/functions/raw/coco_eval.h5"], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert plan.returncode == 0, plan.stderr[-2000:]
    jobs = {}
    for block in plan.stdout.split("\n\n"):
        output = re.search(r"^\s*output: (.*)$", block, re.M)
        inputs = re.search(r"^\s*input: (.*)$", block, re.M)
        if output and inputs:
            jobs[output.group(1).split(", ")[0]] = inputs.group(1).split(", ")
    for backbone in ("dinov3", "clip"):
        assert jobs[f"results/embeddings/coco_eval/{backbone}.h5"] == [
            f"results/embeddings/coco_val/{backbone}.h5", f"results/embeddings/coco_test/{backbone}.h5",
            "results/manifests/coco_val.csv", "results/manifests/coco_test.csv"]
    for target in ("results/checkpoints/dinov3/main.pt", "results/icl/dinov3/main.h5"):
        assert {"results/embeddings/coco_eval/dinov3.h5", "results/functions/main/coco_eval.h5"} <= set(jobs[target])
    assert jobs["results/functions/main/coco_eval.h5"][-1] == "results/embeddings/coco_eval/clip.h5"
    assert jobs["results/functions/raw/coco_eval.h5"] == ["results/embeddings/coco_eval/clip.h5"]


def test_concat_datasets_are_checked():
    image = {"layout": "flat", "root": "r", "split": "val"}
    assert concat_parts({"a": image, "b": image, "ab": {"concat": ["a", "b"]}}) == {"ab": ["a", "b"]}
    with pytest.raises(ConfigError, match=r"datasets\.ab\.concat: unknown dataset 'c'"):
        concat_parts({"a": image, "ab": {"concat": ["a", "c"]}})
    with pytest.raises(ConfigError, match=r"datasets\.abc\.concat: 'ab' is itself a concat dataset"):
        concat_parts({"a": image, "b": image, "ab": {"concat": ["a", "b"]}, "abc": {"concat": ["ab", "a"]}})
    check_dataset("ab", {"concat": ["a", "b"]})  # a concat entry has no layout to check
    with pytest.raises(ConfigError, match="no manifest of its own"):
        dataset_splits({"concat": ["a", "b"]})

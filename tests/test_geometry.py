"""Representational geometry: CKA and class separation against direct formulas, the seeded cluster bootstrap,
Procrustes alignment, recovery of the planted embedding, and the CLI / figures on small files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from metalign.behaviour import cli as behaviour_cli
from metalign.behaviour import geometry as geo
from metalign.demo.learning import synthetic_images
from metalign.io import write_h5
from tests.test_figures import Z, keep_saved_figures, plotted


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA through centred Gram matrices (Kornblith et al. 2019): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l_).sum() / np.sqrt((k * k).sum() * (l_ * l_).sum()))


def test_linear_cka_formula_and_invariances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 5))
    assert geo.linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-10)
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    assert geo.linear_cka(3.0 * x @ rotation + 2.0, y) == pytest.approx(geo.linear_cka(x, y), rel=1e-10)
    assert geo.linear_cka(x, x) == pytest.approx(1.0)


def _naive_separation(x: np.ndarray, labels: list) -> float:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    within = [unit[np.asarray(labels) == k].var(axis=0).sum() for k in sorted(set(labels), key=str)]
    return 1.0 - np.mean(within) / unit.var(axis=0).sum()


def test_class_separation_matches_direct_formula_and_cluster_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)) + np.repeat(rng.normal(size=(8, 6)) * 2, 5, axis=0)
    labels = np.repeat(list("abcdefgh"), 5)
    assert geo.class_separation(x, labels)[0] == pytest.approx(_naive_separation(x, list(labels)), rel=1e-10)
    # class weights (2, 0, 1, …) = a data set where class a appears twice (as two classes) and class b not at all
    weights = np.array([[2, 0, 1, 1, 1, 1, 1, 1]], dtype=float)
    keep = labels != "b"
    dup_x = np.vstack([x[keep], x[labels == "a"]])
    dup_labels = list(labels[keep]) + ["a2"] * 5
    assert geo.class_separation(x, labels, weights)[0] == pytest.approx(_naive_separation(dup_x, dup_labels),
                                                                        rel=1e-10)


def test_coarse_separation_skips_empty_labels_and_averages_columns():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 4))
    metadata = pd.DataFrame({"kind": list("aabbccaabbcc"), "sparse": ["u", "", "v", "u", "", "v"] * 2,
                             "single": ["z"] * 12})
    result = geo.coarse_separation(x, metadata)
    keep = metadata["sparse"] != ""
    assert result["sparse"][0] == pytest.approx(_naive_separation(x[keep], list(metadata["sparse"][keep])))
    assert "single" not in result                                    # one class: no separation defined
    assert result["mean"][0] == pytest.approx((result["kind"][0] + result["sparse"][0]) / 2)


def _noisy_world():
    """16 concepts × 3 images, their labels and shapes, noisy image features and noisy concept embeddings."""
    images = synthetic_images(16, 3, seed=3)
    labels = np.array([i.split("/")[0] for i in images.image_ids])
    metadata = pd.DataFrame({"shape": images.coarse})
    noisy = images.features() + np.random.default_rng(4).normal(0, 0.3, images.features().shape)
    concepts = images.embedding + np.random.default_rng(5).normal(0, 0.3, images.embedding.shape)
    return images, labels, metadata, noisy, concepts


def test_bootstrap_is_seeded_and_procrustes_recovers_a_similarity_transform():
    images, labels, metadata, noisy, concepts = _noisy_world()
    first = geo.geometry(noisy, labels, concepts, images.embedding, metadata, n_boot=20, seed=9)
    assert first == geo.geometry(noisy, labels, concepts, images.embedding, metadata, n_boot=20, seed=9)
    assert first != geo.geometry(noisy, labels, concepts, images.embedding, metadata, n_boot=20, seed=10)
    points = np.random.default_rng(6).normal(size=(25, 2))
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 2.5 * points @ rotation @ np.diag([1, -1]) + [3.0, -1.0]
    np.testing.assert_allclose(geo.procrustes_align(moved, points), points, atol=1e-10)


def _interval(samples: list[float]) -> dict[str, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return {"boot_mean": np.mean(samples), "boot_sd": np.std(samples, ddof=1), "ci_low": low, "ci_high": high}


def test_bootstrap_intervals_equal_a_plain_resampling():
    """The seeded bootstrap redone with plain numpy: the generator draws concepts (CKA), then image classes (fine), then
    metadata classes (coarse), each as `integers(0, n, n)` per replicate; a class drawn twice enters twice, as two
    classes. Every replicate is then scored with the direct formulas on the resampled data set."""
    images, labels, metadata, noisy, concepts = _noisy_world()
    result = geo.geometry(noisy, labels, concepts, images.embedding, metadata, n_boot=40, seed=9)

    rng = np.random.default_rng(9)
    cka = [_hsic_cka(concepts[draw], images.embedding[draw]) for draw in (rng.integers(0, 16, 16) for _ in range(40))]
    fine_classes, coarse_classes = sorted(set(labels)), sorted(set(images.coarse))
    fine, coarse = [], []
    for classes, rows, values, out in ((fine_classes, noisy, labels, fine),
                                       (coarse_classes, concepts, images.coarse, coarse)):
        for _ in range(40):
            draw = rng.integers(0, len(classes), len(classes))
            parts = [rows[values == classes[c]] for c in draw]
            out.append(_naive_separation(np.vstack(parts), [j for j, part in enumerate(parts) for _ in part]))
    for name, samples in (("cka", cka), ("class_sep_fine", fine), ("class_sep_coarse", coarse)):
        for key, value in _interval(samples).items():
            assert result[f"{name}_{key}"] == pytest.approx(value, rel=1e-9), (name, key)
        assert result[f"{name}_ci_low"] < result[f"{name}_ci_high"]
    assert result["cka"] == pytest.approx(_hsic_cka(concepts, images.embedding), rel=1e-10)
    assert result["class_sep_fine"] == pytest.approx(_naive_separation(noisy, list(labels)), rel=1e-10)
    assert result["class_sep_coarse"] == pytest.approx(_naive_separation(concepts, list(images.coarse)), rel=1e-10)


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    """The documented map: scikit-learn t-SNE, PCA init, perplexity min(30, (n − 1) / 3), on unit-length rows."""
    from sklearn.manifold import TSNE

    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    with threadpool_limits(limits=1):  # threads only thrash on a shared 2-core machine
        return TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca",
                    random_state=seed).fit_transform(unit)


def _procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation/reflection and scale of centred `source` onto `target` (SVD of the cross-covariance)."""
    src, tgt = source - source.mean(0), target - target.mean(0)
    u, singular, vt = np.linalg.svd(src.T @ tgt)
    return src @ u @ vt * singular.sum() / (src ** 2).sum() + target.mean(0)


def test_tsne_map_is_seeded_tsne_of_unit_rows_and_keeps_planted_clusters():
    rng = np.random.default_rng(13)
    centres = rng.normal(size=(4, 10)) * 4
    x = np.repeat(centres, 25, axis=0) + rng.normal(size=(100, 10))   # n = 100: perplexity capped at 30
    small = x[::8]                                                   # n = 13: perplexity (13 − 1) / 3 = 4
    maps = [geo.tsne_map(data, seed=3) for data in (x, small)]
    for data, mapped in zip((x, small), maps):
        assert mapped.shape == (len(data), 2)
        np.testing.assert_allclose(mapped, _tsne(data, 3), rtol=1e-6, atol=1e-6)
    scales = rng.uniform(0.1, 10, (len(small), 1))                  # row lengths are dropped before the map
    np.testing.assert_allclose(geo.tsne_map(small * scales, seed=3), maps[1], atol=1e-6)
    # the planted clusters: every point's nearest neighbour in the map is of its own cluster
    mapped = maps[0]
    distances = np.linalg.norm(mapped[:, None] - mapped[None], axis=2) + np.diag(np.full(100, np.inf))
    cluster = np.repeat(np.arange(4), 25)
    assert (cluster[distances.argmin(axis=1)] == cluster).all()


def test_recovery_planted_embedding_has_the_human_geometry():
    images = synthetic_images(32, 4, seed=7)
    labels = np.array([i.split("/")[0] for i in images.image_ids])
    metadata = pd.DataFrame({"shape": images.coarse})
    rng = np.random.default_rng(8)
    planted = geo.geometry(images.features() + rng.normal(0, 0.05, images.features().shape), labels,
                           images.embedding, images.embedding, metadata, n_boot=30)
    random = geo.geometry(rng.normal(size=(len(labels), 20)), labels, rng.normal(size=(32, 20)), images.embedding,
                          metadata, n_boot=30)
    assert planted["cka"] == pytest.approx(1.0) and random["cka"] < 0.7
    assert planted["class_sep_fine"] > 0.9 > 0.5 > random["class_sep_fine"]
    assert planted["class_sep_coarse"] > random["class_sep_coarse"] + 0.2


def test_cli_geometry_table_and_figures(tmp_path, monkeypatch):
    from metalign.behaviour import figures as behaviour_figures

    images = synthetic_images(12, 2, seed=11)
    unique_ids = sorted({i.split("/")[0] for i in images.image_ids})
    (tmp_path / "unique_id.txt").write_text("\n".join(unique_ids) + "\n")
    manifest = pd.DataFrame({"image_id": images.image_ids, "path": [f"/things/{i}" for i in images.image_ids],
                             "label": [i.split("/")[0] for i in images.image_ids], "split": "things"})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    np.savetxt(tmp_path / "spose.txt", images.embedding)
    pd.DataFrame({"uniqueID": unique_ids[::-1], "shape": images.coarse[::-1]}).to_csv(tmp_path / "meta.tsv",
                                                                                      sep="\t", index=False)
    rng = np.random.default_rng(12)
    written = {"base": images.features().astype(np.float32),
               "main": rng.normal(size=images.features().shape).astype(np.float32)}
    for variant, features in written.items():
        write_h5(tmp_path / f"{variant}.h5", {"features": features}, images.image_ids, {"s": 1})
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    behaviour_cli.register(sub)
    rows = []
    for variant in ("base", "main"):
        args = parser.parse_args(["evaluate-geometry", "--features", str(tmp_path / f"{variant}.h5"), "--manifest",
                                  str(tmp_path / "manifest.csv"), "--unique-ids", str(tmp_path / "unique_id.txt"),
                                  "--embedding", str(tmp_path / "spose.txt"), "--metadata", str(tmp_path / "meta.tsv"),
                                  "--label-columns", "shape", "--n-bootstrap", "10", "--label", variant,
                                  "--out", str(tmp_path / "g" / "bb" / f"{variant}.json")])
        args.func(args)
        rows.append({"backbone": "bb", "variant": variant,
                     **json.loads((tmp_path / "g" / "bb" / f"{variant}.json").read_text())})
    assert rows[0]["cka"] == pytest.approx(1.0) and rows[1]["cka"] < rows[0]["cka"]
    pd.DataFrame(rows).to_csv(tmp_path / "geometry.csv", index=False)
    saved = keep_saved_figures(monkeypatch, behaviour_figures)  # the figures the CLI saves, kept to read back
    for argv in (["figure-geometry", "--table", str(tmp_path / "geometry.csv"), "--out", str(tmp_path / "g.png")],
                 ["figure-tsne", "--base", str(tmp_path / "base.h5"), "--meta", str(tmp_path / "main.h5"),
                  "--manifest", str(tmp_path / "manifest.csv"), "--unique-ids", str(tmp_path / "unique_id.txt"),
                  "--metadata", str(tmp_path / "meta.tsv"), "--colour-column", "shape", "--title", "t",
                  "--out", str(tmp_path / "t.png")]):
        args = parser.parse_args(argv)
        args.func(args)
    assert (tmp_path / "g.png").read_bytes()[:4] == (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    geometry_fig, tsne_fig = saved
    # geometry: each panel's point is the summary's estimate, whiskers ± 1.96 bootstrap SD
    axes = [ax for ax in geometry_fig.axes if ax.containers]
    assert len(axes) == 3
    for ax, column in zip(axes, ("cka", "class_sep_fine", "class_sep_coarse")):
        points = plotted(ax)
        assert set(points) == {("bb", "base"), ("bb", "main")}
        for row in rows:
            value, sd = row[column], row[f"{column}_boot_sd"]
            assert points[("bb", row["variant"])] == pytest.approx((value, value - Z * sd, value + Z * sd), rel=1e-12)
    # t-SNE: the concept rows (each concept's first image), mapped and Procrustes-aligned here, coloured by shape
    first_image = [images.image_ids.index(f"{u}/{u}_01a.jpg") for u in unique_ids]
    base_map = _tsne(written["base"][first_image].astype(np.float64), 1234)
    meta_map = _procrustes(_tsne(written["main"][first_image].astype(np.float64), 1234), base_map)
    shapes = np.asarray(images.coarse)  # meta.tsv pairs unique_ids[i] with coarse[i], in reverse row order
    for ax, expected in zip(tsne_fig.axes, (base_map, meta_map)):
        assert {c.get_label() for c in ax.collections} == set(images.coarse)
        for collection in ax.collections:
            np.testing.assert_allclose(collection.get_offsets(), expected[shapes == collection.get_label()],
                                       rtol=1e-5, atol=1e-5)

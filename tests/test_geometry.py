"""Representational geometry: CKA and class separation against direct formulas, the seeded cluster bootstrap,
Procrustes alignment, recovery of the planted embedding, and the CLI / figures on small files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from metalign.behaviour import cli as behaviour_cli
from metalign.behaviour import geometry as geo
from metalign.demo.learning import synthetic_images
from metalign.io import write_h5


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


def test_bootstrap_is_seeded_and_procrustes_recovers_a_similarity_transform():
    images = synthetic_images(16, 3, seed=3)
    labels = np.array([i.split("/")[0] for i in images.image_ids])
    metadata = pd.DataFrame({"shape": images.coarse})
    noisy = images.features() + np.random.default_rng(4).normal(0, 0.3, images.features().shape)
    concepts = images.embedding + np.random.default_rng(5).normal(0, 0.3, images.embedding.shape)
    first = geo.geometry(noisy, labels, concepts, images.embedding, metadata, n_boot=20, seed=9)
    assert first == geo.geometry(noisy, labels, concepts, images.embedding, metadata, n_boot=20, seed=9)
    assert first != geo.geometry(noisy, labels, concepts, images.embedding, metadata, n_boot=20, seed=10)
    assert first["class_sep_fine_ci_low"] <= first["class_sep_fine"] <= first["class_sep_fine_ci_high"]
    points = np.random.default_rng(6).normal(size=(25, 2))
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 2.5 * points @ rotation @ np.diag([1, -1]) + [3.0, -1.0]
    np.testing.assert_allclose(geo.procrustes_align(moved, points), points, atol=1e-10)


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


def test_cli_geometry_table_and_figures(tmp_path):
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
    for variant, features in (("base", images.features()), ("main", rng.normal(size=images.features().shape))):
        write_h5(tmp_path / f"{variant}.h5", {"features": features.astype(np.float32)}, images.image_ids, {"s": 1})
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
    for argv in (["figure-geometry", "--table", str(tmp_path / "geometry.csv"), "--out", str(tmp_path / "g.png")],
                 ["figure-tsne", "--base", str(tmp_path / "base.h5"), "--meta", str(tmp_path / "main.h5"),
                  "--manifest", str(tmp_path / "manifest.csv"), "--unique-ids", str(tmp_path / "unique_id.txt"),
                  "--metadata", str(tmp_path / "meta.tsv"), "--colour-column", "shape", "--title", "t",
                  "--out", str(tmp_path / "t.png")]):
        args = parser.parse_args(argv)
        args.func(args)
    assert (tmp_path / "g.png").stat().st_size > 5000 and (tmp_path / "t.png").stat().st_size > 5000

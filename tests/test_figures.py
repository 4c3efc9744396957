"""Figures show what their tables hold: every plotted point, whisker and reference line is read back from the
matplotlib artists and compared with values computed here from the synthetic table (never by the code under test);
representations keep distinct colours and the legend stays off the data, also at the study's 7 × 23 grid."""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.colors import to_rgb
from matplotlib.container import ErrorbarContainer
from scipy import stats as scipy_stats

from metalign.behaviour import figures as behaviour_figures
from metalign.brain import figures as brain_figures
from metalign.downstream import figures as downstream_figures
from metalign.train import figures as train_figures

REPO = Path(__file__).resolve().parent.parent
Z = scipy_stats.norm.ppf(0.975)


# ----------------------------------------------------------------------------------------------- reading artists


def tick_labels(ax) -> list[str]:
    """The x tick labels, also of panels whose labels are hidden under a shared axis."""
    return list(ax.xaxis.get_major_formatter().format_ticks(ax.get_xticks()))


def plotted(ax) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(x tick label of the point's group, representation) → (y, whisker bottom, whisker top)."""
    groups = tick_labels(ax)
    out = {}
    for container in ax.containers:
        if not isinstance(container, ErrorbarContainer):
            continue
        whiskers = {round(float(seg[0][0]), 9): sorted((float(seg[0][1]), float(seg[1][1])))
                    for seg in container.lines[2][0].get_segments()}
        line = container.lines[0]
        for x, y in zip(line.get_xdata(), line.get_ydata()):
            if np.isfinite(y):
                low, high = whiskers.get(round(float(x), 9), (math.nan, math.nan))
                out[(groups[round(float(x))], container.get_label())] = (float(y), low, high)
    return out


def filled(ax) -> set[tuple[str, str]]:
    """(group, representation) of the points drawn filled."""
    groups = tick_labels(ax)
    return {(groups[round(float(x))], line.get_gid().removeprefix("filled:")) for line in ax.lines
            if (line.get_gid() or "").startswith("filled:") for x in line.get_xdata()}


def point_colours(fig) -> dict[str, set[tuple[float, float, float]]]:
    """Representation → every colour its points take anywhere in the figure."""
    out: dict[str, set] = {}
    for ax in fig.axes:
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):
                out.setdefault(container.get_label(), set()).add(to_rgb(container.lines[0].get_color()))
    return out


def gid_lines(ax, gid: str) -> list:
    return [line for line in ax.lines if line.get_gid() == gid]


def assert_distinct(colours: dict[str, set], min_distance: float = 0.15) -> None:
    """One colour per representation, the same in every panel, and no two closer than `min_distance` in RGB."""
    assert all(len(c) == 1 for c in colours.values()), colours
    rgb = np.array([next(iter(c)) for c in colours.values()])
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert not distances or min(distances) > min_distance


def assert_legend_clear(fig) -> None:
    """Exactly one legend, outside every axes' data area."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def legend_texts(fig) -> list[str]:
    return [text.get_text() for text in fig.legends[0].get_texts()]


def wilson(share: float, n: int) -> tuple[float, float]:
    """The Wilson bounds as the roots of (p̂ − π)² = z² π (1 − π) / n."""
    roots = np.roots([1 + Z ** 2 / n, -(2 * share + Z ** 2 / n), share ** 2])
    return float(min(roots)), float(max(roots))


def keep_saved_figures(patch, module) -> list:
    """The Figures `module.save_figure` is given, kept (and still written) so that a CLI test can read what it
    plotted; `patch` is pytest's monkeypatch (or a MonkeyPatch.context())."""
    saved, save = [], module.save_figure

    def keep(fig, out) -> None:
        saved.append(fig)
        save(fig, out)

    patch.setattr(module, "save_figure", keep)
    return saved


def close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


# ----------------------------------------------------------------------------------------------- THINGS and behaviour


def things_table() -> pd.DataFrame:
    rows = [("b1", "base", 0.45, 1000, 0.47, 800), ("b1", "main", 0.52, 1000, 0.55, 800),
            ("b1", "raw", 0.40, 1000, 0.41, 800), ("b2", "base", 0.36, 250, 0.38, 200),
            ("b2", "main", 0.60, 250, 0.58, 200), ("b2", "raw", 0.50, 250, 0.49, 200)]
    table = pd.DataFrame(rows, columns=["backbone", "variant", "zero_shot_acc", "n_triplets", "cv_acc", "n_trials"])
    return table.assign(representation=np.where(table["variant"] == "base", "base", "meta"), noise_ceiling=0.4)


def stats_table(subsets: dict[str, float], n: int = 9) -> pd.DataFrame:
    """`*_vs_base` rows: R² = 0.1·k + 0.01·(subset index) for the k-th (backbone, model), SEM 0.02, and base repeated
    in the second comparison with other values (the figure takes base from the first)."""
    rows = []
    for s, (subset, ceiling) in enumerate(subsets.items()):
        for b, backbone in enumerate(("b1", "b2")):
            for comparison, variant, pxp in (("main_vs_base", "main", 0.97), ("raw_vs_base", "raw", 0.40)):
                for model in (variant, "base"):
                    k = 3 * b + {"base": 0, "main": 1, "raw": 2}[model]
                    value = 0.1 * k + 0.01 * s + (0.5 if comparison == "raw_vs_base" and model == "base" else 0.0)
                    rows.append({"backbone": backbone, "comparison": comparison, "subset": subset, "model": model,
                                 "r2_participant_mean": value, "r2_participant_sem": 0.02 + 0.01 * b,
                                 "n_participants": n, "noise_ceiling": ceiling,
                                 "pxp": pxp if model == variant else 1 - pxp})
    return pd.DataFrame(rows)


def test_things_points_and_wilson_intervals_are_the_table():
    table = things_table()
    fig = behaviour_figures.draw_things(table)
    axes = [ax for ax in fig.axes if ax.containers]
    assert len(axes) == 2
    for ax, (column, count) in zip(axes, (("zero_shot_acc", "n_triplets"), ("cv_acc", "n_trials"))):
        points = plotted(ax)
        assert set(points) == set(zip(table["backbone"], table["variant"]))
        for row in table.itertuples():
            y, low, high = points[(row.backbone, row.variant)]
            assert y == pytest.approx(getattr(row, column))
            assert (low, high) == pytest.approx(wilson(getattr(row, column), getattr(row, count)))
        assert [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--"] == pytest.approx([1 / 3])
        (base_level,) = [c for c in ax.collections if c.get_gid() == "base-level"]
        assert sorted(seg[0][1] for seg in base_level.get_segments()) == pytest.approx(
            sorted(table.loc[table["variant"] == "base", column]))
    assert legend_texts(fig)[:3] == ["base", "main", "raw"]
    assert_distinct(point_colours(fig))
    assert_legend_clear(fig)
    close(fig)


def test_things_r2_panel_has_participant_intervals_and_the_ceiling():
    stats = stats_table({"all": 0.6}, n=9)
    fig = behaviour_figures.draw_things(things_table(), stats)
    ax = [ax for ax in fig.axes if ax.containers][-1]
    points = plotted(ax)
    first = stats.drop_duplicates(["backbone", "model"])  # base from main_vs_base, variants from their own
    assert len(points) == len(first) == 6
    for row in first.itertuples():
        y, low, high = points[(row.backbone, row.model)]
        expected = scipy_stats.t.interval(0.95, row.n_participants - 1, loc=row.r2_participant_mean,
                                          scale=row.r2_participant_sem)
        assert y == pytest.approx(row.r2_participant_mean) and (low, high) == pytest.approx(expected)
    assert [line.get_ydata()[0] for line in gid_lines(ax, "noise-ceiling")] == pytest.approx([0.6])
    assert "noise ceiling" in legend_texts(fig)
    assert_legend_clear(fig)
    close(fig)


def test_behaviour_panels_per_subset_with_ceiling_and_pxp_fill():
    ceilings = {"class_border": 0.7, "all": 0.5, "within_class": 0.8}
    stats = stats_table(ceilings, n=5)
    fig = behaviour_figures.draw_behaviour(stats, "levels")
    axes = [ax for ax in fig.axes if ax.containers]
    assert [ax.get_title().split(" ")[0] for ax in axes] == ["all", "within_class", "class_border"]
    for ax in axes:
        subset = ax.get_title().split(" ")[0]
        rows = stats[stats["subset"] == subset].drop_duplicates(["backbone", "model"])
        points = plotted(ax)
        for row in rows.itertuples():
            half = scipy_stats.t.ppf(0.975, 4) * row.r2_participant_sem
            assert points[(row.backbone, row.model)] == pytest.approx(
                (row.r2_participant_mean, row.r2_participant_mean - half, row.r2_participant_mean + half))
        assert [line.get_ydata()[0] for line in gid_lines(ax, "noise-ceiling")] == pytest.approx([ceilings[subset]])
        # filled: base, and main (PXP 0.97 ≥ 0.95); raw (PXP 0.40) hollow
        assert filled(ax) == {(b, m) for b in ("b1", "b2") for m in ("base", "main")}
    assert_distinct(point_colours(fig))
    assert_legend_clear(fig)
    close(fig)


def test_behaviour_without_ceiling_draws_no_ceiling_line():
    fig = behaviour_figures.draw_behaviour(stats_table({"all": math.nan}), "category learning")
    ax = next(ax for ax in fig.axes if ax.containers)
    assert not gid_lines(ax, "noise-ceiling") and "noise ceiling" not in legend_texts(fig)
    close(fig)


def test_geometry_whiskers_are_1_96_bootstrap_sd():
    rng = np.random.default_rng(0)
    table = pd.DataFrame([(b, v) for b in ("b1", "b2", "b3") for v in ("base", "main")], columns=["backbone", "variant"])
    for column, _ in behaviour_figures.GEOMETRY_PANELS:
        table[column] = rng.uniform(0.2, 0.9, len(table))
        table[f"{column}_boot_sd"] = rng.uniform(0.01, 0.05, len(table))
    fig = behaviour_figures.draw_geometry(table)
    axes = [ax for ax in fig.axes if ax.containers]
    for ax, (column, _) in zip(axes, behaviour_figures.GEOMETRY_PANELS):
        points = plotted(ax)
        for row in table.to_dict("records"):
            value, sd = row[column], row[f"{column}_boot_sd"]
            assert points[(row["backbone"], row["variant"])] == pytest.approx((value, value - Z * sd, value + Z * sd))
    assert_legend_clear(fig)
    close(fig)


def test_tsne_one_colour_per_label_and_legend_outside():
    rng = np.random.default_rng(1)
    labels = np.array([f"class{i % 25}" for i in range(100)])
    base, meta = rng.normal(size=(100, 2)), rng.normal(size=(100, 2))
    fig = behaviour_figures.draw_tsne(base, meta, labels, "t")
    for ax, points in zip(fig.axes, (base, meta)):
        colours = {}
        for collection in ax.collections:
            np.testing.assert_allclose(collection.get_offsets(), points[labels == collection.get_label()])
            colours[collection.get_label()] = {tuple(to_rgb(c)) for c in collection.get_facecolors()}
        assert set(colours) == set(labels)
        assert_distinct(colours, min_distance=0.05)
    assert_legend_clear(fig)
    close(fig)


def test_figure_things_cli_with_and_without_stats(tmp_path, monkeypatch):
    """The CLI draws what its CSV files hold: accuracies with Wilson intervals and, given --stats, the R² panel."""
    from metalign.behaviour import cli as behaviour_cli

    saved = keep_saved_figures(monkeypatch, behaviour_figures)
    parser = argparse.ArgumentParser()
    behaviour_cli.register(parser.add_subparsers())
    things_table().to_csv(tmp_path / "things.csv", index=False)
    stats_table({"all": 0.6}).to_csv(tmp_path / "stats.csv", index=False)
    for name, extra in (("plain.png", []), ("stats.png", ["--stats", str(tmp_path / "stats.csv")])):
        args = parser.parse_args(["figure-things", "--table", str(tmp_path / "things.csv"),
                                  "--out", str(tmp_path / name), *extra])
        args.func(args)
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    table, stats = pd.read_csv(tmp_path / "things.csv"), pd.read_csv(tmp_path / "stats.csv")
    for fig, n_panels in zip(saved, (2, 3)):
        axes = [ax for ax in fig.axes if ax.containers]
        assert len(axes) == n_panels
        for ax, (column, count) in zip(axes, (("zero_shot_acc", "n_triplets"), ("cv_acc", "n_trials"))):
            points = plotted(ax)
            assert set(points) == set(zip(table["backbone"], table["variant"]))
            for row in table.to_dict("records"):
                assert points[(row["backbone"], row["variant"])] == pytest.approx(
                    (row[column], *wilson(row[column], row[count])))
    r2_panel = [ax for ax in saved[1].axes if ax.containers][-1]
    points = plotted(r2_panel)
    first = stats.drop_duplicates(["backbone", "model"])  # base from main_vs_base, as the statistics define it
    assert set(points) == set(zip(first["backbone"], first["model"]))
    for row in first.itertuples():
        half = scipy_stats.t.ppf(0.975, row.n_participants - 1) * row.r2_participant_sem
        assert points[(row.backbone, row.model)] == pytest.approx(
            (row.r2_participant_mean, row.r2_participant_mean - half, row.r2_participant_mean + half))
    assert [line.get_ydata()[0] for line in gid_lines(r2_panel, "noise-ceiling")] == pytest.approx([0.6])
    for fig in saved:
        close(fig)


# ----------------------------------------------------------------------------------------------- training


def write_metrics(root: Path, backbone: str, variant: str, seed: int) -> tuple[Path, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    steps = np.arange(100, 1100, 100)
    val = pd.DataFrame({"step": steps, "split": "val", "score": rng.uniform(0.2, 0.6, 10),
                        "acc": rng.uniform(0.5, 0.9, 10)})
    train = val.assign(split="train", score=9.0, acc=9.0)  # never plotted
    path = root / backbone / f"{variant}.metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat([train, val]).to_csv(path, index=False)
    return path, val


def test_learning_curves_rows_per_backbone_lines_are_the_validation_rows(tmp_path):
    written = {(b, v): write_metrics(tmp_path, b, v, i) for i, (b, v) in
               enumerate(itertools.product(("b1", "b2"), ("main", "lstm", "sub20")))}
    fig = train_figures.draw_curves([path for path, _ in written.values()])
    axes = np.array(fig.axes).reshape(2, 2)
    colours: dict[str, set] = {}
    for (backbone, variant), (_, val) in written.items():
        row = axes[["b1", "b2"].index(backbone)]
        assert backbone in row[0].get_ylabel()
        for ax, column in zip(row, ("score", "acc")):
            (line,) = gid_lines(ax, f"{backbone}/{variant}")
            np.testing.assert_allclose(line.get_xdata(), val["step"])
            np.testing.assert_allclose(line.get_ydata(), val[column])
            colours.setdefault(variant, set()).add(to_rgb(line.get_color()))
    assert_distinct(colours)
    assert legend_texts(fig)[:3] == ["lstm", "main", "sub20"]
    assert_legend_clear(fig)
    close(fig)


def test_icl_curves_are_the_file_arrays(tmp_path):
    rng = np.random.default_rng(3)
    written = {}
    for backbone, variant in itertools.product(("b1", "b2"), ("main", "noemb")):
        path = tmp_path / backbone / f"{variant}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        curves = {name: rng.uniform(size=12) for name in ("acc", "mse_pos", "mse_all")}
        with h5py.File(path, "w") as handle:
            for name, values in curves.items():
                handle.create_dataset(name, data=values)
            handle.attrs["n_episodes"] = 40
        written[(backbone, variant)] = (path, curves)
    fig = train_figures.draw_icl([path for path, _ in written.values()])
    axes = np.array(fig.axes).reshape(2, 3)
    for (backbone, variant), (_, curves) in written.items():
        row = axes[["b1", "b2"].index(backbone)]
        assert row[0].get_title(loc="left") == f"{backbone} (n = 40 episodes)"
        for ax, name in zip(row, ("acc", "mse_pos", "mse_all")):
            (line,) = gid_lines(ax, f"{backbone}/{variant}")
            np.testing.assert_allclose(line.get_xdata(), np.arange(1, 13))
            np.testing.assert_allclose(line.get_ydata(), curves[name])
    assert_legend_clear(fig)
    close(fig)


# ----------------------------------------------------------------------------------------------- brain, downstream


def test_roi_points_are_subject_means_with_sem_and_fdr_fill():
    rng = np.random.default_rng(4)
    records = [{"backbone": b, "variant": v, "subject": s, "roi": r, "fold": f, "value": rng.normal()}
               for b in ("b1", "b2") for v in ("base", "main", "raw") for s in ("sub-01", "sub-02", "sub-03")
               for r in ("V1", "FFA", "LOC") for f in range(4)]
    folds = pd.DataFrame(records)
    stats = pd.DataFrame([{"backbone": b, "variant": v, "roi": r, "stars": "**" if (v, r) == ("main", "FFA") else ""}
                          for b in ("b1", "b2") for v in ("main", "raw") for r in ("V1", "FFA", "LOC")])
    fig = brain_figures.draw_rois(folds, stats, "demo", ["V1", "FFA", "LOC"])
    axes = [ax for ax in fig.axes if ax.containers]
    assert [ax.get_title() for ax in axes] == ["b1", "b2"]
    for ax in axes:
        points = plotted(ax)
        assert tick_labels(ax) == ["V1", "FFA", "LOC"]
        for (roi, variant), (y, low, high) in points.items():
            rows = folds[(folds["backbone"] == ax.get_title()) & (folds["variant"] == variant) & (folds["roi"] == roi)]
            subject_means = np.array([rows.loc[rows["subject"] == s, "value"].mean() for s in ("sub-01", "sub-02",
                                                                                               "sub-03")])
            sem = subject_means.std(ddof=1) / np.sqrt(3)
            assert (y, low, high) == pytest.approx((subject_means.mean(), subject_means.mean() - sem,
                                                    subject_means.mean() + sem))
        assert len(points) == 9
        assert filled(ax) == {(r, "base") for r in ("V1", "FFA", "LOC")} | {("FFA", "main")}
    assert_distinct(point_colours(fig))
    assert_legend_clear(fig)
    close(fig)


def test_gain_points_are_meta_minus_base():
    alignment = pd.DataFrame({"backbone": ["b1"] * 3 + ["b2"] * 3, "variant": ["base", "main", "raw"] * 2,
                              "representation": ["base", "meta", "meta"] * 2,
                              "zero_shot_acc": [0.40, 0.45, 0.38, 0.50, 0.49, 0.56]})
    shape = alignment.assign(shape_bias=[0.2, 0.3, 0.25, 0.6, 0.4, 0.7]).drop(columns="zero_shot_acc")
    fig = downstream_figures.draw_gain(alignment, {"shape_bias": shape})
    ax = fig.axes[0]
    expected = {"b1": [(0.05, 0.10), (-0.02, 0.05)], "b2": [(-0.01, -0.2), (0.06, 0.1)]}
    colours = {}
    for collection in ax.collections:
        np.testing.assert_allclose(collection.get_offsets(), expected[collection.get_gid()], atol=1e-12)
        for variant, colour in zip(("main", "raw"), collection.get_facecolors()):
            colours.setdefault(variant, set()).add(to_rgb(colour))
    assert {c.get_gid() for c in ax.collections} == {"b1", "b2"}
    assert len({c.get_paths()[0].vertices.tobytes() for c in ax.collections}) == 2  # one marker per backbone
    assert_distinct(colours)
    assert not ax.texts  # no per-point labels over the data
    assert_legend_clear(fig)
    close(fig)


# ----------------------------------------------------------------------------------------------- the study's grid


def study_grid() -> tuple[list[str], list[str]]:
    """Backbones and representations of config/config.yaml: base + every variant with a representation."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    variants = [v for v, spec in config["variants"].items() if not spec.get("no_embed")]
    return list(config["backbones"]), ["base", *variants]


def test_study_grid_size_keeps_colours_distinct_and_legend_clear(tmp_path):
    backbones, representations = study_grid()
    assert (len(backbones), len(representations)) == (7, 23)
    rng = np.random.default_rng(5)
    grid = pd.DataFrame(list(itertools.product(backbones, representations)), columns=["backbone", "variant"])
    table = grid.assign(zero_shot_acc=rng.uniform(0.4, 0.6, len(grid)), n_triplets=4_700_000,
                        cv_acc=rng.uniform(0.4, 0.6, len(grid)), n_trials=4_500_000)
    stats = pd.concat([grid[grid["variant"] == v].assign(comparison=f"{v}_vs_base", model=m)
                       for v in representations[1:] for m in (v, "base")], ignore_index=True)
    stats = pd.concat([stats.assign(subset=s) for s in behaviour_figures.SUBSET_ORDER], ignore_index=True).assign(
        r2_participant_mean=lambda f: rng.uniform(0.1, 0.3, len(f)), r2_participant_sem=0.01, n_participants=400,
        noise_ceiling=0.45, pxp=lambda f: rng.uniform(size=len(f)))
    for fig in (behaviour_figures.draw_things(table, stats), behaviour_figures.draw_behaviour(stats, "levels")):
        colours = point_colours(fig)
        assert set(colours) == set(representations)
        assert_distinct(colours)
        for ax in (ax for ax in fig.axes if ax.containers):
            assert len(plotted(ax)) == len(backbones) * len(representations)
        assert set(representations) <= set(legend_texts(fig))
        assert_legend_clear(fig)
        close(fig)
    paths = [write_metrics(tmp_path, b, v, i)[0] for i, (b, v) in enumerate(itertools.product(
        backbones, yaml.safe_load((REPO / "config" / "config.yaml").read_text())["variants"]))]
    fig = train_figures.draw_curves(paths)
    colours: dict[str, set] = {}
    for line in (line for ax in fig.axes for line in ax.lines if line.get_gid()):
        colours.setdefault(line.get_gid().split("/")[1], set()).add(to_rgb(line.get_color()))
    assert len(colours) == 23
    assert_distinct(colours)
    assert_legend_clear(fig)
    close(fig)

"""Behaviour stage commands: read inputs, call the science in this package, write results through
`metalign.results` (per-trial parquet + summary JSON with provenance; figures).

    evaluate-things, evaluate-levels, evaluate-category, evaluate-reward, evaluate-geometry   one representation
    noise-ceiling, behaviour-stats                                                          across representations
    figure-things, figure-behaviour, figure-geometry, figure-tsne                           figures
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from metalign.behaviour import geometry as geo
from metalign.behaviour import learning, levels, odd_one_out, stats
from metalign.io import DataContractError, read_manifest, write_csv, write_json
from metalign.results import file_inputs, or_nan, read_features, write_results

log = logging.getLogger(__name__)
N_EXAMPLES = 10  # missing Levels image stems listed in the summary


# --------------------------------------------------------------------------------------------- one representation


def cmd_evaluate_things(args: argparse.Namespace) -> None:
    unique_ids = odd_one_out.read_unique_ids(args.unique_ids)
    features, ids, attrs = read_features(args.features)
    representation, chosen = odd_one_out.concept_matrix(features, ids, read_manifest(args.manifest), unique_ids,
                                                        source=str(args.features))
    triplets = odd_one_out.load_triplets(args.triplets, n_concepts=len(unique_ids))
    per_trial, summary = odd_one_out.evaluate(representation, triplets, seed=args.seed)
    ceiling = (odd_one_out.noise_ceiling(triplets) if args.noise_ceiling is None
               else or_nan(json.loads(args.noise_ceiling.read_text())["overall"]))
    summary.update({
        "label": args.label,
        "noise_ceiling": ceiling,
        "mcfadden_r2_normalised": summary["mcfadden_r2"] / ceiling if ceiling > 0 else math.nan,
        "concept_image_ids": dict(zip(unique_ids, chosen)),
    })
    write_results(args.out_summary, summary, file_inputs(triplets=args.triplets, unique_ids=args.unique_ids,
                                                         manifest=args.manifest, features=args.features),
                  attrs, per_trial, args.out_trials)


def cmd_evaluate_levels(args: argparse.Namespace) -> None:
    data = levels.load_levels(args.levels)
    features, ids, attrs = read_features(args.features)
    index, resolved, missing = levels.resolve(data.trials,
                                              levels.stem_rows(read_manifest(args.manifest), ids, str(args.manifest)))
    if missing:
        log.warning("%s: %d trial(s) excluded, %d image stem(s) without a feature row, e.g. %s", args.levels,
                    int((~resolved).sum()), len(missing), missing[:N_EXAMPLES])
    trials = data.trials[resolved].reset_index(drop=True)
    per_trial, summary = levels.evaluate_levels(features, trials, index[resolved], seed=args.seed)
    if args.noise_ceiling is not None:
        ceiling = json.loads(args.noise_ceiling.read_text())
        summary["noise_ceiling"] = or_nan(ceiling["overall"])
        for kind, value in ceiling.get("by_type", {}).items():
            summary[f"noise_ceiling__{kind}"] = or_nan(value)
        summary["mcfadden_r2_normalised"] = summary["mcfadden_r2"] / summary["noise_ceiling"] \
            if summary["noise_ceiling"] > 0 else math.nan
    summary.update({
        "label": args.label,
        "n_raw_trials": data.n_raw, "n_excluded_not_exp_trial": data.n_not_exp,
        "n_excluded_bad_selection": data.n_bad_selection, "n_excluded_missing_image": int((~resolved).sum()),
        "n_missing_images": len(missing), "missing_image_examples": missing[:N_EXAMPLES],
    })
    write_results(args.out_summary, summary,
                  file_inputs(levels=args.levels, manifest=args.manifest, features=args.features),
                  attrs, per_trial, args.out_trials)


def _write_learning(args: argparse.Namespace, task: str, per_trial: pd.DataFrame, summary: dict,
                    attrs: dict) -> None:
    summary.update({"label": args.label, "task": task})
    write_results(args.out_summary, summary, file_inputs(table=args.table, features=args.features), attrs,
                  per_trial, args.out_trials)


def _choice_model(args: argparse.Namespace) -> dict[str, str]:
    return {"scoring": args.scoring, "temperature": args.temperature, "t_bounds": args.t_bounds}


def cmd_evaluate_category(args: argparse.Namespace) -> None:
    features, ids, attrs = read_features(args.features)
    per_trial, summary = learning.evaluate_category(learning.read_category(args.table), features.astype(np.float64),
                                                    ids, str(args.features), args.c_selection, **_choice_model(args))
    _write_learning(args, "category", per_trial, summary, attrs)


def cmd_evaluate_reward(args: argparse.Namespace) -> None:
    features, ids, attrs = read_features(args.features)
    per_trial, summary = learning.evaluate_reward(learning.read_reward(args.table), features.astype(np.float64), ids,
                                                  str(args.features), **_choice_model(args))
    _write_learning(args, "reward", per_trial, summary, attrs)


def cmd_evaluate_geometry(args: argparse.Namespace) -> None:
    images, labels, concepts, unique_ids, attrs = geo.concept_inputs(args.features, args.manifest, args.unique_ids)
    human = np.loadtxt(args.embedding, ndmin=2)
    if len(human) != len(unique_ids):
        raise DataContractError(f"{args.embedding}: {len(human)} rows but {len(unique_ids)} concepts")
    metadata = geo.read_metadata(args.metadata, unique_ids, args.id_column, args.label_columns)
    summary = geo.geometry(images, labels, concepts, human, metadata, args.n_bootstrap, args.seed)
    summary.update({"label": args.label, "label_columns": args.label_columns})
    write_results(args.out, summary, file_inputs(features=args.features, manifest=args.manifest,
                                                 embedding=args.embedding, metadata=args.metadata), attrs)


# --------------------------------------------------------------------------------------------- across representations


def _key(path: Path) -> tuple[str, str]:
    """`…/<backbone>/<variant>.parquet`: the DAG's layout names every table."""
    return path.parent.name, path.stem


def _group(text: str) -> tuple[str, list[str]]:
    name, _, members = text.partition("=")
    if not name or not members:
        raise argparse.ArgumentTypeError(f"expected NAME=model1,model2[,…], got {text!r}")
    return name, members.split(",")


def read_noise_ceiling(path: str | Path | None) -> dict[str, float]:
    """Subset → ceiling from a `noise-ceiling` JSON ("all" plus one entry per triplet type)."""
    if path is None:
        return {}
    data = json.loads(Path(path).read_text())
    return {"all": or_nan(data.get("overall")), **{k: or_nan(v) for k, v in data.get("by_type", {}).items()}}


def cmd_behaviour_stats(args: argparse.Namespace) -> None:
    tables = {_key(path): path for path in map(Path, args.trials)}
    frame = stats.benchmark_statistics(tables, args.n_choices, read_noise_ceiling(args.noise_ceiling),
                                       args.subset_column, args.reference, dict(args.group or []), args.seed)
    frame.insert(0, "benchmark", args.benchmark)
    write_csv(args.out, frame)


def cmd_noise_ceiling(args: argparse.Namespace) -> None:
    if args.things_triplets is not None:
        result = odd_one_out.noise_ceiling_summary(odd_one_out.load_triplets(args.things_triplets))
    else:
        result = levels.noise_ceiling_summary(levels.load_levels(args.levels).trials)
    write_json(args.out, {**result, "source": str(args.things_triplets or args.levels)})


# --------------------------------------------------------------------------------------------- figures


def cmd_figure_things(args: argparse.Namespace) -> None:
    from metalign.behaviour.figures import things_figure  # matplotlib only for the jobs that draw

    things_figure(pd.read_csv(args.table), args.out, None if args.stats is None else pd.read_csv(args.stats))


def cmd_figure_behaviour(args: argparse.Namespace) -> None:
    from metalign.behaviour.figures import behaviour_figure

    behaviour_figure(pd.read_csv(args.stats), args.out, args.title)


def cmd_figure_geometry(args: argparse.Namespace) -> None:
    from metalign.behaviour.figures import geometry_figure

    geometry_figure(pd.read_csv(args.table), args.out)


def cmd_figure_tsne(args: argparse.Namespace) -> None:
    from metalign.behaviour.figures import tsne_figure

    _, _, base, unique_ids, _ = geo.concept_inputs(args.base, args.manifest, args.unique_ids)
    _, _, meta, _, _ = geo.concept_inputs(args.meta, args.manifest, args.unique_ids)
    labels = geo.read_metadata(args.metadata, unique_ids, args.id_column, [args.colour_column])[args.colour_column]
    tsne_figure(base, meta, labels.replace("", "(none)").to_numpy(), args.out, args.title, args.seed)


# --------------------------------------------------------------------------------------------- parsers


def _add_outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-trials", required=True, type=Path, help="per-trial table (parquet)")
    parser.add_argument("--out-summary", required=True, type=Path, help="summary (JSON)")


def _add_representation(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--features", required=True, type=Path, help=f"{what} (HDF5 with 'features' and 'ids')")
    parser.add_argument("--label", required=True, help="name of the representation: base, or the variant")


def register(subparsers: argparse._SubParsersAction) -> None:
    things = subparsers.add_parser("evaluate-things", help="THINGS odd-one-out: zero-shot, CV choice model, ceiling",
                                   description=odd_one_out.__doc__)
    things.add_argument("--triplets", required=True, type=Path, help="tab-separated THINGS triplet table")
    things.add_argument("--unique-ids", required=True, type=Path, help="unique_id.txt: concept order, one per line")
    things.add_argument("--manifest", required=True, type=Path, help="THINGS image manifest (CSV)")
    _add_representation(things, "THINGS representation")
    things.add_argument("--seed", type=int, default=1234, help="cross-validation fold seed")
    things.add_argument("--noise-ceiling", type=Path,
                        help="cached JSON from `noise-ceiling` (computed from the triplets when absent)")
    _add_outputs(things)
    things.set_defaults(func=cmd_evaluate_things)

    lv = subparsers.add_parser("evaluate-levels", help="Levels odd-one-out: zero-shot and CV, per triplet type",
                               description=levels.__doc__)
    lv.add_argument("--levels", required=True, type=Path, help="Levels pickle")
    lv.add_argument("--manifest", required=True, type=Path, help="manifest of the Levels image set (CSV)")
    _add_representation(lv, "Levels image-set representation")
    lv.add_argument("--seed", type=int, default=1234, help="cross-validation fold seed")
    lv.add_argument("--noise-ceiling", type=Path, help="cached JSON from `noise-ceiling --levels`")
    _add_outputs(lv)
    lv.set_defaults(func=cmd_evaluate_levels)

    for name, help_text in (("evaluate-category", "category learning: online logistic learner + softmax choices"),
                            ("evaluate-reward", "reward learning: online Bayesian ridge + softmax choices")):
        task = subparsers.add_parser(name, help=help_text, description=learning.__doc__)
        task.add_argument("--table", required=True, type=Path,
                          help="category_learning.csv or reward_learning.csv (columns: docs/datasets.md)")
        _add_representation(task, "THINGS representation")
        if name == "evaluate-category":
            task.add_argument("--c-selection", choices=learning.C_SELECTIONS, default="cv",
                              help="cv: the study's 5-fold CV accuracy on all trials' labels (ties to the smallest C); "
                                   "cv_logloss: the same folds scored by log-loss; causal: prequential, past only")
        task.add_argument("--scoring", choices=learning.SCORINGS, default="in_sample",
                          help="in_sample: the study's; loo: each trial scored by a temperature fitted without it")
        task.add_argument("--temperature", choices=learning.TEMPERATURES, default="individual",
                          help="individual: the study's, one per participant; hierarchical: inverse temperatures "
                               "partially pooled across participants (Gaussian, Laplace marginal likelihood)")
        task.add_argument("--t-bounds", choices=learning.T_BOUNDS, default="study",
                          help="study: log T in [-4.6, 4.6]; scaled: the same on log(T / RMS value difference)")
        _add_outputs(task)
        task.set_defaults(func=cmd_evaluate_category if name == "evaluate-category" else cmd_evaluate_reward)

    geometry = subparsers.add_parser("evaluate-geometry", help="CKA vs SPoSE and class separation (fine, coarse)",
                                     description=geo.__doc__)
    _add_representation(geometry, "THINGS representation")
    geometry.add_argument("--manifest", required=True, type=Path, help="THINGS manifest (label = concept)")
    geometry.add_argument("--unique-ids", required=True, type=Path, help="unique_id.txt (concept order)")
    geometry.add_argument("--embedding", required=True, type=Path, help="SPoSE embedding, rows in unique_id order")
    geometry.add_argument("--metadata", required=True, type=Path, help="THINGS-metadata-style TSV")
    geometry.add_argument("--id-column", default="uniqueID", help="metadata column holding the concept id")
    geometry.add_argument("--label-columns", required=True, nargs="+", help="metadata columns used as coarse labels")
    geometry.add_argument("--n-bootstrap", type=int, default=geo.N_BOOTSTRAP,
                          help="bootstrap resamples of concepts for the class-separation interval")
    geometry.add_argument("--seed", type=int, default=1234, help="seed of the bootstrap")
    geometry.add_argument("--out", required=True, type=Path, help="summary (JSON)")
    geometry.set_defaults(func=cmd_evaluate_geometry)

    stats_parser = subparsers.add_parser("behaviour-stats", help="paired BMS / Wilcoxon / pseudo-R² of one benchmark",
                                         description=stats.__doc__)
    stats_parser.add_argument("--benchmark", required=True, help="benchmark name written into every row")
    stats_parser.add_argument("--trials", required=True, nargs="+", type=Path,
                              help="per-trial tables <backbone>/<variant>.parquet (variant 'base' = backbone features)")
    stats_parser.add_argument("--n-choices", required=True, type=int,
                              help="options per trial: 3 odd-one-out, 2 learning")
    stats_parser.add_argument("--noise-ceiling", type=Path, help="JSON from `noise-ceiling` (odd-one-out benchmarks)")
    stats_parser.add_argument("--subset-column", help="per-trial column whose values are extra subsets (triplet_type)")
    stats_parser.add_argument("--reference", default="main", help="variant that ablations are compared against")
    stats_parser.add_argument("--group", action="append", type=_group,
                              help="K-way BMS group NAME=v1,v2,v3 (repeatable)")
    stats_parser.add_argument("--seed", type=int, default=1234, help="seed of the Monte Carlo exceedance probabilities")
    stats_parser.add_argument("--out", required=True, type=Path, help="statistics table (CSV)")
    stats_parser.set_defaults(func=cmd_behaviour_stats)

    ceiling = subparsers.add_parser("noise-ceiling", help="odd-one-out noise ceiling from repeated triplets (docs/methods.md §11)")
    source = ceiling.add_mutually_exclusive_group(required=True)
    source.add_argument("--things-triplets", type=Path, help="THINGS triplet table (tab-separated)")
    source.add_argument("--levels", type=Path, help="Levels pickle")
    ceiling.add_argument("--out", required=True, type=Path, help="JSON: overall, by_type, repeated-triplet counts")
    ceiling.set_defaults(func=cmd_noise_ceiling)

    for name, help_text, table, handler in (
            ("figure-things", "THINGS odd-one-out bars from the summary table", "things_ooo", cmd_figure_things),
            ("figure-geometry", "CKA and class separation bars from geometry.csv", "geometry", cmd_figure_geometry)):
        figure = subparsers.add_parser(name, help=help_text)
        figure.add_argument("--table", required=True, type=Path, help=f"alignment/{table}.csv")
        figure.add_argument("--out", required=True, type=Path, help="the figure (PNG)")
        if name == "figure-things":
            figure.add_argument("--stats", type=Path, help="alignment/things_ooo_stats.csv: adds the McFadden R² "
                                                           "panel (across participants, with the noise ceiling)")
        figure.set_defaults(func=handler)
    fig_behaviour = subparsers.add_parser("figure-behaviour", help="pseudo-R² bars with PXP from a *_stats.csv table")
    fig_behaviour.add_argument("--stats", required=True, type=Path, help="alignment/<benchmark>_stats.csv")
    fig_behaviour.add_argument("--title", required=True, help="figure title")
    fig_behaviour.add_argument("--out", required=True, type=Path, help="the figure (PNG)")
    fig_behaviour.set_defaults(func=cmd_figure_behaviour)
    tsne = subparsers.add_parser("figure-tsne", help="t-SNE of base and meta concept representations")
    tsne.add_argument("--base", required=True, type=Path, help="backbone features (HDF5)")
    tsne.add_argument("--meta", required=True, type=Path, help="meta-learned representation (HDF5)")
    tsne.add_argument("--manifest", required=True, type=Path, help="THINGS manifest (label = concept)")
    tsne.add_argument("--unique-ids", required=True, type=Path, help="unique_id.txt (concept order)")
    tsne.add_argument("--metadata", required=True, type=Path, help="THINGS-metadata-style TSV")
    tsne.add_argument("--id-column", default="uniqueID", help="metadata column holding the concept id")
    tsne.add_argument("--colour-column", required=True, help="metadata column that colours the points")
    tsne.add_argument("--seed", type=int, default=1234, help="t-SNE seed")
    tsne.add_argument("--title", required=True, help="figure title")
    tsne.add_argument("--out", required=True, type=Path, help="the figure (PNG)")
    tsne.set_defaults(func=cmd_figure_tsne)

"""Simulated behaviour beyond THINGS triplets, in the real file formats (docs/datasets.md), from the demo world.

- Levels: image triplets of the demo THINGS images, typed by the concepts' shape (the coarse class):
  `within_class` (three concepts of one shape), `between_class` (three shapes), `class_border` (two and one), plus
  untyped (None) trials, non-experimental trials, repeats in a shuffled order and trials naming an image that does
  not exist. Paths are Levels-style (`images/<class>/<stem>.JPEG`) whose stems are the THINGS file stems.
- Category learning: labels are a threshold on one graded planted dimension; choices come from an online
  learner on the planted features through the softmax choice rule: at trial t, scikit-learn's
  LogisticRegression (C = 1) refitted on trials < t.
- Reward learning: rewards are 0–100 rescalings of one graded planted dimension; choices come from scikit-learn's
  BayesianRidge refitted on both options of trials < t, through softmax(v / T).

In every task the planted embedding is the generating model, so evaluations have a known answer. The learners here
are plain scikit-learn refits, deliberately not the evaluator's exact fast learners (metalign.behaviour.learning),
so that a bug in those shows up in the demo's known-answer tests instead of being simulated into the data.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from sklearn.linear_model import BayesianRidge, LogisticRegression
from threadpoolctl import threadpool_limits

from metalign.behaviour.levels import NONE_TYPE, TRIPLET_TYPES, stem
from metalign.config.demo import validate_behaviour
from metalign.demo.behaviour import log_choice_probabilities, odd_one_out_logits
from metalign.demo.factors import planted_embedding, sample_concepts
from metalign.demo.streams import stream_rng as _rng
from metalign.io import atomic_path, write_csv, write_json

CATEGORY_C = 1.0
LOG_VALUE_FLOOR = math.log(1e-15)     # values are clipped at 1e-15 before the log (docs/methods.md §9.3)


class Stream(IntEnum):
    LEVELS = 0
    CATEGORY = 1
    REWARD = 2


@dataclass(frozen=True)
class DemoImages:
    """THINGS-layout images (`<concept>/<file>.jpg`), each image's concept row, the concepts' coarse class and the
    planted concept embedding (rows = concepts)."""

    image_ids: list[str]
    concept: np.ndarray
    coarse: np.ndarray
    embedding: np.ndarray

    def features(self) -> np.ndarray:
        """Ideal-observer image features: the planted embedding of each image's concept."""
        return self.embedding[self.concept]


def read_world(world: str | Path) -> DemoImages:
    """The demo world's THINGS images, concepts (shape = coarse class) and planted embedding, as written."""
    things = Path(world) / "things"
    truth = json.loads((things / "ground_truth.json").read_text())
    unique_ids = [line.strip() for line in (things / "unique_id.txt").read_text().splitlines() if line.strip()]
    shapes = {c["unique_id"]: c["shape"] for c in truth["concepts"]}
    embedding = np.loadtxt(things / truth["embedding_file"], ndmin=2)
    image_ids, concept = [], []
    for row, unique_id in enumerate(unique_ids):
        for path in sorted((things / "images" / unique_id).glob("*.jpg")):
            image_ids.append(f"{unique_id}/{path.name}")
            concept.append(row)
    return DemoImages(image_ids, np.asarray(concept), np.asarray([shapes[u] for u in unique_ids]), embedding)


def synthetic_images(n_concepts: int, images_per_concept: int, seed: int) -> DemoImages:
    """The demo world's concepts and planted embedding without rendering: ids in the THINGS layout (for tests and
    benchmarks that need only ids and the ideal observer)."""
    concepts = sample_concepts(n_concepts, np.random.default_rng(seed))
    ids = [f"{c.unique_id}/{c.unique_id}_{n + 1:02d}a.jpg" for c in concepts for n in range(images_per_concept)]
    return DemoImages(ids, np.repeat(np.arange(n_concepts), images_per_concept),
                      np.asarray([c.shape for c in concepts]), planted_embedding(concepts))


def _choose(rng: np.random.Generator, log_p: np.ndarray) -> np.ndarray:
    """One draw per row of (n, k) log-probabilities."""
    return (rng.random(len(log_p))[:, None] >= np.cumsum(np.exp(log_p), axis=1)[:, :-1]).sum(axis=1)


# --------------------------------------------------------------------------------------------- Levels


def _concepts_of(images: DemoImages) -> dict[str, np.ndarray]:
    classes = sorted(set(images.coarse))
    return {c: np.flatnonzero(images.coarse == c) for c in classes}


def _triplet(rng: np.random.Generator, kind: str | None, by_class: dict[str, np.ndarray]) -> np.ndarray:
    """Three distinct concepts forming a triplet of the given type (None: any three concepts)."""
    classes = list(by_class)
    if kind == "within_class":
        pool = [c for c in classes if len(by_class[c]) >= 3]
        return rng.choice(by_class[pool[rng.integers(len(pool))]], 3, replace=False)
    if kind == "between_class":
        return np.array([rng.choice(by_class[c]) for c in rng.choice(classes, 3, replace=False)])
    if kind == "class_border":
        pool = [c for c in classes if len(by_class[c]) >= 2]
        pair = pool[rng.integers(len(pool))]
        other = [c for c in classes if c != pair]
        odd = rng.choice(by_class[other[rng.integers(len(other))]])
        return rng.permutation(np.r_[rng.choice(by_class[pair], 2, replace=False), odd])
    return rng.choice(np.concatenate(list(by_class.values())), 3, replace=False)


def levels_path(images: DemoImages, image: int) -> str:
    """Levels-style path of a THINGS image: another folder and extension, the same file stem."""
    return f"images/{images.coarse[images.concept[image]]}/{stem(images.image_ids[image])}.JPEG"


def simulate_levels(images: DemoImages, spec: Mapping[str, Any], seed: int) -> tuple[dict[str, list[dict]], dict]:
    """Levels pickle content (participant id → trial dicts) and the ideal observer's expected accuracy by type."""
    by_class = _concepts_of(images)
    images_of = {c: np.flatnonzero(images.concept == c) for c in range(len(images.embedding))}
    data, hits = {}, {kind: [] for kind in (*TRIPLET_TYPES, NONE_TYPE)}
    for p in range(spec["n_participants"]):
        rng = _rng(seed, Stream.LEVELS, p)
        trials: list[dict] = []
        n_repeat = int(round(spec["repeat_fraction"] * spec["trials_per_participant"]))
        n_none = int(round(spec["none_fraction"] * spec["trials_per_participant"]))
        kinds = [TRIPLET_TYPES[i % 3] for i in range(spec["trials_per_participant"] - n_repeat - n_none)]
        kinds = list(rng.permutation(np.array(kinds + [None] * n_none, dtype=object)))
        fresh = []
        for kind in kinds:
            concepts = _triplet(rng, kind, by_class)
            fresh.append((kind, np.array([rng.choice(images_of[c]) for c in concepts])))
        repeats = [(kind, rng.permutation(chosen)) for kind, chosen in
                   (fresh[i] for i in rng.choice(len(fresh), n_repeat, replace=False))]
        for kind, chosen in fresh + repeats:
            logits = odd_one_out_logits(images.embedding, images.concept[chosen][None, :])
            log_p = log_choice_probabilities(logits, spec["temperature"])
            selected = int(_choose(rng, log_p)[0])
            hits[kind or NONE_TYPE].append(float(np.exp(log_p[0, logits[0].argmax()])))
            paths = [levels_path(images, i) for i in chosen]
            trials.append({"image1Path": paths[0], "image2Path": paths[1], "image3Path": paths[2],
                           "selected_image": paths[selected], "exp_trial_type": "exp_trial", "triplet_type": kind})
        for _ in range(spec["catch_trials"]):
            trials.insert(int(rng.integers(len(trials) + 1)), {**trials[0], "exp_trial_type": "catch_trial"})
        for _ in range(spec["missing_image_trials"]):
            broken = dict(trials[int(rng.integers(len(trials)))])
            position = next(q for q in (1, 2, 3) if broken[f"image{q}Path"] != broken["selected_image"])
            broken[f"image{position}Path"] = f"images/missing/n00000000_{p:04d}.JPEG"
            trials.append(broken)
        data[f"participant_{p + 1:03d}"] = trials
    truth = {"temperature": spec["temperature"],
             "expected_accuracy": {k: float(np.mean(v)) for k, v in hits.items() if v}}
    return data, truth


# --------------------------------------------------------------------------------------------- learning tasks


def reference_category_values(features: np.ndarray, labels: np.ndarray, c: float = CATEGORY_C) -> np.ndarray:
    """(n, 2) log class probabilities of trial t from LogisticRegression(C=c) refitted on trials < t; log ½ until
    both classes have occurred."""
    values = np.full((len(labels), 2), math.log(0.5))
    for t in range(1, len(labels)):
        if len(np.unique(labels[:t])) == 2:
            model = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(features[:t], labels[:t])
            values[t] = model.predict_log_proba(features[t:t + 1])[0]
    return np.maximum(values, LOG_VALUE_FLOOR)


def reference_reward_values(left: np.ndarray, right: np.ndarray, reward_left: np.ndarray,
                            reward_right: np.ndarray) -> np.ndarray:
    """(n, 2) predicted rewards of trial t's options from BayesianRidge refitted on both options of trials < t
    (0 on the first trial)."""
    values = np.zeros((len(left), 2))
    for t in range(1, len(left)):
        x = np.stack([left[:t], right[:t]], axis=1).reshape(2 * t, -1)
        y = np.stack([reward_left[:t], reward_right[:t]], axis=1).ravel()
        values[t] = BayesianRidge().fit(x, y).predict(np.stack([left[t], right[t]]))
    return values


def graded_dimensions(embedding: np.ndarray, min_levels: int = 4) -> np.ndarray:
    """Planted dimensions with at least `min_levels` distinct values across concepts (no one-hot factor codes)."""
    return np.flatnonzero([len(np.unique(np.round(col, 6))) >= min_levels for col in embedding.T])


def stimulus(image_id: str) -> str:
    """The real tables' image column: a path containing `stimuli/<concept>/<file>.jpg`."""
    return f"experiment/stimuli/{image_id}"


def simulate_category(images: DemoImages, spec: Mapping[str, Any], seed: int) -> tuple[pd.DataFrame, dict]:
    """category_learning.csv rows; choices from the reference logistic learner on planted features + softmax."""
    dims = graded_dimensions(images.embedding)
    rows, truth = [], {"temperature": spec["temperature"], "C": CATEGORY_C, "participants": {}}
    for p in range(spec["n_participants"]):
        rng = _rng(seed, Stream.CATEGORY, p)
        dim = int(dims[p % len(dims)])
        values = images.embedding[images.concept, dim]
        threshold = float(np.median(values))
        shown = rng.choice(len(images.image_ids), spec["n_trials"], replace=len(images.image_ids) < spec["n_trials"])
        label = (values[shown] > threshold).astype(np.int64)
        log_v = reference_category_values(images.features()[shown], label)
        choice = _choose(rng, log_choice_probabilities(log_v, spec["temperature"]))
        rows += [{"participant": f"sub-{p + 1:03d}", "trial": t, "image": stimulus(images.image_ids[i]),
                  "choice": int(c), "true_category_binary": int(y)}
                 for t, (i, c, y) in enumerate(zip(shown, choice, label))]
        truth["participants"][f"sub-{p + 1:03d}"] = {"dimension": dim, "threshold": threshold,
                                                     "accuracy": float(np.mean(choice == label))}
    return pd.DataFrame(rows), truth


def simulate_reward(images: DemoImages, spec: Mapping[str, Any], seed: int) -> tuple[pd.DataFrame, dict]:
    """reward_learning.csv rows; choices from the reference Bayesian ridge learner on planted features + softmax."""
    dims = graded_dimensions(images.embedding)
    rows, truth = [], {"temperature": spec["temperature"], "participants": {}}
    for p in range(spec["n_participants"]):
        rng = _rng(seed, Stream.REWARD, p)
        dim = int(dims[p % len(dims)])
        loading = images.embedding[:, dim]
        reward_of = np.round(100 * (loading - loading.min()) / (loading.max() - loading.min()))[images.concept]
        pairs = np.array([rng.choice(len(images.image_ids), 2, replace=False) for _ in range(spec["n_trials"])])
        features = images.features()
        values = reference_reward_values(features[pairs[:, 0]], features[pairs[:, 1]], reward_of[pairs[:, 0]],
                                         reward_of[pairs[:, 1]])
        choice = _choose(rng, log_choice_probabilities(values, spec["temperature"]))
        better = (reward_of[pairs[:, 1]] > reward_of[pairs[:, 0]]).astype(int)
        rows += [{"participant": f"sub-{p + 1:03d}", "trial": t, "left_image": stimulus(images.image_ids[a]),
                  "right_image": stimulus(images.image_ids[b]), "left_reward": int(reward_of[a]),
                  "right_reward": int(reward_of[b]), "choice": int(c)}
                 for t, ((a, b), c) in enumerate(zip(pairs, choice))]
        unequal = reward_of[pairs[:, 0]] != reward_of[pairs[:, 1]]
        truth["participants"][f"sub-{p + 1:03d}"] = {
            "dimension": dim, "accuracy": float(np.mean((choice == better)[unequal]))}
    return pd.DataFrame(rows), truth


def concept_metadata(world: str | Path) -> pd.DataFrame:
    """THINGS_metadata-style table (one row per concept, uniqueID order): the demo's factor labels."""
    things = Path(world) / "things"
    truth = json.loads((things / "ground_truth.json").read_text())
    frame = pd.DataFrame(truth["concepts"])
    return pd.DataFrame({"uniqueID": frame["unique_id"], "shape": frame["shape"], "colour": frame["colour"],
                         "texture": frame["texture"], "size": frame["size_label"]})


# --------------------------------------------------------------------------------------------- entry points


def generate_behaviour(world: str | Path, out: str | Path, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Write levels.pkl, category_learning.csv, reward_learning.csv, things_metadata.tsv and ground_truth.json."""
    spec = validate_behaviour(spec)
    out = Path(out)
    images = read_world(world)
    with threadpool_limits(limits=1):            # thousands of tiny fits gain nothing from BLAS threads
        levels, levels_truth = simulate_levels(images, spec["levels"], spec["seed"])
        category, category_truth = simulate_category(images, spec["category"], spec["seed"])
        reward, reward_truth = simulate_reward(images, spec["reward"], spec["seed"])
    with atomic_path(out / "levels.pkl", suffix=".pkl") as tmp:
        tmp.write_bytes(pickle.dumps(levels, protocol=4))
    write_csv(out / "category_learning.csv", category)
    write_csv(out / "reward_learning.csv", reward)
    with atomic_path(out / "things_metadata.tsv", suffix=".tsv") as tmp:
        concept_metadata(world).to_csv(tmp, sep="\t", index=False)
    truth = {"spec": spec, "levels": levels_truth, "category": category_truth, "reward": reward_truth}
    write_json(out / "ground_truth.json", truth)
    return truth

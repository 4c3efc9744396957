"""Brain alignment: file formats, CV schemes, ridge against himalaya and a naive loop, statistics against hand
computations, recovery of planted encodings, the leak that the leakage-free scheme removes, tables, figures, CLI."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from threadpoolctl import threadpool_limits

from metalign.brain import bold5000, cv, stats, things
from metalign.brain.encoding import encode, read_encoding, stimulus_rows, write_encoding
from metalign.brain.hdf import read_rows_by_id, write_frame
from metalign.brain.ridge import GroupedRidgeCV, LooRidgeCV, alpha_grid, himalaya_fit_predict
from metalign.brain.subject import read_subject, write_subject
from metalign.config.demo import validate_fmri
from metalign.demo import cli as demo_cli
from metalign.demo import fmri as demo_fmri
from metalign.io import DataContractError
from tests.test_figures import filled, keep_saved_figures, plotted, tick_labels

ALPHAS = alpha_grid(-3, 5, 40)
STUDY_ALPHAS = np.logspace(-6, 3, 100)  # upstream bin/eval_brain.py: RidgeCV(alphas=…, alpha_per_target=True)
SPEC = {"seed": 7,
        "things": {"n_subjects": 2, "n_sessions": 6, "n_test_images": 10, "runs_per_session": 2, "volume": [9, 10, 8],
                   "image_sd": 0.6, "session_sd": 0.2, "trial_sd": 0.8},
        "bold5000": {"n_subjects": 1, "n_sessions": 4, "n_repeated": 8, "n_coco": 12, "voxels_per_roi": 6,
                     "runs_per_session": 2, "image_sd": 0.5, "session_sd": 0.2, "trial_sd": 0.8}}


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The demo world's THINGS files that the fMRI simulator reads: ids, planted embedding, image names."""
    root = tmp_path_factory.mktemp("world")
    things_dir = root / "things"
    rng = np.random.default_rng(0)
    concepts = [f"concept{c:02d}" for c in range(30)]
    (things_dir / "images").mkdir(parents=True)
    (things_dir / "unique_id.txt").write_text("".join(c + "\n" for c in concepts))
    np.savetxt(things_dir / "spose_embedding_8d_sorted.txt", np.abs(rng.standard_normal((30, 8))), fmt="%.6f")
    for c in concepts:
        (things_dir / "images" / c).mkdir()
        for k in range(4):
            (things_dir / "images" / c / f"{c}_{k:02d}a.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def fmri_dir(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmri")
    demo_fmri.generate(world, out, SPEC)
    return out


@pytest.fixture(scope="module")
def subject(fmri_dir):
    return things.load_subject(fmri_dir / "things_fmri" / "betas_csv", "01", nc_threshold=5.0)


def planted(world, subject) -> np.ndarray:
    images, features = demo_fmri.read_world(world)
    return features[stimulus_rows(subject, images, "planted")]


# ----------------------------------------------------------------------------------------------- formats


def test_fixed_frame_rows_by_id_not_position(tmp_path):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.standard_normal((40, 6)).astype(np.float32), columns=[str(i) for i in range(6)])
    frame.insert(0, "voxel_id", rng.permutation(40).astype(np.int64))  # rows deliberately not in id order (docs/methods.md P-21)
    write_frame(tmp_path / "r.h5", frame, "ResponseData")
    values, columns = read_rows_by_id(tmp_path / "r.h5", "voxel_id", [7, 0, 39])
    assert columns == [str(i) for i in range(6)]
    np.testing.assert_array_equal(values, frame.set_index("voxel_id").loc[[7, 0, 39]].to_numpy())
    with pytest.raises(DataContractError, match="voxel_id 99 not found"):
        read_rows_by_id(tmp_path / "r.h5", "voxel_id", [99])
    if importlib.util.find_spec("tables"):  # pandas needs PyTables to read HDF5; the layout must be pandas'
        pd.testing.assert_frame_equal(pd.read_hdf(tmp_path / "r.h5"), frame)


def test_things_reader_selects_by_nc_and_joins_by_id(fmri_dir, subject):
    betas_dir = fmri_dir / "things_fmri" / "betas_csv"
    voxels = pd.read_csv(betas_dir / "sub-01_VoxelMetadata.csv")
    stimuli = pd.read_csv(betas_dir / "sub-01_StimulusMetadata.csv")
    chosen = voxels[voxels["nc_singletrial"] > 5.0]
    assert list(subject.voxel_id) == chosen["voxel_id"].astype(str).tolist()
    np.testing.assert_allclose(subject.nc, chosen["nc_singletrial"] / 100)
    assert subject.betas.shape == (len(stimuli), len(chosen))
    assert subject.stimulus[0] == f"{stimuli['concept'][0]}/{stimuli['stimulus'][0]}"
    # the same file with its rows shuffled gives the same subject: rows are found by voxel_id
    frame = pd.DataFrame(read_rows_by_id(betas_dir / "sub-01_ResponseData.h5", "voxel_id", voxels["voxel_id"])[0],
                         columns=[str(i) for i in range(len(stimuli))])
    frame.insert(0, "voxel_id", voxels["voxel_id"].to_numpy(np.int64))
    shuffled = betas_dir.parent / "shuffled"
    shuffled.mkdir(exist_ok=True)
    write_frame(shuffled / "sub-01_ResponseData.h5", frame.sample(frac=1.0, random_state=0), "ResponseData")
    for name in ("VoxelMetadata", "StimulusMetadata"):
        (shuffled / f"sub-01_{name}.csv").write_text((betas_dir / f"sub-01_{name}.csv").read_text())
    np.testing.assert_array_equal(things.load_subject(shuffled, "01", 5.0).betas, subject.betas)
    with pytest.raises(DataContractError, match="no voxel has nc_singletrial > 1000"):
        things.load_subject(betas_dir, "01", 1000.0)


def test_subject_file_round_trip(tmp_path, subject):
    write_subject(tmp_path / "s.h5", subject)
    back = read_subject(tmp_path / "s.h5")
    np.testing.assert_array_equal(back.betas, subject.betas)
    assert list(back.stimulus) == list(subject.stimulus) and back.roi_names == subject.roi_names
    np.testing.assert_array_equal(back.xyz, subject.xyz)
    with pytest.raises(DataContractError, match="not found"):
        read_subject(tmp_path / "missing.h5")


def test_bold5000_reader_drops_coco_after_noise_ceiling(fmri_dir):
    root = fmri_dir / "bold5000"
    trials = bold5000.read_presentation_lists(root, "CSI1")
    sub = bold5000.load_subject(root, "CSI1", nc_threshold=0.0)
    n_coco = int(trials["stimulus"].str.startswith("COCO_").sum())
    assert n_coco > 0 and len(sub.betas) == len(trials) - n_coco
    assert not any(s.startswith("COCO_") for s in sub.stimulus)
    assert trials["marked_repeat"].sum() == SPEC["bold5000"]["n_repeated"] * SPEC["bold5000"]["n_sessions"]
    assert list(trials[["session", "run"]].drop_duplicates().itertuples(index=False)) == \
        [(s, r) for s in range(1, 5) for r in (1, 2)]
    assert sub.match == "basename" and sub.rois.sum(1).tolist() == [1] * sub.rois.shape[0]
    assert sub.attrs["betas_files"][0] == "CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_LHEarlyVis.npy"
    with pytest.raises(DataContractError, match="not found"):
        bold5000.load_subject(root, "CSI1", 0.0, rois=["LHV9"])


@pytest.fixture
def bold_copy(fmri_dir, tmp_path) -> Path:
    """A private copy of the simulated BOLD5000 release that a test may damage."""
    return Path(shutil.copytree(fmri_dir / "bold5000", tmp_path / "bold5000"))


def _betas_file(root: Path, roi: str) -> Path:
    return root / bold5000.BETAS.format(subject="CSI1", roi=roi)


def test_bold5000_row_count_mismatch_names_the_file(bold_copy):
    path = _betas_file(bold_copy, "RHPPA")
    np.save(path, np.load(path)[:-1])
    with pytest.raises(DataContractError, match=f"{path.name}: shape .* expected \\(\\d+ trials"):
        bold5000.load_subject(bold_copy, "CSI1", 0.0)


def test_bold5000_trial_order_is_checked_against_the_image_names(bold_copy):
    names = bold_copy / bold5000.IMAGE_NAMES.format(subject="CSI1")
    lines = names.read_text().splitlines()
    names.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(DataContractError, match="CSI1_imgnames.txt: .* first difference at trial 0"):
        bold5000.load_subject(bold_copy, "CSI1", 0.0)
    names.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataContractError, match=f"{len(lines) - 1} trials, .* {len(lines)}; .* '<end>'"):
        bold5000.load_subject(bold_copy, "CSI1", 0.0)
    names.unlink()
    with pytest.raises(DataContractError, match="image-name list not found"):
        bold5000.load_subject(bold_copy, "CSI1", 0.0)


def test_bold5000_roi_alias_and_invalid_voxels(fmri_dir, bold_copy):
    reference = bold5000.load_subject(fmri_dir / "bold5000", "CSI1", 0.0)
    _betas_file(bold_copy, "LHLOC").rename(_betas_file(bold_copy, "LHLO"))
    path = _betas_file(bold_copy, "LHEarlyVis")
    betas = np.load(path)
    betas[3, 0], betas[:, 1] = np.nan, 0.0
    np.save(path, betas)
    sub = bold5000.load_subject(bold_copy, "CSI1", 0.0)
    assert "CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_LHLO.npy" in sub.attrs["betas_files"]
    assert sub.attrs["n_voxels_invalid"] == 2 and "LHEarlyVis:0" not in set(sub.voxel_id)
    assert any(v.startswith("LHLOC:") for v in sub.voxel_id)
    kept = [list(reference.voxel_id).index(v) for v in sub.voxel_id]
    np.testing.assert_allclose(sub.betas, reference.betas[:, kept], rtol=1e-5, atol=1e-6)

# ----------------------------------------------------------------------------------------------- CV


def _design():
    """THINGS-like: 4 sessions of 5 once-shown images plus the same 3 test images in every session."""
    sessions, images = [], []
    for s in range(4):
        for k in range(5):
            sessions.append(s), images.append(f"train{s}_{k}")
        for k in range(3):
            sessions.append(s), images.append(f"test{k}")
    return np.array(sessions), np.array(images)


def test_leakage_free_schemes_never_share_an_image():
    sessions, images = _design()
    labels, outer = cv.outer_folds("heldout_session", sessions, images, None, seed=0)
    assert len(outer) == 4 and cv.shared_images(outer, images) == 0
    for train, test in outer:
        assert not any(i.startswith("test") for i in images[train])  # repeated test images never trained on
        assert set(sessions[test]) == {sessions[test][0]}
        inner = cv.inner_splits("heldout_session", sessions[train], images[train], 3, seed=0)
        assert len(inner) == 3 and cv.shared_images(inner, images[train]) == 0
    _, kfold = cv.outer_folds("image_kfold", sessions, images, 4, seed=0)
    assert cv.shared_images(kfold, images) == 0
    tested = np.concatenate([test for _, test in kfold])
    assert sorted(tested) == list(range(len(images)))  # every trial tested once, all repeats of an image together
    _, leaky = cv.outer_folds("upstream_leaky", sessions, images, None, seed=0)
    assert cv.shared_images(leaky, images) == 4 * 3  # each held-out session's 3 test images are also in training
    with pytest.raises(DataContractError, match="both training and test"):
        cv.check_splits(leaky, images, leaky_ok=False, where="upstream")


# ----------------------------------------------------------------------------------------------- ridge


def _naive_cv_mse(X, Y, alphas, splits):
    """Per-α closed-form ridge with intercept on every split: the definition the fast solver must match."""
    out = np.zeros((len(alphas), Y.shape[1]))
    for train, val in splits:
        mx, my = X[train].mean(0), Y[train].mean(0)
        xt, yt = X[train] - mx, Y[train] - my
        for a, alpha in enumerate(alphas):
            w = np.linalg.solve(xt.T @ xt + alpha * np.eye(X.shape[1]), xt.T @ yt)
            out[a] += (((Y[val] - my) - (X[val] - mx) @ w) ** 2).mean(0)
    return out / len(splits)


@pytest.mark.parametrize("case", ["dense", "degenerate", "wide"])
def test_grouped_ridge_matches_himalaya_and_naive(case):
    rng = np.random.default_rng(3)
    if case == "dense":
        X = rng.standard_normal((150, 12)) * rng.uniform(0.2, 4, 12) + 2
    elif case == "degenerate":  # one-hot with equal counts (tied eigenvalues) plus a duplicated column (rank-deficient)
        onehot = np.repeat(np.eye(6), 25, axis=0)
        X = np.hstack([onehot, onehot[:, :1]])
    else:  # more features than trials
        X = rng.standard_normal((60, 150))
    Y = X @ rng.standard_normal((X.shape[1], 15)) * rng.uniform(0, 1, 15) + rng.standard_normal((len(X), 15)) * 3
    X_test = rng.standard_normal((9, X.shape[1]))
    groups = rng.permutation(len(X)) % 4
    splits = [(np.flatnonzero(groups != g), np.flatnonzero(groups == g)) for g in range(4)]
    pred, best, mse = GroupedRidgeCV(ALPHAS, splits, dtype="float64").fit_predict(X, Y, X_test)
    with threadpool_limits(limits=1, user_api="blas"):  # tiny problems: BLAS threads only add overhead
        ref_pred, ref_best = himalaya_fit_predict(X, Y, X_test, ALPHAS, splits)
        naive = _naive_cv_mse(X, Y, ALPHAS, splits)
    np.testing.assert_array_equal(best, ref_best)
    np.testing.assert_allclose(pred, ref_pred, rtol=1e-5, atol=1e-5 * np.abs(ref_pred).max())
    np.testing.assert_array_equal(best, naive.argmin(0))
    np.testing.assert_allclose(mse, naive.min(0), rtol=1e-6)


def test_torch_backend_matches_numpy():
    pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    X, X_test = rng.standard_normal((80, 10)), rng.standard_normal((5, 10))
    Y = X @ rng.standard_normal((10, 6)) + rng.standard_normal((80, 6))
    splits = cv.inner_splits("image_kfold", np.zeros(80), np.arange(80).astype(str), 4, seed=0)
    ref = GroupedRidgeCV(ALPHAS, splits, backend="numpy", dtype="float64").fit_predict(X, Y, X_test)
    got = GroupedRidgeCV(ALPHAS, splits, backend="torch", dtype="float64").fit_predict(X, Y, X_test)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    ref, got = (LooRidgeCV(ALPHAS, backend=name).fit_predict(X, Y, X_test) for name in ("numpy", "torch"))
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)


@pytest.mark.parametrize("shape", [(150, 12), (60, 150)])  # covariance (n > D) and Gram (D > n) sides
def test_loo_ridge_matches_sklearn_ridgecv(shape):
    rng = np.random.default_rng(6)
    X = (rng.standard_normal(shape) * rng.uniform(0.2, 4, shape[1]) + 2).astype(np.float32)
    Y = X @ rng.standard_normal((shape[1], 15)) * rng.uniform(0, 0.3, 15) + rng.standard_normal((shape[0], 15)) * 3
    X_test = rng.standard_normal((9, shape[1]))
    pred, best, mse = LooRidgeCV(STUDY_ALPHAS, target_batch=4).fit_predict(X, Y, X_test)
    ref = RidgeCV(alphas=STUDY_ALPHAS, alpha_per_target=True, store_cv_results=True).fit(X, Y)
    np.testing.assert_allclose(pred, ref.predict(X_test), rtol=1e-6, atol=1e-6)
    loo = ref.cv_results_.reshape(shape[0], 15, len(STUDY_ALPHAS)).mean(0)  # per target and α: mean squared LOO error
    np.testing.assert_allclose(mse, loo.min(1), rtol=1e-6)
    # the same α wherever scikit-learn's own scores separate it from the runner-up by more than rounding
    clear = np.sort(loo, axis=1)[:, 1] - loo.min(1) > 1e-6 * loo.min(1)
    assert clear.sum() >= 5
    np.testing.assert_array_equal(STUDY_ALPHAS[best][clear], ref.alpha_[clear])


# ----------------------------------------------------------------------------------------------- statistics


def test_statistics_against_hand_computations():
    assert stats.sign_flip_pvalue([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)  # |±1±2±3| ≥ 6 only for ±(1,1,1)
    assert stats.sign_flip_pvalue([1.0, -1.0]) == 1.0
    d = np.random.default_rng(0).standard_normal(7) + 0.5
    flips = [[1 if (m >> i) & 1 else -1 for i in range(7)] for m in range(2 ** 7)]
    naive = np.mean([abs(np.dot(f, d)) >= abs(d.sum()) - 1e-12 for f in flips])
    assert stats.sign_flip_pvalue(d) == pytest.approx(naive)
    chi2, p = stats.fisher_combine([0.05, 0.2])
    x = -2 * (np.log(0.05) + np.log(0.2))
    assert chi2 == pytest.approx(x)
    assert p == pytest.approx(np.exp(-x / 2) * (1 + x / 2))  # χ²(4) survival function in closed form
    assert stats.fisher_combine([0.0])[0] == pytest.approx(-2 * np.log(1e-16))
    np.testing.assert_allclose(stats.bh_fdr([0.01, 0.04, 0.03, 0.5, np.nan]), [0.04, 0.16 / 3, 0.16 / 3, 0.5, np.nan])
    assert stats.stars(0.004, 0.1, 0.2) == "**" and stats.stars(0.2, 1, 1) == ""
    assert stats.stars(0.0001, -0.1, -0.2) == ""  # both models below 0: no mark
    membership = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], dtype=bool)
    values = np.array([[1.0], [3.0], [3.0], [3.0]])
    merged = stats.roi_fold_values(values, ["lFFA", "rFFA"], membership, ["FFA", "PPA"])
    assert merged["value"].tolist() == [2.0] and merged["n_voxels"].tolist() == [4]  # unweighted: (1 + 3) / 2


def test_noise_ceiling_recovers_planted_snr():
    rng = np.random.default_rng(5)
    images = np.repeat(np.arange(300), 4)
    signal = rng.standard_normal((300, 3)) * np.array([1.0, 0.5, 0.0])
    betas = signal[images] + rng.standard_normal((len(images), 3))
    nc = stats.noise_ceiling(betas, images.astype(str))
    np.testing.assert_allclose(nc, [0.5, 0.2, 0.0], atol=0.04)  # s² / (s² + σ²) for one trial
    with pytest.raises(DataContractError, match="repeated"):
        stats.noise_ceiling(betas[:5], list("abcde"))


# ----------------------------------------------------------------------------------------------- recovery and leak


def test_planted_features_beat_random_features(world, subject):
    features = planted(world, subject)
    random = np.random.default_rng(0).standard_normal(features.shape)
    good = encode(subject, features, "heldout_session", ALPHAS, n_inner=3, seed=0)
    bad = encode(subject, random, "heldout_session", ALPHAS, n_inner=3, seed=0)
    roi = subject.rois.any(1)
    assert np.nanmean(good.r2[roi]) > 0.15 and np.nanmean(bad.r2[roi]) < 0.02
    assert np.nanmean(good.r2_norm[roi]) > np.nanmean(bad.r2_norm[roi]) + 0.3
    assert good.attrs["scheme"] == "heldout_session" and all(f["shared_images"] == 0 for f in good.attrs["per_fold"])


def test_leakage_free_scheme_removes_the_repeat_leak(world, subject):
    """Image-specific responses repeat across sessions; per-image features let a leaky CV fit them."""
    codes = pd.factorize(pd.Series(subject.stimulus))[0]
    identity = np.eye(codes.max() + 1)[codes]  # one feature per image: memorises repeated images
    features = np.hstack([planted(world, subject), identity])
    free = encode(subject, features, "heldout_session", ALPHAS, n_inner=3, seed=0)
    leaky = encode(subject, features, "upstream_leaky", ALPHAS, n_inner=3, seed=0)
    roi = subject.rois.any(1)
    assert np.nanmean(leaky.r2[roi]) > np.nanmean(free.r2[roi]) + 0.05
    assert all(f["shared_images"] > 0 for f in leaky.attrs["per_fold"])


def test_upstream_leaky_folds_equal_sklearn_ridgecv(world, subject):
    """The study's scheme, fold by fold: scikit-learn RidgeCV (efficient LOO, α per voxel) on the same training rows."""
    features = np.hstack([planted(world, subject), np.random.default_rng(1).standard_normal((len(subject.betas), 4))])
    features = features.astype(np.float32)
    result = encode(subject, features, "upstream_leaky", alpha_grid(**cv.STUDY_ALPHAS), n_inner=5, seed=0)
    _, outer = cv.outer_folds("upstream_leaky", subject.session, subject.stimulus, None, seed=0)
    for k, (train, test) in enumerate(outer):
        ref = RidgeCV(alphas=STUDY_ALPHAS, alpha_per_target=True).fit(features[train], subject.betas[train])
        r2 = r2_score(subject.betas[test], ref.predict(features[test]), multioutput="raw_values")
        np.testing.assert_allclose(result.r2[:, k], r2, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(result.alphas[result.alpha_index[:, k]], ref.alpha_)
    assert result.attrs["inner"] == "loo" and result.attrs["n_inner"] is None


def test_study_alpha_grid_for_the_leaky_scheme_only():
    np.testing.assert_array_equal(alpha_grid(**cv.STUDY_ALPHAS), STUDY_ALPHAS)
    wide = {"log10_min": -6, "log10_max": 8, "n": 100}
    assert cv.scheme_alphas({"alphas": wide}, "upstream_leaky") == cv.STUDY_ALPHAS
    assert cv.scheme_alphas({"alphas": wide}, "heldout_session") == wide
    assert cv.scheme_alphas({"alphas": wide, "leaky_alphas": wide}, "upstream_leaky") == wide  # a named override
    root = Path(__file__).resolve().parents[1]
    for name in ("config.yaml", "demo.yaml"):
        bench = yaml.safe_load((root / "config" / name).read_text())["benchmarks"]["things_fmri"]
        np.testing.assert_array_equal(alpha_grid(**cv.scheme_alphas(bench, "upstream_leaky")), STUDY_ALPHAS)
        assert cv.scheme_alphas(bench, "heldout_session") == wide  # the leakage-free scheme keeps its own grid
    with pytest.raises(ValueError, match="leave-one-out"):
        cv.inner_splits("upstream_leaky", np.zeros(4), np.array(list("abcd")), 2, seed=0)


# ----------------------------------------------------------------------------------------------- tables, figures, CLI


def _parser() -> argparse.ArgumentParser:
    from metalign.brain import cli as brain_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    brain_cli.register(sub)
    demo_cli.register(sub)
    return parser


def _run(*argv: str) -> None:
    args = _parser().parse_args([str(a) for a in argv])
    args.func(args)


def _read_h5(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ids, r2 and xyz of an encoding file, read with h5py (not through the package's reader)."""
    with h5py.File(path, "r") as handle:
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["ids"][:]]
        return ids, handle["r2"][:].astype(np.float64), handle["xyz"][:]


@pytest.fixture
def stat_maps(monkeypatch):
    """Every image and keyword nilearn's plot_stat_map is given (it still draws): what the volume figure shows."""
    import gc

    from nilearn import plotting

    # nilearn forces a full garbage collection on every image access; in the large pytest heap that costs seconds
    monkeypatch.setattr(gc, "collect", lambda *args: 0)
    calls = []
    real = plotting.plot_stat_map

    def record(image, **kwargs):
        calls.append((np.asarray(image.get_fdata()), image.affine, kwargs))
        return real(image, **kwargs)

    monkeypatch.setattr(plotting, "plot_stat_map", record)
    return calls


def test_cli_tables_and_figures(tmp_path, world, fmri_dir, monkeypatch, stat_maps):
    from metalign.io import write_h5

    from metalign.brain import figures as brain_figures

    saved = keep_saved_figures(monkeypatch, brain_figures)
    images, features = demo_fmri.read_world(world)
    rng = np.random.default_rng(2)
    feature_files = {"base": rng.standard_normal(features.shape),
                     "main": np.hstack([features, rng.standard_normal(features.shape)])}
    for name, values in feature_files.items():
        write_h5(tmp_path / f"{name}.h5", {"features": values.astype(np.float32)}, images, {})
    grid = json.dumps({"log10_min": -3, "log10_max": 5, "n": 30})
    encodings = []
    for p in ("01", "02"):
        _run("brain-prepare-things", "--betas-dir", fmri_dir / "things_fmri" / "betas_csv", "--subject", p,
             "--out", tmp_path / f"sub-{p}.h5")
        for variant in feature_files:
            out = tmp_path / "enc" / "heldout_session" / "bb" / variant / f"sub-{p}.h5"
            _run("brain-encode", "--subject-file", tmp_path / f"sub-{p}.h5", "--features", tmp_path / f"{variant}.h5",
                 "--scheme", "heldout_session", "--alphas", grid, "--n-inner", "3", "--backend", "numpy", "--out", out)
            encodings.append(out)
    rois = json.dumps(["V1", "V2", "EBA", "FFA", "LOC"])
    _run("brain-table", "--encodings", *encodings, "--rois", rois, "--out-folds", tmp_path / "folds.csv",
         "--out-stats", tmp_path / "stats.csv", "--out-alphas", tmp_path / "alphas.csv")
    table = pd.read_csv(tmp_path / "stats.csv")
    assert set(table["variant"]) == {"main"} and {"p_sub-01", "p_sub-02", "q_fdr", "stars"} <= set(table.columns)
    assert (table["diff"] > 0).mean() >= 0.8  # the planted features are in "main" only
    assert (table["p_sub-01"] >= 2 / 2 ** SPEC["things"]["n_sessions"]).all() and (table["df"] == 4).all()
    folds = pd.read_csv(tmp_path / "folds.csv")
    assert folds.groupby(["variant", "subject", "roi"]).size().eq(SPEC["things"]["n_sessions"]).all()
    alphas = pd.read_csv(tmp_path / "alphas.csv")
    assert alphas[["frac_low_edge", "frac_high_edge"]].to_numpy().max() <= 1 and len(alphas) == 4
    _run("figure-brain-rois", "--folds", tmp_path / "folds.csv", "--stats", tmp_path / "stats.csv", "--scheme",
         "heldout_session", "--rois", rois, "--title", "demo", "--out", tmp_path / "rois.png")
    # the ROI figure: per ROI and representation, the mean over subjects of the subject's fold mean, ± 1 SEM
    (fig,) = saved
    (ax,) = [ax for ax in fig.axes if ax.containers]
    points = plotted(ax)
    assert ax.get_title() == "bb" and tick_labels(ax) == json.loads(rois)
    per_subject = {key: np.mean(list(part["value"])) for key, part in folds.groupby(["variant", "roi", "subject"])}
    expected_points = {}
    for variant, roi in {(v, r) for v, r, _ in per_subject}:
        means = np.array([per_subject[variant, roi, s] for s in ("sub-01", "sub-02")])
        sem = means.std(ddof=1) / np.sqrt(len(means))
        expected_points[(roi, variant)] = (means.mean(), means.mean() - sem, means.mean() + sem)
    assert set(points) == set(expected_points) and len(points) == 10
    for key, values in expected_points.items():
        assert points[key] == pytest.approx(values, rel=1e-9)
    stars = pd.read_csv(tmp_path / "stats.csv", keep_default_na=False)
    assert filled(ax) == ({(r, "base") for r in json.loads(rois)}
                          | {(r, "main") for r, s in zip(stars["roi"], stars["stars"]) if s})
    base = [e for e in encodings if e.parent.name == "base"]
    meta = [e for e in encodings if e.parent.name == "main"]
    masks = [fmri_dir / "things_fmri" / "brainmasks" / f"sub-{p}_space-T1w_brainmask.nii.gz" for p in ("01", "02")]
    _run("figure-brain-volume", "--base", *base, "--meta", *meta, "--masks", *masks, "--label", "main",
         "--title", "demo", "--out", tmp_path / "volume.png")
    # the volume figure: per subject, mean over folds of meta R² − base R² at each voxel's coordinates, 0 elsewhere
    assert len(saved) == 2 and len(stat_maps) == 2
    assert (tmp_path / "rois.png").read_bytes()[:4] == (tmp_path / "volume.png").read_bytes()[:4] == b"\x89PNG"
    diffs = []
    for (data, affine, kwargs), base_path, meta_path, mask in zip(stat_maps, base, meta, masks):
        base_ids, base_r2, xyz = _read_h5(base_path)
        meta_ids, meta_r2, _ = _read_h5(meta_path)
        assert base_ids == meta_ids
        diff = (meta_r2 - base_r2).mean(axis=1)
        assert np.isfinite(diff).all() and (diff > 0).mean() > 0.5  # main carries the planted features
        expected = np.zeros(nib.load(mask).shape)
        expected[tuple(xyz.T)] = diff
        np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(affine, nib.load(mask).affine)
        assert kwargs["title"] == f"{base_path.stem}: main − base"
        diffs.append(diff)
    limit = max(np.abs(d).max() for d in diffs)
    for _, _, kwargs in stat_maps:
        assert (kwargs["vmin"], kwargs["vmax"]) == pytest.approx((-limit, limit), rel=1e-5)
    arrays, ids, attrs = read_encoding(encodings[0])
    assert arrays["r2"].shape == (len(ids), SPEC["things"]["n_sessions"]) and attrs["leaky"] is False


def _mask(path: Path, shape=(5, 6, 4)) -> Path:
    affine = np.array([[2.0, 0, 0, -4], [0, 2.5, 0, -6], [0, 0, 3, 1], [0, 0, 0, 1]])
    data = np.zeros(shape, dtype=np.uint8)
    data[1:4, 1:5, 1:3] = 1
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_volume_image_puts_values_at_their_voxels(tmp_path):
    from metalign.brain.figures import volume_image

    mask = _mask(tmp_path / "mask.nii.gz")
    rng = np.random.default_rng(3)
    xyz = np.array(np.unravel_index(rng.choice(5 * 6 * 4, 15, replace=False), (5, 6, 4))).T
    values = rng.normal(size=15).astype(np.float32)
    image, mask_image = volume_image(values, xyz, mask)
    data = image.get_fdata()
    assert data.shape == (5, 6, 4)
    np.testing.assert_array_equal(data[tuple(xyz.T)], values)
    outside = np.ones(data.shape, dtype=bool)
    outside[tuple(xyz.T)] = False
    assert (data[outside] == 0).all() and outside.sum() == 5 * 6 * 4 - 15
    np.testing.assert_array_equal(image.affine, nib.load(mask).affine)
    np.testing.assert_array_equal(mask_image.get_fdata(), nib.load(mask).get_fdata())
    for bad in ([[0, 0, 4]], [[5, 0, 0]], [[0, -1, 0]]):
        with pytest.raises(DataContractError, match=r"voxel coordinates fall outside its grid \(5, 6, 4\)"):
            volume_image(np.ones(1), np.array(bad), mask)
    with pytest.raises(DataContractError, match="brain mask not found"):
        volume_image(values, xyz, tmp_path / "absent.nii.gz")


def _encoding_file(path: Path, r2: np.ndarray, xyz: np.ndarray | None, ids: list[str]) -> Path:
    from metalign.io import write_h5

    arrays = {"r2": r2.astype(np.float32), "nc": np.ones(len(ids))}
    if xyz is not None:
        arrays["xyz"] = xyz
    path.parent.mkdir(parents=True, exist_ok=True)
    write_h5(path, arrays, ids, {"scheme": "heldout_session"})
    return path


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")  # the all-NaN voxel, on purpose
def test_cli_volume_difference_is_a_nanmean_over_folds(tmp_path, stat_maps):
    """NaN folds are skipped per voxel; a voxel NaN in every fold is drawn as 0 (no value), not as a difference."""
    mask = _mask(tmp_path / "mask.nii.gz", shape=(5, 6, 8))
    rng = np.random.default_rng(4)
    xyz = np.array([[1, 1, 1], [2, 3, 1], [3, 4, 2], [1, 2, 2]])
    ids = [f"v{i}" for i in range(4)]
    base_r2, meta_r2 = rng.uniform(0, 0.2, (4, 3)), rng.uniform(0, 0.4, (4, 3))
    meta_r2[0, 1] = np.nan
    base_r2[1, 2] = np.nan
    base_r2[3] = np.nan
    base = _encoding_file(tmp_path / "base" / "sub-01.h5", base_r2, xyz, ids)
    meta = _encoding_file(tmp_path / "main" / "sub-01.h5", meta_r2, xyz, ids)
    _run("figure-brain-volume", "--base", base, "--meta", meta, "--masks", mask, "--label", "main", "--title", "t",
         "--out", tmp_path / "v.png")
    stored = meta_r2.astype(np.float32).astype(float) - base_r2.astype(np.float32).astype(float)  # files: float32
    expected = [row[np.isfinite(row)].mean() if np.isfinite(row).any() else 0.0 for row in stored]
    assert expected[3] == 0.0 and len(stat_maps) == 1
    data, _, kwargs = stat_maps[0]
    np.testing.assert_allclose(data[tuple(xyz.T)], expected, rtol=1e-6)
    assert np.count_nonzero(data) == 3
    assert kwargs["vmax"] == pytest.approx(max(abs(e) for e in expected), rel=1e-6)
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_volume_errors_name_the_problem(tmp_path):
    mask = _mask(tmp_path / "mask.nii.gz")
    xyz = np.array([[1, 1, 1], [2, 3, 1]])
    r2 = np.full((2, 3), 0.1)
    base = _encoding_file(tmp_path / "base" / "sub-01.h5", r2, xyz, ["v0", "v1"])
    meta = _encoding_file(tmp_path / "main" / "sub-01.h5", r2, xyz, ["v0", "v1"])
    out = ["--label", "main", "--title", "t", "--out", tmp_path / "v.png"]
    with pytest.raises(DataContractError, match="--base, --meta and --masks need one file per subject"):
        _run("figure-brain-volume", "--base", base, "--meta", meta, meta, "--masks", mask, *out)
    other = _encoding_file(tmp_path / "main" / "sub-02.h5", r2, xyz, ["v0", "v1"])
    with pytest.raises(DataContractError, match=r"subject mismatch: .*base/sub-01\.h5 vs .*main/sub-02\.h5"):
        _run("figure-brain-volume", "--base", base, "--meta", other, "--masks", mask, *out)
    for name, ids, coordinates in (("reordered", ["v1", "v0"], xyz), ("short", ["v0", "v1", "v2"], xyz[[0, 1, 1]])):
        shuffled = _encoding_file(tmp_path / name / "sub-01.h5", np.full((len(ids), 3), 0.1), coordinates, ids)
        with pytest.raises(DataContractError, match=f"{name}/sub-01.h5: voxels differ from .*base/sub-01.h5"):
            _run("figure-brain-volume", "--base", base, "--meta", shuffled, "--masks", mask, *out)
    no_xyz = _encoding_file(tmp_path / "noxyz" / "sub-01.h5", r2, None, ["v0", "v1"])
    with pytest.raises(DataContractError, match="carry no coordinates"):
        _run("figure-brain-volume", "--base", no_xyz, "--meta", meta, "--masks", mask, *out)
    outside = _encoding_file(tmp_path / "far" / "sub-01.h5", r2, np.array([[1, 1, 1], [2, 6, 1]]), ["v0", "v1"])
    with pytest.raises(DataContractError, match=r"mask\.nii\.gz: voxel coordinates fall outside its grid"):
        _run("figure-brain-volume", "--base", outside, "--meta", outside, "--masks", mask, *out)
    with pytest.raises(DataContractError, match="brain mask not found: .*absent.nii.gz"):
        _run("figure-brain-volume", "--base", base, "--meta", meta, "--masks", tmp_path / "absent.nii.gz", *out)
    assert not (tmp_path / "v.png").exists()


def test_encoding_errors_name_the_problem(tmp_path, subject):
    with pytest.raises(DataContractError, match="no features"):
        stimulus_rows(subject, ["other/image.jpg"], "f.h5")
    with pytest.raises(ValueError, match="unknown CV scheme"):
        encode(subject, np.zeros((len(subject.betas), 2)), "kfold", ALPHAS, 3, 0)
    with pytest.raises(DataContractError, match="inner session groups"):
        encode(subject, np.zeros((len(subject.betas), 2)), "heldout_session", ALPHAS, 50, 0)
    with pytest.raises(ValueError, match="things.volume"):
        validate_fmri({**SPEC, "things": {**SPEC["things"], "volume": [3, 3]}})
    with pytest.raises(ValueError, match="unknown key"):
        validate_fmri({**SPEC, "extra": 1})
    features = np.random.default_rng(9).standard_normal((len(subject.betas), 4))
    write_encoding(tmp_path / "e.h5", subject, encode(subject, features, "heldout_session", ALPHAS, 3, 0), {})
    assert read_encoding(tmp_path / "e.h5")[2]["scheme"] == "heldout_session"


def test_noise_ceiling_estimator_recovers_the_simulated_truth(fmri_dir):
    """The demo writes the true NC (from its generating variances); the estimator sees only the test repeats."""
    betas_dir = fmri_dir / "things_fmri" / "betas_csv"
    voxels = pd.read_csv(betas_dir / "sub-01_VoxelMetadata.csv")
    stimuli = pd.read_csv(betas_dir / "sub-01_StimulusMetadata.csv")
    test = (stimuli["trial_type"] == "test").to_numpy()
    betas = read_rows_by_id(betas_dir / "sub-01_ResponseData.h5", "voxel_id", voxels["voxel_id"])[0].T[test]
    estimate = stats.noise_ceiling(betas, stimuli["stimulus"][test].tolist())
    truth = voxels["nc_singletrial"].to_numpy() / 100
    assert np.corrcoef(estimate, truth)[0, 1] > 0.9
    assert abs(estimate.mean() - truth.mean()) < 0.03
    averaged = stats.noise_ceiling(betas, stimuli["stimulus"][test].tolist(), n_average=SPEC["things"]["n_sessions"])
    assert np.median(np.abs(averaged - voxels["nc_testset"].to_numpy() / 100)) < 0.08

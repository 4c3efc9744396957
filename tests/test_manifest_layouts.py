"""Own-split manifest layouts: tiny fixtures in each dataset's real on-disk format (txt, .mat, tar, CIFAR pickles)."""

from __future__ import annotations

import copy
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import yaml
from PIL import Image

from metalign.config.datasets import check_dataset
from metalign.config.downstream import check_downstream
from metalign.config.schema import ConfigError, load_schema
from metalign.images.layouts import LAYOUTS
from metalign.images.manifest import ImageReader, build_manifest, verify_manifest
from metalign.io import DataContractError
from tests.conftest import REPO


def _image(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, 0, 0)).save(path)
    return path


def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _columns(frame) -> list[tuple[str, str, str]]:
    return list(zip(frame["image_id"], frame["label"], frame["split"]))


# ------------------------------------------------------------------------------------------------------ CUB


def _cub(root: Path) -> Path:
    images = ["002.Laysan_Albatross/L_1.jpg", "001.Black_footed_Albatross/B_1.jpg",
              "001.Black_footed_Albatross/B_2.jpg"]
    for rel in images:
        _image(root / "images" / rel)
    _lines(root / "images.txt", [f"{i} {rel}" for i, rel in enumerate(images, start=1)])
    _lines(root / "image_class_labels.txt", ["1 2", "2 1", "3 1"])
    _lines(root / "train_test_split.txt", ["1 1", "2 0", "3 1"])
    _lines(root / "classes.txt", ["1 001.Black_footed_Albatross", "2 002.Laysan_Albatross"])
    return root


def test_cub_reads_official_files_in_images_txt_order(tmp_path):
    frame = build_manifest("cub", _cub(tmp_path / "CUB_200_2011"))
    assert _columns(frame) == [("002.Laysan_Albatross/L_1.jpg", "002.Laysan_Albatross", "train"),
                               ("001.Black_footed_Albatross/B_1.jpg", "001.Black_footed_Albatross", "test"),
                               ("001.Black_footed_Albatross/B_2.jpg", "001.Black_footed_Albatross", "train")]
    assert frame["path"][0] == str(tmp_path / "CUB_200_2011/images/002.Laysan_Albatross/L_1.jpg")


def test_cub_errors_name_file_and_id(tmp_path):
    root = _cub(tmp_path / "cub")
    (root / "images/001.Black_footed_Albatross/B_2.jpg").unlink()
    with pytest.raises(DataContractError, match=r"images\.txt: image '001.Black_footed_Albatross/B_2.jpg' has no file"):
        build_manifest("cub", root)
    root = _cub(tmp_path / "cub2")
    _lines(root / "train_test_split.txt", ["1 1", "2 0", "3 1", "4 1"])
    with pytest.raises(DataContractError, match=r"train_test_split\.txt: image id '4' is not in"):
        build_manifest("cub", root)
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DataContractError, match="CUB train_test_split.txt not found"):
        build_manifest("cub", root)
    root = _cub(tmp_path / "cub3")
    _lines(root / "image_class_labels.txt", ["1 2", "2 1", "3 7"])
    with pytest.raises(DataContractError, match=r"classes\.txt lists no class name for '7'"):
        build_manifest("cub", root)


def test_own_split_layouts_refuse_a_fixed_split_and_others_need_one(tmp_path):
    with pytest.raises(DataContractError, match="takes the split"):
        build_manifest("cub", _cub(tmp_path / "cub"), "all")
    with pytest.raises(DataContractError, match="needs a split"):
        build_manifest("flat", tmp_path / "cub")


# ------------------------------------------------------------------------------------------------------ DTD


def _dtd(root: Path, number: int) -> Path:
    for rel in ("banded/banded_1.jpg", "banded/banded_2.jpg", "dotted/dotted_1.jpg", "dotted/dotted_2.jpg"):
        _image(root / "images" / rel)
    _lines(root / "labels" / f"train{number}.txt", ["dotted/dotted_2.jpg", "banded/banded_1.jpg"])
    _lines(root / "labels" / f"val{number}.txt", ["banded/banded_2.jpg"])
    _lines(root / "labels" / f"test{number}.txt", ["dotted/dotted_1.jpg"])
    return root


def test_dtd_split_number_selects_the_files_and_rows_follow_them(tmp_path):
    frame = build_manifest("dtd", _dtd(tmp_path / "dtd", 2), options={"split_number": 2})
    assert _columns(frame) == [("dotted/dotted_2.jpg", "dotted", "train"), ("banded/banded_1.jpg", "banded", "train"),
                               ("banded/banded_2.jpg", "banded", "val"), ("dotted/dotted_1.jpg", "dotted", "test")]
    with pytest.raises(DataContractError, match="DTD split file train1.txt not found"):
        build_manifest("dtd", tmp_path / "dtd")  # default split 1
    with pytest.raises(ValueError, match="split_number"):
        build_manifest("dtd", tmp_path / "dtd", options={"split_number": 11})


def test_manifest_cli_passes_layout_options(tmp_path, capsys):
    from metalign.cli import main

    root, out = _dtd(tmp_path / "dtd", 3), tmp_path / "dtd.csv"
    assert main(["manifest", "--layout", "dtd", "--root", str(root), "--options", '{"split_number": 3}',
                 "--expected-count", "4", "--out", str(out)]) == 0
    assert pd.read_csv(out)["split"].tolist() == ["train", "train", "val", "test"]
    assert main(["manifest", "--layout", "dtd", "--root", str(root), "--split", "all", "--out", str(out)]) == 2
    assert "takes the split" in capsys.readouterr().err


def test_an_image_in_two_split_files_is_refused(tmp_path):
    root = _dtd(tmp_path / "dtd", 1)
    _lines(root / "labels/test1.txt", ["dotted/dotted_1.jpg", "banded/banded_1.jpg"])
    with pytest.raises(DataContractError, match="'banded/banded_1.jpg' occurs twice"):
        build_manifest("dtd", root)


# ------------------------------------------------------------------------------------------------ Flowers102


def _flowers(root: Path) -> Path:
    for number in range(1, 6):
        _image(root / "jpg" / f"image_{number:05d}.jpg", number)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([[3, 1, 1, 2, 3]], dtype=np.uint8)})
    scipy.io.savemat(root / "setid.mat", {"trnid": np.array([[4, 2]]), "valid": np.array([[5]]),
                                          "tstid": np.array([[3, 1]])})
    return root


def test_flowers_reads_mat_files_in_image_number_order(tmp_path):
    frame = build_manifest("flowers102", _flowers(tmp_path / "flowers"))
    assert _columns(frame) == [("image_00001.jpg", "3", "test"), ("image_00002.jpg", "1", "train"),
                               ("image_00003.jpg", "1", "test"), ("image_00004.jpg", "2", "train"),
                               ("image_00005.jpg", "3", "val")]


def test_flowers_errors(tmp_path):
    root = _flowers(tmp_path / "flowers")
    scipy.io.savemat(root / "setid.mat", {"trnid": np.array([[4, 2]]), "valid": np.array([[2]]),
                                          "tstid": np.array([[3, 1]])})
    with pytest.raises(DataContractError, match="image 2 is in both train and val"):
        build_manifest("flowers102", root)
    scipy.io.savemat(root / "setid.mat", {"trnid": np.array([[4, 2]]), "tstid": np.array([[3, 1]])})
    with pytest.raises(DataContractError, match="no variable 'valid'"):
        build_manifest("flowers102", root)
    scipy.io.savemat(root / "setid.mat", {"trnid": np.array([[9]]), "valid": np.array([[5]]), "tstid": np.array([[1]])})
    with pytest.raises(DataContractError, match="image 9 .trnid. has no label"):
        build_manifest("flowers102", root)


# ------------------------------------------------------------------------------------------------------ Pets


def test_pets_trainval_is_train_and_breed_comes_from_the_name(tmp_path):
    root = tmp_path / "pets"
    for name in ("great_pyrenees_10", "Abyssinian_2", "Abyssinian_1"):
        _image(root / "images" / f"{name}.jpg")
    _lines(root / "annotations/trainval.txt", ["great_pyrenees_10 21 2 12", "Abyssinian_2 1 1 1"])
    _lines(root / "annotations/test.txt", ["Abyssinian_1 1 1 1"])
    frame = build_manifest("pets", root)
    assert _columns(frame) == [("great_pyrenees_10.jpg", "great_pyrenees", "train"),
                               ("Abyssinian_2.jpg", "Abyssinian", "train"), ("Abyssinian_1.jpg", "Abyssinian", "test")]
    _lines(root / "annotations/test.txt", ["Abyssinian_1 1 1"])
    with pytest.raises(DataContractError, match=r"test\.txt:1: expected 4 fields"):
        build_manifest("pets", root)


# ------------------------------------------------------------------------------------------------- Places365


def _places(root: Path) -> Path:
    """Train images inside an uncompressed tar under `data_256/` (the official tar), val as files."""
    train = ["/a/airfield/00000001.jpg", "/a/airfield/00000002.jpg", "/b/bakery/00000001.jpg"]
    with tarfile.open(root / "train_256.tar", "w") as tar:
        for i, rel in enumerate(train):
            data = io.BytesIO()
            Image.new("RGB", (4, 4), (i, 0, 0)).save(data, format="PNG")
            member = tarfile.TarInfo(f"data_256{rel}")
            member.size = len(data.getvalue())
            tar.addfile(member, io.BytesIO(data.getvalue()))
    for name in ("Places365_val_00000001.jpg", "Places365_val_00000002.jpg"):
        _image(root / "val_256" / name)
    _lines(root / "devkit/categories_places365.txt", ["/a/airfield 0", "/b/bakery 1"])
    _lines(root / "devkit/places365_train_standard.txt", [f"{rel} {0 if 'airfield' in rel else 1}" for rel in train])
    _lines(root / "devkit/places365_val.txt", ["Places365_val_00000001.jpg 1", "Places365_val_00000002.jpg 0"])
    return root


def test_places365_caps_the_train_pool_and_reads_the_train_tar_in_place(tmp_path):
    root = tmp_path / "places"
    root.mkdir()
    options = {"train_images": "train_256.tar/data_256", "train_per_class": 1}
    frame = build_manifest("places365", _places(root), options=options)
    assert _columns(frame) == [("train/a/airfield/00000001.jpg", "/a/airfield", "train"),
                               ("train/b/bakery/00000001.jpg", "/b/bakery", "train"),
                               ("val/Places365_val_00000001.jpg", "/b/bakery", "val"),
                               ("val/Places365_val_00000002.jpg", "/a/airfield", "val")]
    assert frame["path"][1] == f"{root}/train_256.tar/data_256/b/bakery/00000001.jpg"
    verify_manifest(frame, "test")
    with Image.open(io.BytesIO(ImageReader().read(frame["path"][1]))) as image:
        assert image.getpixel((0, 0)) == (2, 0, 0)  # the third tar member
    assert len(build_manifest("places365", root, options={"train_images": "train_256.tar/data_256"})) == 5
    _lines(root / "devkit/places365_train_standard.txt", ["/c/cave/00000001.jpg 0"])
    with pytest.raises(DataContractError, match="image 'train/c/cave/00000001.jpg' has no file"):
        build_manifest("places365", root, options=options)


# --------------------------------------------------------------------------------------------- Stanford Cars


def _annotations(entries: list[tuple[str, int]]) -> np.ndarray:
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    return np.array([[(1, 1, 3, 3, cls, fname) for fname, cls in entries]], dtype=fields)


def test_stanford_cars_reads_the_devkit_mat_files(tmp_path):
    root = tmp_path / "stanford_cars"
    for rel in ("cars_train/00001.jpg", "cars_train/00002.jpg", "cars_test/00001.jpg"):
        _image(root / rel)
    (root / "devkit").mkdir()
    names = np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]], dtype=object)
    scipy.io.savemat(root / "devkit/cars_meta.mat", {"class_names": names})
    scipy.io.savemat(root / "devkit/cars_train_annos.mat", {"annotations": _annotations([("00002.jpg", 2),
                                                                                          ("00001.jpg", 1)])})
    scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _annotations([("00001.jpg", 2)])})
    frame = build_manifest("stanford_cars", root)
    assert _columns(frame) == [("cars_train/00002.jpg", "Acura RL Sedan 2012", "train"),
                               ("cars_train/00001.jpg", "AM General Hummer SUV 2000", "train"),
                               ("cars_test/00001.jpg", "Acura RL Sedan 2012", "test")]
    scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _annotations([("00001.jpg", 3)])})
    with pytest.raises(DataContractError, match="image 'cars_test/00001.jpg' has class 3"):
        build_manifest("stanford_cars", root)


# ---------------------------------------------------------------------------------- seeded class folders


def test_class_folders_seeded_draws_a_documented_per_class_split(tmp_path):
    root = tmp_path / "caltech"
    for cls, n in (("BACKGROUND_Google", 3), ("accordion", 4), ("airplanes", 3)):
        for i in range(n):
            _image(root / cls / f"image_{i:04d}.jpg")
    options = {"train_per_class": 2, "seed": 5, "exclude": ["BACKGROUND_Google"]}
    frame = build_manifest("class_folders_seeded", root, options=options)
    rng = np.random.default_rng(5)  # the documented draw, class by class in sorted order
    expected = []
    for cls, n in (("accordion", 4), ("airplanes", 3)):
        train = set(rng.permutation(n)[:2].tolist())
        expected += [(f"{cls}/image_{i:04d}.jpg", cls, "train" if i in train else "test") for i in range(n)]
    assert _columns(frame) == expected
    assert frame.groupby("label")["split"].apply(lambda s: (s == "train").sum()).tolist() == [2, 2]
    with pytest.raises(DataContractError, match="need more than train_per_class=3"):
        build_manifest("class_folders_seeded", root, options={**options, "train_per_class": 3})
    with pytest.raises(DataContractError, match="excluded class 'Background' is not a class folder"):
        build_manifest("class_folders_seeded", root, options={**options, "exclude": ["Background"]})


# ------------------------------------------------------------------------------------------------ CIFAR-100


def _cifar(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    root.mkdir()
    data = {"train": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
            "test": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
    labels = {"train": [2, 0, 1], "test": [1, 1]}
    for split, pixels in data.items():
        batch = {"filenames": [f"{split}_img_{i}.png" for i in range(len(pixels))], "fine_labels": labels[split],
                 "coarse_labels": [0] * len(pixels), "data": pixels}
        (root / split).write_bytes(pickle.dumps(batch))
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "bear", "cloud"],
                                              "coarse_label_names": ["all"]}))
    return data


def test_cifar_rows_point_into_the_pickles_and_decode_to_the_stored_pixels(tmp_path):
    data = _cifar(tmp_path / "cifar-100-python", np.random.default_rng(0))
    frame = build_manifest("cifar", tmp_path / "cifar-100-python", checksums=True)
    assert _columns(frame) == [("train/train_img_0.png", "cloud", "train"), ("train/train_img_1.png", "apple", "train"),
                               ("train/train_img_2.png", "bear", "train"), ("test/test_img_0.png", "bear", "test"),
                               ("test/test_img_1.png", "bear", "test")]
    assert frame["path"][4] == f"{tmp_path}/cifar-100-python/test#1"
    verify_manifest(frame, "test")
    reader = pickle.loads(pickle.dumps(ImageReader()))  # as a DataLoader worker gets it
    for path, pixels in ((frame["path"][1], data["train"][1]), (frame["path"][4], data["test"][1])):
        with Image.open(io.BytesIO(reader.read(path))) as image:
            assert image.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")),
                                          pixels.reshape(3, 32, 32).transpose(1, 2, 0))
    coarse = build_manifest("cifar", tmp_path / "cifar-100-python", options={"label": "coarse"})
    assert set(coarse["label"]) == {"all"}
    with pytest.raises(DataContractError, match="no row 7"):
        reader.read(f"{tmp_path}/cifar-100-python/test#7")


def test_cifar_bad_pickle_is_named(tmp_path):
    _cifar(tmp_path / "c", np.random.default_rng(0))
    (tmp_path / "c" / "test").write_bytes(pickle.dumps({"filenames": ["a"], "fine_labels": [0],
                                                        "data": np.zeros((1, 10), np.uint8)}))
    with pytest.raises(DataContractError, match=r"c/test: `data` must be \(N, 3072\) uint8"):
        build_manifest("cifar", tmp_path / "c")


# --------------------------------------------------------------------------------------------------- config


def test_schema_lists_every_registered_layout():
    layouts = load_schema()["$defs"]["image_set"]["properties"]["layout"]["enum"]
    assert sorted(layouts) == sorted(LAYOUTS)


@pytest.mark.parametrize("entry, needle", [
    ({"layout": "cub", "root": "x", "split": "all"}, r"datasets\.d\.split: layout 'cub' takes"),
    ({"layout": "flat", "root": "x"}, r"datasets\.d\.split: required for layout 'flat'"),
    ({"layout": "dtd", "root": "x", "options": {"split": 1}}, r"datasets\.d\.options: .*'split' was unexpected"),
    ({"layout": "class_folders_seeded", "root": "x", "options": {"seed": 0}},
     r"datasets\.d\.options: .*'train_per_class' is a required property"),
])
def test_dataset_entry_errors_name_the_key(entry, needle):
    with pytest.raises(ConfigError, match=needle):
        check_dataset("d", entry)


def test_fewshot_refs_must_name_a_split_of_an_own_split_dataset():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    check_downstream(config)
    missing = copy.deepcopy(config)
    del missing["downstream"]["fewshot"]["tasks"]["birds"]["train"]["split"]
    with pytest.raises(ConfigError, match=r"tasks\.birds\.train\.split: required, dataset 'cub200' holds splits"):
        check_downstream(missing)
    wrong = copy.deepcopy(config)
    wrong["downstream"]["fewshot"]["tasks"]["places365"]["test"]["split"] = "test"
    with pytest.raises(ConfigError, match=r"'test' is not a split of dataset 'places365' \(it has train, val\)"):
        check_downstream(wrong)

"""Manifests and extraction: row order, provenance, corrupt inputs, resume equality."""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from metalign.embed.cli import register
from metalign.embed.extract import extract
from metalign.images.manifest import build_manifest, load_verified_manifest
from metalign.io import DataContractError, manifest_hash, read_h5, read_manifest, write_csv, write_h5
from tests.conftest import write_images


def cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    args.func(args)


def _entry(model_dir) -> dict:
    return {"name": "vit_tiny", "source": "transformers", "id": str(model_dir), "layer": "final", "pooling": "cls",
            "preprocessing": {"size": 32, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}}


@pytest.fixture
def image_set(tmp_path):
    write_images(tmp_path / "imgs", 10)
    manifest = tmp_path / "manifest.csv"
    write_csv(manifest, build_manifest("flat", tmp_path / "imgs", "train"))
    return manifest


def test_things_manifest_follows_unique_id_order(tmp_path):
    for concept in ["zebra", "aardvark"]:
        write_images(tmp_path / "things" / concept, 2)
    (tmp_path / "unique_id.txt").write_text("zebra\naardvark\n")
    frame = build_manifest("things", tmp_path / "things", "things", tmp_path / "unique_id.txt")
    assert frame["label"].tolist() == ["zebra", "zebra", "aardvark", "aardvark"]
    assert frame["image_id"].iloc[0] == "zebra/000000000000.jpg"
    (tmp_path / "unique_id.txt").write_text("zebra\naardvark\nyak\n")
    with pytest.raises(DataContractError, match="'yak'"):
        build_manifest("things", tmp_path / "things", "things", tmp_path / "unique_id.txt")


def test_extract_matches_direct_forward_and_records_provenance(tiny_vit, image_set, tmp_path):
    out = tmp_path / "emb.h5"
    extract(_entry(tiny_vit), image_set, out, batch_size=4)
    arrays, ids, attrs = read_h5(out)
    manifest = load_verified_manifest(image_set)
    assert ids == manifest["image_id"].tolist()
    assert arrays["features"].shape == (10, 32) and arrays["features"].dtype == np.float32
    for key in ("model_id", "preprocessing", "pooling", "layer", "library_versions", "manifest_sha256", "cache_key"):
        assert key in attrs
    assert attrs["preprocessing"]["size"] == 32
    # naive reference: the model applied to one image at a time
    from PIL import Image
    from transformers import ViTModel

    from metalign.embed.backbones import Preprocessing

    model = ViTModel.from_pretrained(tiny_vit).eval()
    transform = Preprocessing(size=32, mean=(0.5,) * 3, std=(0.5,) * 3).build()
    with torch.no_grad():
        first = model(pixel_values=transform(Image.open(manifest["path"][3]).convert("RGB"))[None]).last_hidden_state[0, 0]
    np.testing.assert_allclose(arrays["features"][3], first.numpy(), rtol=1e-4, atol=1e-5)


def test_interrupted_extraction_resumes_to_identical_file(tiny_vit, image_set, tmp_path):
    full, resumed = tmp_path / "full.h5", tmp_path / "resumed.h5"
    extract(_entry(tiny_vit), image_set, full, batch_size=4)
    extract(_entry(tiny_vit), image_set, resumed, batch_size=4, max_batches=1)  # "killed" after one batch
    partial = resumed.with_name(resumed.name + ".partial.h5")
    assert not resumed.exists() and partial.exists()
    with h5py.File(partial) as handle:
        assert handle.attrs["n_done"] == 4
    extract(_entry(tiny_vit), image_set, resumed, batch_size=4)
    assert not partial.exists()
    np.testing.assert_array_equal(read_h5(full)[0]["features"], read_h5(resumed)[0]["features"])


def test_changed_preprocessing_does_not_resume_stale_rows(tiny_vit, image_set, tmp_path):
    out = tmp_path / "emb.h5"
    extract(_entry(tiny_vit), image_set, out, batch_size=4, max_batches=1)
    other = _entry(tiny_vit) | {"preprocessing": {"size": 32, "crop_pct": 1.0, "mean": [0.4] * 3, "std": [0.5] * 3}}
    extract(other, image_set, out, batch_size=4)
    fresh = tmp_path / "fresh.h5"
    extract(other, image_set, fresh, batch_size=4)
    np.testing.assert_array_equal(read_h5(out)[0]["features"], read_h5(fresh)[0]["features"])


def test_corrupt_image_names_the_file(tiny_vit, image_set, tmp_path):
    manifest = load_verified_manifest(image_set)
    bad = manifest["path"][5]
    with open(bad, "wb") as handle:
        handle.write(b"not a jpeg")
    with pytest.raises(DataContractError, match=bad):
        extract(_entry(tiny_vit), image_set, tmp_path / "emb.h5", batch_size=4)
    assert not (tmp_path / "emb.h5").exists()


def test_manifest_that_does_not_match_files_is_refused(tiny_vit, image_set, tmp_path):
    manifest = load_verified_manifest(image_set)
    missing = manifest["path"][2]
    import os
    os.remove(missing)
    with pytest.raises(DataContractError, match=manifest["image_id"][2]):
        extract(_entry(tiny_vit), image_set, tmp_path / "emb.h5")


def test_truncated_features_file_names_the_file_and_how_to_rebuild(tiny_vit, image_set, tmp_path):
    out = tmp_path / "emb.h5"
    extract(_entry(tiny_vit), image_set, out, batch_size=4)
    with pytest.raises(DataContractError, match=r"lacks dataset\(s\) \['layer_6'\]; it has \['features', 'ids'\]"):
        read_h5(out, ["layer_6"])
    with open(out, "r+b") as handle:
        handle.truncate(out.stat().st_size // 2)
    with pytest.raises(DataContractError, match=rf"{out}.*truncated or corrupt.*`snakemake --forcerun <rule>`"):
        read_h5(out)


def _resnet_entry(weights, **extra) -> dict:
    return {"name": "resnet", "source": "torchvision", "id": "resnet18", "checkpoint": {"path": str(weights)},
            "preprocessing": {"size": 32, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.25] * 3}, **extra}


def test_torchvision_stage_by_name_pooled_equals_manual_forward(tmp_path):
    import torchvision
    from PIL import Image
    from torchvision import transforms

    write_images(tmp_path / "imgs", 4)
    manifest = tmp_path / "manifest.csv"
    write_csv(manifest, build_manifest("flat", tmp_path / "imgs", "train"))
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    weights = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "emb.h5"
    extract(_resnet_entry(weights, layer="layer3", pooling="avg"), manifest, out, batch_size=3)
    features = read_h5(out)[0]["features"]
    transform = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor(),
                                    transforms.Normalize([0.5] * 3, [0.25] * 3)])
    paths = load_verified_manifest(manifest)["path"]
    x = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        h = model.layer3(model.layer2(model.layer1(h)))
    assert h.shape[1:] == (256, 2, 2) and features.shape == (4, 256)
    np.testing.assert_allclose(features, h.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)


def test_spatial_output_without_fitting_pooling_fails_before_any_file(tmp_path, image_set):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "emb.h5"
    with pytest.raises(ValueError, match=r"'resnet': no `pooling` declared; the output of layer 'layer3' takes one"):
        extract(_resnet_entry(weights, layer="layer3"), image_set, out)
    with pytest.raises(ValueError, match=r"'resnet': layer 'layer3': pooling 'mean_patches' does not apply to a "
                                         r"spatial \(B, C, H, W\) output \(1, 256, 2, 2\)"):
        extract(_resnet_entry(weights, layer="layer3", pooling="mean_patches"), image_set, out)
    assert list(tmp_path.glob("emb.h5*")) == []


def _part(tmp_path, name: str, ids: list[str], seed: int, attrs: dict | None = None):
    """A part of a concat dataset: its manifest and a feature file as extraction writes them (features + a block)."""
    frame = pd.DataFrame({"image_id": ids, "path": [f"/{name}/{i}" for i in ids], "label": "", "split": name})
    write_csv(tmp_path / f"{name}.csv", frame)
    rng = np.random.default_rng(seed)
    arrays = {"features": rng.standard_normal((len(ids), 4)).astype(np.float32),
              "layer_6": rng.standard_normal((len(ids), 3)).astype(np.float32)}
    provenance = {"backbone": "clip", "layer": "11", "preprocessing": {"size": 224}, "manifest": f"{name}.csv",
                  "manifest_sha256": manifest_hash(frame), "cache_key": f"key-{name}", **(attrs or {})}
    write_h5(tmp_path / f"{name}.h5", arrays, ids, provenance)
    return tmp_path / f"{name}.h5", tmp_path / f"{name}.csv", arrays


def test_concat_dataset_rows_are_the_parts_in_order(tmp_path):
    """coco_eval = val2017 rows, then test2017 rows, by id, every output concatenated (docs/methods.md §3)."""
    val, val_manifest, val_arrays = _part(tmp_path, "val", ["000000000139.jpg", "000000000285.jpg"], 0)
    test, test_manifest, test_arrays = _part(tmp_path, "test", ["000000000001.jpg", "000000000016.jpg", "9.jpg"], 1)
    out = tmp_path / "eval.h5"
    cli(["embeddings-concat", "--parts", str(val), str(test), "--manifests", str(val_manifest), str(test_manifest),
         "--out", str(out), "--expected-count", "5"])
    arrays, ids, attrs = read_h5(out)
    assert ids == ["000000000139.jpg", "000000000285.jpg", "000000000001.jpg", "000000000016.jpg", "9.jpg"]
    for name in ("features", "layer_6"):
        np.testing.assert_array_equal(arrays[name], np.concatenate([val_arrays[name], test_arrays[name]]))
    assert (attrs["layer"], attrs["backbone"]) == ("11", "clip")  # the backbone's provenance carries over
    assert [part["n_rows"] for part in attrs["concat"]] == [2, 3]
    combined = pd.concat([read_manifest(val_manifest), read_manifest(test_manifest)], ignore_index=True)
    assert attrs["manifest_sha256"] == manifest_hash(combined)

    with pytest.raises(DataContractError, match="hold 5 images, the config expects 6"):
        cli(["embeddings-concat", "--parts", str(val), str(test), "--manifests", str(val_manifest),
             str(test_manifest), "--out", str(out), "--expected-count", "6"])
    with pytest.raises(DataContractError, match="not the rows of"):  # parts and manifests swapped
        cli(["embeddings-concat", "--parts", str(test), str(val), "--manifests", str(val_manifest),
             str(test_manifest), "--out", str(out)])
    again, again_manifest, _ = _part(tmp_path, "again", ["000000000285.jpg"], 2)
    with pytest.raises(DataContractError, match="'000000000285.jpg' occurs in more than one"):
        cli(["embeddings-concat", "--parts", str(val), str(again), "--manifests", str(val_manifest),
             str(again_manifest), "--out", str(out)])
    other, other_manifest, _ = _part(tmp_path, "other", ["x.jpg"], 3, {"preprocessing": {"size": 256}})
    with pytest.raises(DataContractError, match=r"not extracted like.*\['preprocessing'\]"):
        cli(["embeddings-concat", "--parts", str(val), str(other), "--manifests", str(val_manifest),
             str(other_manifest), "--out", str(out)])

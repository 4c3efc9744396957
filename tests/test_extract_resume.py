"""Extraction as a real job: killed with SIGKILL mid-run and resumed to identical bytes; webdataset shards as input;
several layers from one pass; manifest checksums."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from metalign.embed.extract import extract
from metalign.images.manifest import build_manifest
from metalign.io import DataContractError, read_h5, write_csv
from tests.conftest import REPO, write_images


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; more only contend on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _entry(model_dir, **extra) -> dict:
    return {"name": "vit_tiny", "source": "transformers", "id": str(model_dir), "layer": 1, "pooling": "cls",
            "extra_layers": [0], "preprocessing": {"size": 32, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3},
            **extra}


_CHILD = """
import argparse, json, sys
from metalign.embed.cli import register
parser = argparse.ArgumentParser()
register(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
args.func(args)
"""


def _n_done(partial) -> int:
    """Read the progress counter of a file another process is writing (it may be mid-flush: then report 0)."""
    try:
        with h5py.File(partial, "r", locking=False) as handle:
            return int(handle.attrs.get("n_done", 0))
    except (OSError, KeyError):
        return 0


def test_kill_9_then_resume_gives_identical_bytes(tiny_vit, tmp_path, caplog):
    write_images(tmp_path / "imgs", 240, size=160)
    manifest = tmp_path / "manifest.csv"
    write_csv(manifest, build_manifest("flat", tmp_path / "imgs", "train"))
    entry = _entry(tiny_vit)
    reference = tmp_path / "reference.h5"
    extract(entry, manifest, reference, batch_size=4)

    out = tmp_path / "killed.h5"
    partial = out.with_name(out.name + ".partial.h5")
    command = [sys.executable, "-c", _CHILD, "extract", "--backbone", json.dumps(entry), "--manifest", str(manifest),
               "--out", str(out), "--batch-size", "4", "--device", "cpu", "--threads", "1"]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # only a hung child: importing torch on a loaded machine can take a minute
    while _n_done(partial) < 20 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.poll() is None, f"extraction finished before it could be killed: {child.stderr.read()[-500:]}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    killed_at = _n_done(partial)
    assert not out.exists() and 0 < killed_at < 240

    caplog.set_level(logging.INFO, logger="metalign.embed.extract")
    extract(entry, manifest, out, batch_size=4)
    assert f"at row {killed_at} of 240" in caplog.text
    assert not partial.exists()
    with h5py.File(reference) as ref, h5py.File(out) as got:
        for name in ("features", "layer_0"):
            assert ref[name][:].tobytes() == got[name][:].tobytes()
        assert list(ref["ids"][:]) == list(got["ids"][:])


def _shards(folder, paths, per_shard: int) -> None:
    """The images as webdataset shards: key = file stem, fields jpg + cls."""
    folder.mkdir()
    for start in range(0, len(paths), per_shard):
        with tarfile.open(folder / f"shard-{start // per_shard:04d}.tar", "w") as tar:
            for path in paths[start:start + per_shard]:
                for ext, data in (("jpg", path.read_bytes()), ("cls", str(int(path.stem) % 3).encode())):
                    info = tarfile.TarInfo(f"{path.stem}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_give_the_same_rows_as_files(tiny_vit, tmp_path):
    paths = write_images(tmp_path / "imgs", 11, size=40)
    _shards(tmp_path / "shards", paths, per_shard=4)
    files, shards = tmp_path / "files.csv", tmp_path / "shards.csv"
    write_csv(files, build_manifest("flat", tmp_path / "imgs", "train"))
    frame = build_manifest("webdataset", tmp_path / "shards", "train")
    write_csv(shards, frame)
    assert frame["image_id"].tolist() == [p.stem for p in paths]
    assert frame["label"].tolist() == [str(i % 3) for i in range(11)]
    assert frame["path"][5].endswith("shard-0001.tar/000000000005.jpg")
    assert [Path(p).stem for p in frame["path"]] == frame["image_id"].tolist()  # what Levels joins on
    extract(_entry(tiny_vit), files, tmp_path / "files.h5", batch_size=3)
    extract(_entry(tiny_vit), shards, tmp_path / "shards.h5", batch_size=3, num_workers=2)
    by_file, by_shard = read_h5(tmp_path / "files.h5")[0], read_h5(tmp_path / "shards.h5")[0]
    for name in ("features", "layer_0"):
        np.testing.assert_array_equal(by_file[name], by_shard[name])
    (tmp_path / "shards" / "shard-0002.tar").unlink()
    with pytest.raises(DataContractError, match=r"'000000000008' points to missing file .*shard-0002\.tar"):
        extract(_entry(tiny_vit), shards, tmp_path / "again.h5")


def test_multi_layer_file_layout_and_provenance(tiny_vit, tmp_path):
    write_images(tmp_path / "imgs", 5)
    manifest = tmp_path / "m.csv"
    write_csv(manifest, build_manifest("flat", tmp_path / "imgs", "train"))
    extract(_entry(tiny_vit), manifest, tmp_path / "e.h5", batch_size=2)
    arrays, ids, attrs = read_h5(tmp_path / "e.h5")
    assert sorted(arrays) == ["features", "layer_0"] and arrays["layer_0"].shape == (5, 32)
    assert attrs["outputs"] == ["features", "layer_0"] and attrs["extra_layers"] == [0] and attrs["layer"] == "1"
    assert not np.allclose(arrays["features"], arrays["layer_0"])


def test_manifest_checksums_refuse_changed_images(tiny_vit, tmp_path):
    paths = write_images(tmp_path / "imgs", 6)
    manifest = tmp_path / "m.csv"
    frame = build_manifest("flat", tmp_path / "imgs", "train", checksums=True)
    write_csv(manifest, frame)
    extract(_entry(tiny_vit), manifest, tmp_path / "ok.h5", batch_size=2)
    paths[4].write_bytes(paths[0].read_bytes())  # still a valid image, but not the one the manifest recorded
    with pytest.raises(DataContractError, match=f"{paths[4]} does not match its manifest checksum"):
        extract(_entry(tiny_vit), manifest, tmp_path / "bad.h5", batch_size=2)


@pytest.mark.parametrize("damage", ["truncated", "dataset_missing"])
def test_damaged_partial_is_discarded_and_rebuilt(tiny_vit, tmp_path, caplog, damage):
    write_images(tmp_path / "imgs", 10)
    manifest = tmp_path / "m.csv"
    write_csv(manifest, build_manifest("flat", tmp_path / "imgs", "train"))
    reference, out = tmp_path / "reference.h5", tmp_path / "e.h5"
    extract(_entry(tiny_vit), manifest, reference, batch_size=4)
    extract(_entry(tiny_vit), manifest, out, batch_size=4, max_batches=2)
    partial = out.with_name(out.name + ".partial.h5")
    if damage == "truncated":  # e.g. a copy or a disk that ran full
        with open(partial, "r+b") as handle:
            handle.truncate(partial.stat().st_size // 2)
    else:  # cache key and row counter intact, rows gone: resuming would keep 8 rows of zeros
        with h5py.File(partial, "a") as handle:
            del handle["features"]
    caplog.set_level(logging.INFO, logger="metalign.embed.extract")
    extract(_entry(tiny_vit), manifest, out, batch_size=4)
    assert f"partial file {partial} is truncated or corrupt" in caplog.text
    assert "discarded, extracting from scratch" in caplog.text and "resuming" not in caplog.text
    assert not partial.exists()
    with h5py.File(reference) as ref, h5py.File(out) as got:
        for name in ("features", "layer_0"):
            np.testing.assert_array_equal(ref[name][:], got[name][:])


def test_partial_open_in_another_process_is_left_alone(tiny_vit, tmp_path):
    write_images(tmp_path / "imgs", 4)
    manifest = tmp_path / "m.csv"
    write_csv(manifest, build_manifest("flat", tmp_path / "imgs", "train"))
    out = tmp_path / "e.h5"
    extract(_entry(tiny_vit), manifest, out, batch_size=2, max_batches=1)
    partial = out.with_name(out.name + ".partial.h5")
    hold = f"import h5py, sys; h = h5py.File({str(partial)!r}, 'a'); print('open', flush=True); sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(DataContractError, match=f"{partial} is open in another process"):
            extract(_entry(tiny_vit), manifest, out, batch_size=2)
        assert partial.exists()
    finally:
        holder.communicate("")

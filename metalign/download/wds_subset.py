"""Selected samples of remote webdataset shards, streamed: ImageNet images by key without storing ImageNet (docs/methods.md P-45).

Each source shard is streamed once (sha256-verified against the hub's LFS hash while it streams), and every selection
(`select.<name>`) gets the samples it wants written to its own shard of the same name under `<dest>/<name>/`. Progress
is per shard: a shard's outputs and its marker appear only when it streamed completely, so a rerun resumes at the
first unfinished shard. Shards are processed in order, so a `per_class` cap keeps the first samples in shard order.

Selections: `keys_from` (ids listed by another item: `format: levels_pkl` = the image stems of the Levels pickle,
`lines` = one id per line) and/or `per_class` (at most n samples per `.cls` value). A sample's ids are its key and, if
its `.json` names the original file, that file's stem; a selected sample is written under the id that matched. Every
listed id must be found, or the job fails naming the missing ones (docs/methods.md P-2).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import requests
import urllib3

from metalign.download.http import Digests, DownloadError, Expected, Retry, Transient, access_denied, open_stream
from metalign.images.webdataset import iter_samples
from metalign.io import write_json
from metalign.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    name: str
    url: str
    expected: Expected
    headers: Mapping[str, str]


@dataclass
class Selection:
    name: str
    keys: set[str] | None = None
    per_class: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    found: set[str] = field(default_factory=set)

    def match(self, sample: Mapping[str, Any]) -> str | None:
        """The id under which `sample` is selected, or None."""
        ids = sample_ids(sample)
        chosen = next((i for i in ids if i in self.keys), None) if self.keys is not None else ids[0]
        if chosen is None:
            return None
        if self.per_class is not None:
            label = sample_label(sample)
            if not label or self.counts.get(label, 0) >= self.per_class:
                return None
        return chosen

    def take(self, chosen: str, label: str) -> None:
        if self.per_class is not None:
            self.counts[label] = self.counts.get(label, 0) + 1
        self.found.add(chosen)

    def state(self) -> tuple[dict[str, int], set[str]]:
        return dict(self.counts), set(self.found)

    def restore(self, state: tuple[dict[str, int], set[str]]) -> None:
        self.counts, self.found = dict(state[0]), set(state[1])


def sample_label(sample: Mapping[str, Any]) -> str:
    return sample["cls"].decode().strip() if isinstance(sample.get("cls"), bytes) else ""


def sample_ids(sample: Mapping[str, Any]) -> list[str]:
    ids = [str(sample["__key__"])]
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        name = meta.get("filename") or meta.get("file_name") if isinstance(meta, dict) else None
        if name:
            ids.append(Path(str(name)).stem)
    return ids


class _SafeUnpickler(pickle.Unpickler):
    """The Levels file is a pickle of plain containers: refuse anything that could run code."""

    ALLOWED = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool")}
    ALLOWED |= {("collections", "OrderedDict"), ("collections", "defaultdict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def levels_stems(path: str | Path) -> list[str]:
    """Stems of every image the Levels triplets reference (ImageNet-train file names without extension)."""
    with open(path, "rb") as handle:
        try:
            data = _SafeUnpickler(handle).load()
        except pickle.UnpicklingError as err:
            raise DownloadError(f"{path}: not a plain Levels pickle: {err}") from None
    if not isinstance(data, dict):
        raise DownloadError(f"{path}: expected a dict participant → trials, got {type(data).__name__}")
    stems = {Path(str(trial[f"image{i}Path"])).stem for trials in data.values() for trial in trials
             for i in (1, 2, 3) if trial.get(f"image{i}Path")}
    if not stems:
        raise DownloadError(f"{path}: no image1Path/image2Path/image3Path in any trial")
    return sorted(stems)


def read_keys(spec: Mapping[str, Any], receipts: Path) -> list[str]:
    """Ids listed by another download item, found through its receipt (so the rule must depend on it)."""
    receipt = receipts / f"{spec['item']}.json"
    if not receipt.exists():
        raise DownloadError(f"selection needs item {spec['item']!r} downloaded first ({receipt} is missing)")
    dest = Path(json.loads(receipt.read_text())["dest"])
    path = dest / spec["path"] if spec.get("path") else dest
    fmt = spec.get("format", "lines")
    if fmt == "levels_pkl":
        return levels_stems(path)
    if fmt == "lines":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    raise ValueError(f"keys_from.format {fmt!r}: known levels_pkl, lines")


def load_selections(spec: Mapping[str, Mapping[str, Any]], receipts: Path) -> list[Selection]:
    selections = []
    for name, entry in spec.items():
        if "keys_from" not in entry and "per_class" not in entry:
            raise ValueError(f"select.{name}: needs keys_from and/or per_class")
        keys = set(read_keys(entry["keys_from"], receipts)) if "keys_from" in entry else None
        selections.append(Selection(name, keys, entry.get("per_class")))
    return selections


class _HashingStream(io.RawIOBase):
    """Read-through wrapper: the shard is hashed as tarfile consumes it, so verification needs no second pass."""

    def __init__(self, raw: Any, digests: Digests):
        self.raw, self.digests, self.size = raw, digests, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n is not None and n >= 0 else None) or b""
        self.digests.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _stream_shard(shard: Shard, selections: list[Selection], out: Path, session: requests.Session, timeout: float,
                  page: str, what: str) -> dict[str, Any]:
    """Stream one shard, writing selected samples to `<out>/<selection>/<shard>.tmp`; returns the shard's marker."""
    with open_stream(session, shard.url, shard.headers, timeout, what) as response:
        if response.status_code in (401, 403):
            raise access_denied(response.status_code, what, page)
        if response.status_code == 429 or response.status_code >= 500:
            raise Transient(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise DownloadError(f"{what}: HTTP {response.status_code} {response.reason}")
        response.raw.decode_content = True
        stream = _HashingStream(response.raw, Digests())
        writers: dict[str, tarfile.TarFile] = {}
        taken: dict[str, list[list[str]]] = {s.name: [] for s in selections}
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for sample in iter_samples(tar):
                    for selection in selections:
                        chosen = selection.match(sample)
                        if chosen is None:
                            continue
                        selection.take(chosen, sample_label(sample))
                        taken[selection.name].append([chosen, sample_label(sample)])
                        if selection.name not in writers:
                            path = out / selection.name / (Path(shard.name).name + ".tmp")
                            path.parent.mkdir(parents=True, exist_ok=True)
                            writers[selection.name] = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
                        _write_sample(writers[selection.name], chosen, sample)
            stream.drain()
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, tarfile.TarError) as err:
            raise Transient(f"stream broke after {stream.size} bytes: {type(err).__name__}") from None
        finally:
            for writer in writers.values():
                writer.close()
    got = {**stream.digests.as_dict(), "size": stream.size}
    shard.expected.check(got, stream.size, what)
    return {"file": got, "taken": taken}


def _write_sample(tar: tarfile.TarFile, key: str, sample: Mapping[str, Any]) -> None:
    for ext, data in sample.items():
        if ext == "__key__":
            continue
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))


def _restorer(selections: list[Selection]) -> Callable[[], None]:
    """A broken stream restarts its shard from the first byte: this puts every selection back as it was before."""
    before = [s.state() for s in selections]

    def reset() -> None:
        for selection, state in zip(selections, before):
            selection.restore(state)
    return reset


def select_samples(shards: list[Shard], spec: Mapping[str, Mapping[str, Any]], work: Path, receipts: Path,
                   retry: Retry, session: requests.Session, page: str,
                   item: str) -> tuple[Path, dict[str, Any], dict[str, int]]:
    """Stream every shard once, write each selection's samples under `<work>/select/<selection>/`; returns that
    folder, the per-shard checksums and the per-selection counts."""
    selections = load_selections(spec, receipts)
    out, done = work / "select", work / "done"
    done.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    bar = progress(shards, desc=f"{item}: shards", unit="shard")
    for shard in bar:
        marker = done / (Path(shard.name).name + ".json")
        if marker.exists():
            record = json.loads(marker.read_text())
            for selection in selections:
                for chosen, label in record["taken"][selection.name]:
                    selection.take(chosen, label)
        else:
            what = f"{item}: {shard.name}"
            record = retry.run(lambda: _stream_shard(shard, selections, out, session, retry.timeout_s, page, what),
                               what, reset=_restorer(selections))
            for selection in selections:
                tmp = out / selection.name / (Path(shard.name).name + ".tmp")
                if tmp.exists():
                    os.replace(tmp, tmp.with_suffix(""))
            write_json(marker, record)
        files[shard.name] = record["file"]
        bar.set_postfix({s.name: len(s.found) for s in selections})
    for selection in selections:
        missing = sorted(selection.keys - selection.found) if selection.keys is not None else []
        if missing:
            raise DownloadError(f"{item}: selection {selection.name!r}: {len(missing)} of {len(selection.keys)} listed "
                                f"ids are in no shard, e.g. {missing[:5]}")
        (out / selection.name).mkdir(parents=True, exist_ok=True)
    return out, files, {s.name: len(s.found) for s in selections}

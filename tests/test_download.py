"""Downloads against loopback servers: verification, resume, retries, archives, the hub (incl. gated), shard selection.

One `http.server` on 127.0.0.1 plays a plain file host, a mirror that breaks transfers, and the Hugging Face hub
(`/api/<type>s/<repo>/revision/<rev>` + `/<repo>/resolve/<commit>/<file>`, redirected to a signed CDN URL).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import pickle
import subprocess
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from metalign.download.cli import register
from metalign.download.http import AccessDenied, DownloadError, Expected, Retry, fetch, redact, redact_url
from metalign.download.items import Lock, download
from metalign.images.webdataset import iter_samples

FAST = Retry(attempts=3, backoff_s=0.0, timeout_s=10.0)
SIGNED = "X-Amz-Signature=sigSecret1&X-Amz-Credential=credSecret2&token=tokSecret3&Expires=17&Key-Pair-Id=kpSecret4"
TOKEN = "hf_correctTokenValue123"
WRONG = "hf_secretButWrongToken456"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """Files by path; `faults[path]` is a list of one-shot behaviours: 500, 404, 'truncate:N', 'ignore_range'."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.hub: dict[str, dict] = {}  # "models/org/name" → {"refs": {rev: commit}, "files": {commit: {name: bytes}}}
        self.gated: set[str] = set()
        self.tamper: dict[str, bytes] = {}  # file name → bytes served instead of what the metadata describes
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers)))
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        # shutdown() waits for the next poll: 0.05 s instead of the default 0.5 s per test
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def add_repo(self, repo_type: str, repo: str, commit: str, files: dict[str, bytes], rev: str = "main",
                 lfs: tuple[str, ...] = ()) -> None:
        entry = self.hub.setdefault(f"{repo_type}s/{repo}", {"refs": {}, "files": {}, "lfs": set()})
        entry["refs"][rev] = commit
        entry["files"][commit] = files
        entry["lfs"] |= set(lfs)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        if path.startswith("/api/"):
            return self._api(h, path)
        if "/resolve/" in path:
            return self._resolve(h, path)
        if path in self.redirects:
            return self._send(h, 302, b"", {"Location": self.redirects[path]})
        fault = self.faults.get(path, [None]).pop(0) if self.faults.get(path) else None
        if fault in (500, 404, 401):
            return self._send(h, fault, b"nope")
        if path not in self.files:
            return self._send(h, 404, b"not found")
        data = self.files[path]
        start = 0
        if h.headers.get("Range") and fault != "ignore_range":
            start = int(h.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                return self._send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
        status = 200
        if start:
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        if isinstance(fault, str) and fault.startswith("truncate:"):
            h.wfile.write(body[: int(fault.split(":")[1])])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def _repo(self, repo_type: str, repo: str) -> dict | None:
        return self.hub.get(f"{repo_type}/{repo}")

    def _api(self, h: BaseHTTPRequestHandler, path: str) -> None:
        parts = path.split("/", 3)  # /api/models/org/name/revision/main
        if len(parts) < 4 or "/revision/" not in parts[3]:
            return self._send(h, 404, b"{}")
        repo_type, (repo, _, rev) = parts[2], parts[3].partition("/revision/")
        entry = self._repo(repo_type, repo)
        if entry is None:
            return self._send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        commit = entry["refs"].get(rev, rev)
        if commit not in entry["files"]:
            return self._send(h, 404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"})
        siblings = []
        for name, data in entry["files"][commit].items():
            sibling = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if name in entry["lfs"]:
                sibling["lfs"] = {"sha256": sha256(data), "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        body = json.dumps({"id": repo, "sha": commit, "siblings": siblings, "private": False}).encode()
        self._send(h, 200, body, {"Content-Type": "application/json"})

    def _resolve(self, h: BaseHTTPRequestHandler, path: str) -> None:
        head, _, tail = path.partition("/resolve/")
        repo_type, repo = ("datasets", head[len("/datasets/"):]) if head.startswith("/datasets/") else ("models", head[1:])
        commit, _, name = tail.partition("/")
        if f"{repo_type}/{repo}" in self.gated and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(h, 401, b"gated", {"X-Error-Code": "GatedRepo"})
        data = self.tamper.get(name, self._repo(repo_type, repo)["files"][commit][name])
        cdn = f"/cdn/{sha256(data)}"
        self.files[cdn] = data
        self._send(h, 302, b"", {"Location": f"{self.url}{cdn}?X-Amz-Signature=signedSecret&Expires=1"})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
        h.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.httpd.shutdown()


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no_saved_token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return server


def _job(tmp_path, spec: dict, name: str = "item") -> dict:
    return download({"name": name, **spec}, tmp_path / "res", tmp_path / "lock.json",
                    tmp_path / "res" / "downloads" / f"{name}.json", retry=FAST)


# ----------------------------------------------------------------------------------------------- plain fetch


def test_fetch_verifies_then_renames(server, tmp_path):
    data = bytes(range(256)) * 1000
    server.files["/f.bin"] = data
    got = fetch(f"{server.url}/f.bin", tmp_path / "f.bin", expected=Expected(sha256=sha256(data)), retry=FAST)
    assert (tmp_path / "f.bin").read_bytes() == data and got["sha256"] == sha256(data)
    assert not (tmp_path / "f.bin.part").exists()


def test_checksum_mismatch_leaves_nothing_behind(server, tmp_path):
    server.files["/f.bin"] = b"tampered content"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", expected=Expected(sha256=sha256(b"original")), retry=FAST)
    assert list(tmp_path.iterdir()) == []


def test_truncated_transfer_resumes_with_range(server, tmp_path):
    data = bytes(range(256)) * 4000
    server.files["/big.bin"] = data
    server.faults["/big.bin"] = ["truncate:150000"] * 5  # more breaks than attempts: each one still makes progress
    fetch(f"{server.url}/big.bin", tmp_path / "big.bin", expected=Expected(sha256=sha256(data)), retry=FAST)
    assert (tmp_path / "big.bin").read_bytes() == data
    ranges = [headers.get("Range") for path, headers in server.requests]
    offsets = [int(r.split("=")[1].rstrip("-")) for r in ranges[1:]]
    assert ranges[0] is None and len(offsets) == 5 and offsets == sorted(set(offsets)) and offsets[0] > 0


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = bytes(range(256)) * 1000
    server.files["/f.bin"] = data
    server.faults["/f.bin"] = ["truncate:1000", "ignore_range"]
    fetch(f"{server.url}/f.bin", tmp_path / "f.bin", expected=Expected(sha256=sha256(data)), retry=FAST)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_partial_bytes_of_a_changed_item_are_not_resumed(server, tmp_path):
    old, new = bytes(range(256)) * 2000, bytes(reversed(range(256))) * 2000
    server.files["/v1.bin"], server.files["/v2.bin"] = old, new
    server.faults["/v1.bin"] = ["truncate:200000"] + [500] * 10
    with pytest.raises(DownloadError, match="without progress"):  # the job dies with part of v1 on disk
        download({"name": "w", "url": f"{server.url}/v1.bin", "dest": "w.bin"}, tmp_path, tmp_path / "lock.json",
                 tmp_path / "downloads" / "w.json", retry=Retry(attempts=2, backoff_s=0.0))
    assert (tmp_path / "downloads/.work/w/w.bin.part").stat().st_size > 0
    download({"name": "w", "url": f"{server.url}/v2.bin", "dest": "w.bin"}, tmp_path, tmp_path / "lock.json",
             tmp_path / "downloads" / "w.json", retry=FAST)
    assert (tmp_path / "w.bin").read_bytes() == new
    assert all("Range" not in headers for path, headers in server.requests if path == "/v2.bin")


def test_server_errors_are_retried_then_reported(server, tmp_path):
    server.files["/f.bin"] = b"payload"
    server.faults["/f.bin"] = [500, 500]
    fetch(f"{server.url}/f.bin", tmp_path / "ok.bin", retry=FAST)
    assert (tmp_path / "ok.bin").read_bytes() == b"payload"
    server.faults["/f.bin"] = [500] * 5
    with pytest.raises(DownloadError, match="failed 3 times without progress: HTTP 500"):
        fetch(f"{server.url}/f.bin", tmp_path / "bad.bin", retry=FAST)
    assert not (tmp_path / "bad.bin").exists()


def test_partial_file_message_is_accurate(server, tmp_path, caplog):
    """"The partial file is kept" only when bytes were kept: a server that never sent any must not send the reader
    looking for a file that does not exist (same for the job's "discarding its partial files")."""
    data = bytes(range(256)) * 1000
    server.files["/f.bin"] = server.files["/g.bin"] = data
    server.faults["/f.bin"] = ["truncate:150000"] + [500] * 5
    with pytest.raises(DownloadError, match=r"without progress: HTTP 500 \(the partial file f\.bin\.part is kept"):
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", retry=FAST)
    assert (tmp_path / "f.bin.part").stat().st_size > 0
    server.faults["/g.bin"] = [500] * 5
    with pytest.raises(DownloadError, match=r"without progress: HTTP 500 \(no bytes were received\)$") as err:
        fetch(f"{server.url}/g.bin", tmp_path / "g.bin", retry=FAST)
    assert "partial" not in str(err.value) and not (tmp_path / "g.bin.part").exists()
    server.faults["/g.bin"] = [500] * 5
    with pytest.raises(DownloadError, match="no bytes were received"):
        _job(tmp_path, {"url": f"{server.url}/g.bin", "dest": "g.bin"})
    caplog.set_level(logging.INFO)
    _job(tmp_path, {"url": f"{server.url}/g.bin?download=1", "dest": "g.bin"})
    assert "discarding its partial files" not in caplog.text


def test_not_found_fails_at_once_naming_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match=r"HTTP 404 .*/missing\.bin"):
        fetch(f"{server.url}/missing.bin", tmp_path / "x.bin", retry=FAST)
    assert len(server.requests) == 1


def test_redirect_is_followed(server, tmp_path):
    server.files["/real.bin"] = b"moved here"
    server.redirects["/old.bin"] = f"{server.url}/real.bin"
    fetch(f"{server.url}/old.bin", tmp_path / "f.bin", expected=Expected(sha256=sha256(b"moved here")), retry=FAST)
    assert (tmp_path / "f.bin").read_bytes() == b"moved here"


# ----------------------------------------------------------------------------------------------- items


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar(entries: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_archive_item_unpacks_subdir_records_lock_and_receipt(server, tmp_path):
    archive = _zip({"images/cat/a.jpg": b"A", "images/dog/b.jpg": b"B", "__MACOSX/images/._a.jpg": b"junk",
                    "README": b"top"})
    server.files["/images.zip"] = archive
    spec = {"url": f"{server.url}/images.zip", "dest": "things/images", "archive": {"subdir": "images"}}
    receipt = _job(tmp_path, spec)
    dest = tmp_path / "res" / "things" / "images"
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["cat", "cat/a.jpg", "dog", "dog/b.jpg"]
    assert receipt["files"]["images.zip"]["sha256"] == sha256(archive)
    assert json.loads((tmp_path / "res/downloads/item.json").read_text()) == receipt
    assert Lock(tmp_path / "lock.json").read()["item"]["files"]["images.zip"]["sha256"] == sha256(archive)
    assert not (tmp_path / "res/downloads/.work/item").exists()
    # The lock now pins the bytes: a changed file at the same URL is refused, and the old tree stays.
    server.files["/images.zip"] = _zip({"images/cat/a.jpg": b"other"})
    with pytest.raises(DownloadError, match="mismatch"):
        _job(tmp_path, spec)
    assert (dest / "cat" / "a.jpg").read_bytes() == b"A"
    # A new URL (a new release) starts a new lock entry; a config pin always wins.
    server.files["/v2/images.zip"] = server.files["/images.zip"]
    _job(tmp_path, {**spec, "url": f"{server.url}/v2/images.zip"})
    assert (dest / "cat" / "a.jpg").read_bytes() == b"other"


def test_verified_items_survive_a_failed_replacement(server, tmp_path):
    """A new URL that 404s or serves other bytes must not cost the verified file or tree, nor its receipt or lock entry:
    they are replaced only once the replacement is verified."""
    server.files["/v1/a.txt"], server.files["/v2/a.txt"] = b"verified", b"tampered"
    server.files["/v1/t.tgz"] = server.files["/v2/t.tgz"] = _tar({"t/a.txt": b"tree"}, "w:gz")
    single = {"url": f"{server.url}/v1/a.txt", "dest": "a.txt"}
    folder = {"url": f"{server.url}/v1/t.tgz", "dest": "t", "archive": {"subdir": "t"}}
    _job(tmp_path, single, name="single")
    _job(tmp_path, folder, name="folder")

    def placed() -> dict[str, bytes]:
        """Every file outside the work area (which keeps partial bytes for a rerun), by path."""
        return {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*"))
                if p.is_file() and ".work" not in p.parts}

    before = placed()
    assert {"res/a.txt", "res/t/a.txt", "res/downloads/single.json", "res/downloads/folder.json"} <= set(before)
    for name, spec, error in [("single", {**single, "url": f"{server.url}/gone/a.txt"}, "HTTP 404"),
                              ("single", {**single, "url": f"{server.url}/v2/a.txt", "sha256": sha256(b"other")},
                               "sha256 mismatch"),
                              ("folder", {**folder, "url": f"{server.url}/gone/t.tgz"}, "HTTP 404"),
                              ("folder", {**folder, "url": f"{server.url}/v2/t.tgz", "sha256": sha256(b"other")},
                               "sha256 mismatch")]:
        with pytest.raises(DownloadError, match=error):
            _job(tmp_path, spec, name=name)
        assert placed() == before


def test_plain_file_item_and_missing_subdir(server, tmp_path):
    server.files["/download"] = b"aardvark\nabacus\n"
    _job(tmp_path, {"url": f"{server.url}/download", "dest": "things/unique_id.txt",
                    "sha256": sha256(b"aardvark\nabacus\n")})
    assert (tmp_path / "res/things/unique_id.txt").read_text() == "aardvark\nabacus\n"
    server.files["/t.tar.gz"] = _tar({"x/a.png": b"a"}, "w:gz")
    with pytest.raises(DownloadError, match=r"no folder 'cue-conflict'.*\['x'\]"):
        _job(tmp_path, {"url": f"{server.url}/t.tar.gz", "dest": "cue", "archive": {"subdir": "cue-conflict"}})


def test_unexpected_layout_is_refused_and_the_older_tree_kept(server, tmp_path):
    server.files["/cub.tgz"] = _tar({"CUB_200_2011/images/001.Albatross/a.jpg": b"a",
                                     "CUB_200_2011/images.txt": b"1 001.Albatross/a.jpg\n"}, "w:gz")
    spec = {"url": f"{server.url}/cub.tgz", "dest": "cub", "archive": {"subdir": "CUB_200_2011"},
            "expect": ["images/*/*.jpg", "images.txt"]}
    _job(tmp_path, spec)
    dest = tmp_path / "res" / "cub"
    assert (dest / "images.txt").is_file()
    # A new release without the split file: refused by name, the verified older tree stays, and no receipt is written.
    server.files["/v2/cub.tgz"] = _tar({"CUB_200_2011/images/001.Albatross/a.jpg": b"a"}, "w:gz")
    (tmp_path / "res/downloads/item.json").unlink()
    with pytest.raises(DownloadError, match=r"expected path 'images.txt'.*\['images'\]"):
        _job(tmp_path, {**spec, "url": f"{server.url}/v2/cub.tgz", "expect": ["images.txt"]})
    assert (dest / "images.txt").is_file()
    assert not (tmp_path / "res/downloads/item.json").exists()
    # A repository archive made without its LFS objects holds pointer files where the images should be.
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1234\n"
    server.files["/lfs.tgz"] = _tar({"CUB_200_2011/images/001.Albatross/a.jpg": pointer,
                                     "CUB_200_2011/images.txt": b"1 001.Albatross/a.jpg\n"}, "w:gz")
    with pytest.raises(DownloadError, match="Git LFS pointer"):
        _job(tmp_path, {**spec, "url": f"{server.url}/lfs.tgz"})


def test_nested_archive_and_unsafe_tar(server, tmp_path):
    inner = _tar({"101_ObjectCategories/ant/1.jpg": b"ant"}, "w:gz")
    server.files["/caltech-101.zip"] = _zip({"caltech-101/101_ObjectCategories.tar.gz": inner})
    _job(tmp_path, {"url": f"{server.url}/caltech-101.zip", "dest": "caltech101", "archive": {
        "subdir": "caltech-101", "then": {"member": "101_ObjectCategories.tar.gz", "subdir": "101_ObjectCategories"}}})
    assert (tmp_path / "res/caltech101/ant/1.jpg").read_bytes() == b"ant"
    server.files["/n9u4a/download"] = _zip({"triplet_dataset/triplets.csv": b"a\tb", "triplet_dataset/x.txt": b""})
    _job(tmp_path, {"url": f"{server.url}/n9u4a/download", "dest": "things/triplets.tsv",
                    "archive": {"format": "zip", "file": "triplet_dataset/triplets.csv"}}, name="triplets")
    assert (tmp_path / "res/things/triplets.tsv").read_bytes() == b"a\tb"
    server.files["/evil.tar"] = _tar({"../evil.txt": b"x"})
    with pytest.raises(DownloadError, match="unsafe"):
        _job(tmp_path, {"url": f"{server.url}/evil.tar", "dest": "evil", "archive": {}}, name="evil")
    assert not (tmp_path / "res" / "evil.txt").exists()


def test_password_protected_zip(server, tmp_path, monkeypatch):
    folder = tmp_path / "src"
    (folder / "object_images_CC0").mkdir(parents=True)
    (folder / "object_images_CC0" / "aardvark.jpg").write_bytes(b"img")
    subprocess.run(["zip", "-q", "-r", "-P", "things4all", str(tmp_path / "p.zip"), "object_images_CC0"],
                   cwd=folder, check=True)
    server.files["/wb36u/download"] = (tmp_path / "p.zip").read_bytes()
    spec = {"url": f"{server.url}/wb36u/download", "dest": "thingsplus/images",
            "archive": {"format": "zip", "subdir": "object_images_CC0", "password_env": "THINGSPLUS_PASSWORD"}}
    monkeypatch.delenv("THINGSPLUS_PASSWORD", raising=False)
    with pytest.raises(DownloadError, match="export THINGSPLUS_PASSWORD"):
        _job(tmp_path, spec)
    monkeypatch.setenv("THINGSPLUS_PASSWORD", "things4all")
    _job(tmp_path, spec)
    assert (tmp_path / "res/thingsplus/images/aardvark.jpg").read_bytes() == b"img"


def test_figshare_article_files_are_md5_verified(server, tmp_path):
    files = {"ROIs.zip": _zip({"ROIs/CSI1/roi.txt": b"voxels"}), "README.txt": b"readme"}
    for name, data in files.items():
        server.files[f"/files/{name}"] = data
    record = {"files": [{"name": n, "size": len(d), "download_url": f"{server.url}/files/{n}",
                         "computed_md5": hashlib.md5(d).hexdigest()} for n, d in files.items()]}
    server.files["/v2/articles/6459449"] = json.dumps(record).encode()
    spec = {"figshare_article": 6459449, "api": f"{server.url}/v2", "files": ["*.zip"], "dest": "fmri/bold5000",
            "archive": {}}
    _job(tmp_path, spec)
    assert (tmp_path / "res/fmri/bold5000/ROIs/ROIs/CSI1/roi.txt").read_bytes() == b"voxels"
    assert not (tmp_path / "res/fmri/bold5000/README.txt").exists()
    server.files["/files/ROIs.zip"] = b"corrupted in transit"
    with pytest.raises(DownloadError, match="mismatch"):
        _job(tmp_path, spec)
    # A pinned version reads that version's record, not the latest one.
    server.files["/v2/articles/6459449/versions/2"] = json.dumps({"files": record["files"][1:]}).encode()
    _job(tmp_path, {**spec, "files": ["*.txt"], "figshare_version": 2, "archive": {}})
    assert (tmp_path / "res/fmri/bold5000/README.txt").read_bytes() == b"readme"


# ----------------------------------------------------------------------------------------------- the hub


def test_hub_files_verified_by_lfs_hash_and_revision_locked(hub, tmp_path):
    weights, config = b"\x00weights" * 1000, b'{"arch": "vit"}'
    hub.add_repo("model", "timm/tiny", "a" * 40, {"model.safetensors": weights, "config.json": config,
                                                  "README.md": b"card"}, lfs=("model.safetensors",))
    spec = {"hub": "timm/tiny", "files": ["*.safetensors", "config.json"], "dest": "models/tiny"}
    receipt = _job(tmp_path, spec)
    assert (tmp_path / "res/models/tiny/model.safetensors").read_bytes() == weights
    assert not (tmp_path / "res/models/tiny/README.md").exists()
    assert receipt["revision"] == "a" * 40 and receipt["files"]["config.json"]["sha256"] == sha256(config)
    # main moves on upstream; the lock keeps this item on the commit it resolved first
    hub.add_repo("model", "timm/tiny", "b" * 40, {"model.safetensors": b"new", "config.json": b"{}"})
    assert _job(tmp_path, spec)["revision"] == "a" * 40
    assert _job(tmp_path, {**spec, "revision": "b" * 40})["revision"] == "b" * 40
    # the hub serving other bytes than its LFS hash says is caught
    hub.tamper["model.safetensors"] = b"\x01weights" * 1000
    with pytest.raises(DownloadError, match="mismatch"):
        _job(tmp_path, {**spec, "revision": "a" * 40})


def test_gated_repo_names_repo_terms_and_token_and_never_prints_it(hub, tmp_path, monkeypatch, caplog, capsys):
    hub.add_repo("model", "timm/vit_base_patch16_dinov3.lvd1689m", "c" * 40, {"model.safetensors": b"w"},
                 lfs=("model.safetensors",))
    hub.gated.add("models/timm/vit_base_patch16_dinov3.lvd1689m")
    spec = {"name": "dinov3", "hub": "timm/vit_base_patch16_dinov3.lvd1689m", "dest": "models/dinov3"}
    monkeypatch.setenv("HF_TOKEN", WRONG)
    with pytest.raises(AccessDenied):
        _job(tmp_path, spec)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["download", "--spec", json.dumps(spec), "--root", str(tmp_path / "res"),
                              "--lock", str(tmp_path / "lock.json"), "--receipt", str(tmp_path / "r.json"),
                              "--attempts", "2"])
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError) as err:
        args.func(args)
    message = str(err.value)
    assert "timm/vit_base_patch16_dinov3.lvd1689m" in message and "HTTP 401" in message
    assert f"{hub.url}/timm/vit_base_patch16_dinov3.lvd1689m" in message and "HF_TOKEN" in message
    seen = message + caplog.text + "".join(capsys.readouterr())
    assert WRONG not in seen and "signedSecret" not in seen
    assert any(headers.get("Authorization") == f"Bearer {WRONG}" for path, headers in hub.requests
               if "/resolve/" in path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args.func(args)
    assert (tmp_path / "res/models/dinov3/model.safetensors").read_bytes() == b"w"
    assert TOKEN not in (tmp_path / "r.json").read_text() + (tmp_path / "lock.json").read_text()


def test_redact_hides_tokens_and_signed_queries(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRONG)
    text = redact(f"GET https://cdn.example/x?X-Amz-Signature=abc&t=1 failed with Bearer {WRONG}")
    assert WRONG not in text and "abc" not in text and "https://cdn.example/x" in text


def test_redact_url_blanks_credentials_and_keeps_plain_parameters():
    url = f"https://user:pwSecret0@cdn.example/a/b.zip?download=1&{SIGNED}&response-content-type=zip#frag"
    assert redact_url(url) == ("https://<redacted>@cdn.example/a/b.zip?download=1&X-Amz-Signature=<redacted>"
                               "&X-Amz-Credential=<redacted>&token=<redacted>&Expires=<redacted>"
                               "&Key-Pair-Id=<redacted>&response-content-type=zip#frag")
    assert redact_url(redact_url(url)) == redact_url(url)  # messages may be redacted twice
    assert redact_url(url.replace("sigSecret1", "resigned")) == redact_url(url)  # the same source in the lock
    assert redact_url("https://osf.io/n9u4a/download") == "https://osf.io/n9u4a/download"
    assert redact(f"HTTP 404 for {url}, retrying") == f"HTTP 404 for {redact_url(url)[:-5]}#frag, retrying"


def test_signed_url_is_redacted_in_lock_receipt_work_area_logs_and_errors(server, tmp_path, caplog, capsys):
    """The lock file is committed, receipts and logs are shared: a signed URL reaches them without its credentials
    (plain parameters kept), and a re-signed URL of the same file is the same source, still held to its checksum."""
    caplog.set_level(logging.DEBUG)
    host = server.url.replace("http://", "http://user:pwSecret0@")
    server.files["/f.bin"] = b"payload"
    server.faults["/f.bin"] = [500]  # one retry, logged
    spec = {"url": f"{host}/f.bin?download=1&{SIGNED}", "dest": "f.bin"}
    receipt = _job(tmp_path, spec)
    source = (f"http://<redacted>@{server.url[len('http://'):]}/f.bin?download=1&X-Amz-Signature=<redacted>"
              "&X-Amz-Credential=<redacted>&token=<redacted>&Expires=<redacted>&Key-Pair-Id=<redacted>")
    assert receipt["source"] == source and Lock(tmp_path / "lock.json").read()["item"]["source"] == source
    server.files["/f.bin"] = b"changed upstream"
    with pytest.raises(DownloadError, match="mismatch"):  # the work area keeps its (redacted) spec stamp
        _job(tmp_path, {**spec, "url": spec["url"].replace("sigSecret1", "sigSecret5")})
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    gone = {"name": "gone", "url": f"{host}/gone.bin?{SIGNED}", "dest": "gone.bin"}
    args = parser.parse_args(["download", "--spec", json.dumps(gone), "--root", str(tmp_path / "res"),
                              "--lock", str(tmp_path / "lock.json"), "--receipt", str(tmp_path / "gone.json")])
    with pytest.raises(ValueError, match=r"HTTP 404 .*<redacted>@.*/gone\.bin\?X-Amz-Signature=<redacted>") as err:
        args.func(args)
    seen = str(err.value) + caplog.text + "".join(capsys.readouterr())
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for secret in ("pwSecret0", "sigSecret1", "credSecret2", "tokSecret3", "kpSecret4", "sigSecret5"):
        assert secret not in seen and secret.encode() not in written


# ----------------------------------------------------------------------------------------------- shard selection


def _shard(samples: list[tuple[str, str, int]]) -> bytes:
    """(key, original file name, class) → a webdataset shard with jpg, cls and json fields."""
    entries = {}
    for key, filename, label in samples:
        entries[f"{key}.jpg"] = f"jpeg of {filename}".encode()
        entries[f"{key}.cls"] = str(label).encode()
        entries[f"{key}.json"] = json.dumps({"filename": filename, "label": label}).encode()
    return _tar(entries)


def _levels_pickle(stems: list[str]) -> bytes:
    trials = [{"image1Path": f"ILSVRC/train/{s.split('_')[0]}/{s}.JPEG", "image2Path": None, "image3Path": "",
               "selected_image": 1, "exp_trial_type": "exp_trial", "triplet_type": None} for s in stems]
    return pickle.dumps({"participant_1": trials[:2], "participant_2": trials[2:]})


def test_shard_selection_streams_verifies_resumes_and_reports_missing(hub, tmp_path):
    shards = {f"train/imagenet1k-train-000{i}.tar": _shard(
        [(f"{i:02d}{j:04d}", f"n0{c}_{i}{j}.JPEG", c) for j, c in enumerate([1, 2, 1, 2, 3])]) for i in range(3)}
    hub.add_repo("dataset", "timm/imagenet-1k-wds", "d" * 40, {**shards, "README.md": b"card"}, lfs=tuple(shards))
    wanted = ["n01_00", "n02_13", "n03_24"]
    hub.files["/levels.pkl"] = _levels_pickle(wanted)
    _job(tmp_path, {"url": f"{hub.url}/levels.pkl", "dest": "levels/pruned_dataset.pkl"}, name="levels")
    second = "/" + "datasets/timm/imagenet-1k-wds/resolve/" + "d" * 40 + "/train/imagenet1k-train-0001.tar"
    spec = {"hub": "timm/imagenet-1k-wds", "repo_type": "dataset", "files": ["train/*.tar"], "dest": "imagenet/train",
            "select": {"levels": {"keys_from": {"item": "levels", "format": "levels_pkl"}},
                       "per_class_2": {"per_class": 2}}}
    hub.faults[f"/cdn/{sha256(shards['train/imagenet1k-train-0001.tar'])}"] = ["truncate:700"]
    receipt = _job(tmp_path, spec, name="imagenet_train")
    assert receipt["selected"] == {"levels": 3, "per_class_2": 6}
    assert sum(p == second for p, _ in hub.requests) == 2  # the broken shard was streamed again
    out = tmp_path / "res/imagenet/train"
    with tarfile.open(out / "levels" / "imagenet1k-train-0001.tar") as tar:
        samples = list(iter_samples(tar))
    assert [s["__key__"] for s in samples] == ["n02_13"]  # written under the id that matched (the file stem)
    assert samples[0]["jpg"] == b"jpeg of n02_13.JPEG" and samples[0]["cls"] == b"2"
    kept = []
    for shard in sorted((out / "per_class_2").glob("*.tar")):
        with tarfile.open(shard) as tar:
            kept += [(s["__key__"], s["cls"]) for s in iter_samples(tar)]
    assert kept == [("000000", b"1"), ("000001", b"2"), ("000002", b"1"), ("000003", b"2"), ("000004", b"3"),
                    ("010004", b"3")]
    hub.files["/levels.pkl"] = _levels_pickle(wanted + ["n09_99"])
    _job(tmp_path, {"url": f"{hub.url}/levels.pkl", "dest": "levels/pruned_dataset.pkl"}, name="levels2")
    spec["select"]["levels"]["keys_from"]["item"] = "levels2"
    with pytest.raises(DownloadError, match=r"1 of 4 listed ids are in no shard, e.g. \['n09_99'\]"):
        _job(tmp_path, spec, name="imagenet_train2")


def test_levels_pickle_with_code_is_refused(tmp_path):
    from metalign.download.wds_subset import levels_stems

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"p": [Evil()]}))
    with pytest.raises(DownloadError, match="refusing to load builtins.print"):
        levels_stems(tmp_path / "evil.pkl")


def test_config_references_are_checked():
    from metalign.download.items import check_download_references

    config = {"resources": "resources", "downloads": {"items": {
        "levels": {"url": "https://x/levels.pkl", "dest": "levels/p.pkl"},
        "imagenet_train": {"hub": "timm/imagenet-1k-wds", "dest": "imagenet/train",
                           "select": {"levels": {"keys_from": {"item": "levels", "format": "levels_pkl"}}}}}},
        "datasets": {"levels": {"requires": ["resources/downloads/imagenet_train.json"]}},
        "backbones": {"clip": {"requires": ["resources/models/local.txt"]}}}
    check_download_references(config)
    config["datasets"]["levels"]["requires"] = ["resources/downloads/imagenet_trian.json"]
    with pytest.raises(ValueError, match=r"datasets\.levels\.requires: .*imagenet_trian\.json"):
        check_download_references(config)
    config["datasets"]["levels"]["requires"] = []
    config["downloads"]["items"]["imagenet_train"]["select"]["levels"]["keys_from"]["item"] = "level"
    with pytest.raises(ValueError, match="keys_from.item: unknown item 'level'"):
        check_download_references(config)
    config["downloads"]["items"]["imagenet_train"]["select"]["levels"]["keys_from"]["item"] = "levels"
    config["downloads"]["items"]["both"] = {"url": "u", "hub": "h", "dest": "d"}
    with pytest.raises(ValueError, match="exactly one of"):
        check_download_references(config)

"""Verified downloads of every external input: one config item (`downloads.items.<name>`) → files under `resources`.

Item kinds (the key that names the source decides):
- `url`: one file; with `archive`, unpacked (zip / tar; keep a `subdir` or a single `file`; `password`/`password_env`;
  a nested archive `then`).
- `hub`: files of a Hugging Face repo (`files` = glob patterns, `revision`, `repo_type`), kept in their repo layout;
  with `select`, the repo's webdataset shards are *streamed* and only the selected samples are written as new shards
  (`metalign.download.wds_subset`: e.g. the ImageNet images that Levels references, without storing ImageNet).
- `figshare_article`: files of a figshare/KiltHub article (`files` patterns; `figshare_version` pins a version),
  md5-verified from its API record.

Every file is verified: against `sha256`/`md5`/`size` pinned in the config, the hub's LFS sha256, the figshare md5,
or else against the lock file (`downloads.lock`), which records checksums and resolved hub commits on first fetch,
so a second machine gets the same bytes. A mirror is a new `url` (pin its checksum from the lock); a newer release is a
new `url`/`revision` (the lock entry is replaced). Work happens in `<receipts>/.work/<item>/` (kept between runs, so a
rerun resumes); a folder item's `expect` globs (the files its readers need) are checked before the destination
appears by rename; the receipt `<receipts>/<item>.json` is written last: it is the
completion marker and the rule's output.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import requests

from metalign.download.http import (
    Digests,
    DownloadError,
    Expected,
    Retry,
    Transient,
    access_denied,
    fetch,
    hub_headers,
    redact,
    redact_url,
)
from metalign.io import write_json

log = logging.getLogger(__name__)

KINDS = ("url", "hub", "figshare_article")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


# ----------------------------------------------------------------------------------------------- lock file


class Lock:
    """Checksums and resolved revisions per item, shared by concurrent download jobs (flock on a side file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        return json.loads(self.path.read_text()).get("items", {})

    def entry(self, item: str, source: str) -> dict[str, Any]:
        """The recorded entry, only if it was recorded for this same source (a new URL or repo starts afresh).
        Sources are redacted URLs (`redact_url`): the file is committed, and a re-signed URL is the same source."""
        recorded = self.read().get(item, {})
        return recorded if recorded.get("source") == source else {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".flock"), "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def record(self, item: str, entry: Mapping[str, Any]) -> None:
        with self._locked():
            items = self.read()
            items[item] = dict(entry)
            write_json(self.path, {"version": 1, "items": dict(sorted(items.items()))})


# ----------------------------------------------------------------------------------------------- helpers


def item_kind(spec: Mapping[str, Any]) -> str:
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        raise ValueError(f"download item {spec.get('name')!r}: needs exactly one of {KINDS}, has {kinds or 'none'}")
    return kinds[0]


def _expected(pins: Mapping[str, Any], locked: Mapping[str, Any] | None) -> Expected:
    """Config pins win; otherwise what the lock recorded for this file; otherwise nothing (recorded after fetch)."""
    if any(pins.get(k) for k in ("sha256", "md5")):
        return Expected(pins.get("sha256"), pins.get("md5"), pins.get("size"))
    locked = locked or {}
    return Expected(locked.get("sha256"), None, locked.get("size") or pins.get("size"))


def _matching(names: list[str], patterns: list[str], what: str) -> list[str]:
    chosen = sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns))
    if not chosen:
        raise DownloadError(f"{what}: no file matches {patterns}; it has {sorted(names)[:20]}")
    return chosen


def check_layout(tree: Path, expect: Sequence[str], what: str) -> None:
    """Every `expect` glob (relative to the tree) matches a path: a release whose archive layout differs from what the
    readers assume fails here, naming the pattern, instead of as a confusing error stages later."""
    for pattern in expect:
        found = next(iter(tree.glob(pattern)), None)
        if found is None:
            top = sorted(p.name for p in tree.iterdir())[:20] if tree.is_dir() else []
            raise DownloadError(f"{what}: nothing matches expected path {pattern!r} in the downloaded tree "
                                f"(the release's layout differs from the config's `expect`); top level: {top}")
        if found.is_file():
            with open(found, "rb") as handle:
                if handle.read(len(_LFS_POINTER)) == _LFS_POINTER:
                    raise DownloadError(f"{what}: {found.relative_to(tree)} is a Git LFS pointer, not the file "
                                        f"(the archive was made without LFS objects); use a source that serves the data")


def _replace_dir(src: Path, dest: Path, expect: Sequence[str] = (), what: str = "") -> None:
    """Put the finished tree `src` at `dest` once its layout is as expected; an older `dest` is moved aside first and
    removed after, so a failed check leaves the older tree in place."""
    check_layout(src, expect, what)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists() or dest.is_symlink():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        old.unlink()


def _retrying(call: Callable[[], Any], what: str, retry: Retry) -> Any:
    """Run a metadata request through `Retry.run`: transport errors, HTTP 5xx and 429 are transient; other HTTP 4xx
    (and our own errors) fail at once."""
    from huggingface_hub.errors import HfHubHTTPError

    def attempt() -> Any:
        try:
            return call()
        except DownloadError:
            raise
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            if status and status < 500 and status != 429:
                raise
            raise Transient(f"HTTP {status}") from None
        except Exception as err:  # noqa: BLE001 - transport errors of requests and of the hub client (no common base)
            raise Transient(type(err).__name__) from None
    return retry.run(attempt, what)


# ----------------------------------------------------------------------------------------------- archives


def _archive_format(spec: Mapping[str, Any], name: str) -> str:
    fmt = spec.get("format")
    if fmt:
        return fmt
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(_TAR_SUFFIXES):
        return "tar"
    raise ValueError(f"{name}: cannot tell the archive format from the name; set archive.format (zip or tar)")


def _password(spec: Mapping[str, Any], what: str) -> str | None:
    if spec.get("password_env"):
        value = os.environ.get(spec["password_env"])
        if not value:
            raise DownloadError(f"{what}: the archive is password-protected: export {spec['password_env']}")
        return value
    return spec.get("password")


def _unpack(archive: Path, out: Path, spec: Mapping[str, Any], what: str) -> None:
    """Unpack into the empty folder `out`, refusing members that would land outside it."""
    if _archive_format(spec, archive.name) == "zip":
        with zipfile.ZipFile(archive) as zf:
            encrypted = any(info.flag_bits & 0x1 for info in zf.infolist())
            password = _password(spec, what) if encrypted else None
            if encrypted and password is None:
                raise DownloadError(f"{what}: {archive.name} is password-protected: set archive.password or "
                                    f"archive.password_env")
            if encrypted and shutil.which("unzip"):
                # Python's ZipCrypto is ~100x slower than unzip. The password shows in `ps` on this host while unzip
                # runs: fine for the published THINGS passwords, not for a secret.
                done = subprocess.run(["unzip", "-q", "-P", password, str(archive), "-d", str(out)], capture_output=True)
                if done.returncode:
                    raise DownloadError(f"{what}: unzip {archive.name} failed (wrong password?): "
                                        f"{done.stderr.decode(errors='replace')[-300:]}")
            else:
                try:
                    zf.extractall(out, pwd=password.encode() if password else None)
                except RuntimeError as err:  # zipfile's "Bad password for file"
                    raise DownloadError(f"{what}: {archive.name}: {err}") from None
    else:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(out, filter="data")
        except tarfile.FilterError as err:
            raise DownloadError(f"{what}: {archive.name} has an unsafe member, refused: {err}") from None
    shutil.rmtree(out / "__MACOSX", ignore_errors=True)


def extract_archive(archive: Path, dest: Path, spec: Mapping[str, Any], what: str, expect: Sequence[str] = ()) -> None:
    """Unpack to a temp dir beside `dest`; keep `subdir` (or the one `file`, or unpack a nested `then` archive);
    check `expect`; rename onto `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    try:
        _unpack(archive, tmp, spec, what)
        root = tmp / spec["subdir"] if spec.get("subdir") else tmp
        if not root.is_dir():
            raise DownloadError(f"{what}: {archive.name} has no folder {spec['subdir']!r}; "
                                f"top level: {sorted(p.name for p in tmp.iterdir())}")
        if spec.get("then"):
            inner = spec["then"]
            member = root / inner["member"]
            if not member.is_file():
                raise DownloadError(f"{what}: nested archive {inner['member']!r} not found in {archive.name}")
            extract_archive(member, dest, inner, what, expect)
        elif spec.get("file"):
            member = root / spec["file"]
            if not member.is_file():
                raise DownloadError(f"{what}: {archive.name} has no file {spec['file']!r}")
            os.replace(member, dest)
        else:
            _replace_dir(root, dest, expect, what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- item kinds


class Job:
    """One item's download: spec, paths, lock, retry policy."""

    def __init__(self, spec: Mapping[str, Any], root: str | Path, lock: Lock, receipt: str | Path,
                 retry: Retry = Retry(), session: requests.Session | None = None):
        self.spec, self.name = dict(spec), spec["name"]
        self.root, self.lock, self.receipt = Path(root), lock, Path(receipt)
        self.dest = self.root / spec["dest"]
        self.work = self.receipt.parent / ".work" / self.name
        self.retry = retry
        self.session = session or requests.Session()

    def run(self) -> dict[str, Any]:
        kind = item_kind(self.spec)
        log.info("download %s (%s) → %s", self.name, kind, self.dest)
        self._claim_work()
        result = {"url": self._url, "hub": self._hub, "figshare_article": self._figshare}[kind]()
        receipt = {"item": self.name, "kind": kind, "dest": str(self.dest), **result}
        write_json(self.receipt, receipt)
        shutil.rmtree(self.work, ignore_errors=True)
        return receipt

    def _claim_work(self) -> None:
        """Partial files resume only under the same spec: a changed URL or selection must not continue old bytes. The
        stamp holds the spec redacted, so it keeps no credential and a re-signed URL still resumes."""
        stamp, current = self.work / "spec.json", redact(json.dumps(self.spec, sort_keys=True))
        if self.work.exists() and (not stamp.exists() or stamp.read_text() != current):
            if any(p.is_file() and p != stamp and p.stat().st_size for p in self.work.rglob("*")):
                log.info("%s: the item changed since the interrupted run; discarding its partial files", self.name)
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        stamp.write_text(current)

    def _fetch(self, url: str, target: Path, expected: Expected, headers: Mapping[str, str] | None = None,
               gated_page: str | None = None) -> dict[str, Any]:
        """Fetch unless `target` already holds verified bytes from an earlier, interrupted run."""
        if target.is_file() and (expected.sha256 or expected.md5):
            digests = Digests(want_md5=expected.md5 is not None)
            digests.feed_file(target)
            with contextlib.suppress(DownloadError):
                expected.check(digests.as_dict(), target.stat().st_size, str(target))
                return {**digests.as_dict(), "size": target.stat().st_size}
        return fetch(url, target, expected=expected, headers=headers, retry=self.retry, what=f"{self.name}: {target.name}",
                     gated_page=gated_page, session=self.session)

    # -- plain URL ---------------------------------------------------------------------------------------------

    def _url(self) -> dict[str, Any]:
        url, archive = self.spec["url"], self.spec.get("archive")  # `archive: {}` = unpack with defaults
        source = redact_url(url)
        filename = Path(self.spec["dest"]).name if archive is None else Path(urlsplit(url).path).name or "archive"
        locked = self.lock.entry(self.name, source)
        expected = _expected(self.spec, locked.get("files", {}).get(filename))
        got = self._fetch(url, self.work / filename, expected)
        if archive is not None:
            extract_archive(self.work / filename, self.dest, archive, self.name, self.spec.get("expect", ()))
        else:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.work / filename, self.dest)
        self.lock.record(self.name, {"source": source, "files": {filename: got}})
        return {"source": source, "files": {filename: got}}

    # -- Hugging Face ------------------------------------------------------------------------------------------

    def _hub(self) -> dict[str, Any]:
        from huggingface_hub import HfApi, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError

        repo, repo_type = self.spec["hub"], self.spec.get("repo_type", "model")
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        page = redact_url(f"{endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo}")  # shown, never fetched
        source = f"hf://{repo_type}s/{repo}"
        wanted = self.spec.get("revision") or "main"
        # A branch or tag resolves once; later fetches use the recorded commit until the config asks for another.
        locked = self.lock.entry(self.name, source)
        locked = locked if locked.get("requested") == wanted else {}
        revision = locked.get("revision") or wanted
        api = HfApi(endpoint=endpoint)
        try:
            info = _retrying(lambda: api.repo_info(repo, repo_type=repo_type, revision=revision, files_metadata=True),
                             f"{self.name}: {page}", self.retry)
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            if status in (401, 403):
                raise access_denied(status, f"{self.name}: {repo}", page) from None
            raise DownloadError(f"{self.name}: {repo} (revision {revision}): HTTP {status}: "
                                f"{redact(str(err).splitlines()[0])}") from None
        siblings = {s.rfilename: s for s in info.siblings or []}
        names = _matching(list(siblings), self.spec.get("files", ["*"]), f"{self.name}: {repo}@{info.sha}")
        urls = {n: hf_hub_url(repo, n, repo_type=repo_type, revision=info.sha, endpoint=endpoint) for n in names}
        pinned = {n: (siblings[n].lfs.sha256 if siblings[n].lfs else None) for n in names}
        expected = {n: Expected(pinned[n], None, siblings[n].size) if pinned[n]
                    else _expected({"size": siblings[n].size}, locked.get("files", {}).get(n)) for n in names}
        headers = {n: hub_headers(urls[n], endpoint) for n in names}
        selected: dict[str, int] = {}
        if self.spec.get("select"):
            from metalign.download.wds_subset import Shard, select_samples

            shards = [Shard(n, urls[n], expected[n], headers[n]) for n in names]
            tree, got, selected = select_samples(shards, self.spec["select"], self.work, self.receipt.parent,
                                                 self.retry, self.session, page, self.name)
        else:
            tree = self.work / "tree"
            got = {n: self._fetch(urls[n], tree / n, expected[n], headers[n], page) for n in names}
        _replace_dir(tree, self.dest, self.spec.get("expect", ()), self.name)
        self.lock.record(self.name, {"source": source, "requested": wanted, "revision": info.sha, "files": got})
        return {"source": source, "revision": info.sha, "files": got, **({"selected": selected} if selected else {})}

    # -- figshare ------------------------------------------------------------------------------------------------

    def _figshare(self) -> dict[str, Any]:
        api = self.spec.get("api", "https://api.figshare.com/v2").rstrip("/")
        article, version = self.spec["figshare_article"], self.spec.get("figshare_version")
        # An unversioned record is the article's latest version: pin `figshare_version` to freeze the file list.
        url = f"{api}/articles/{article}" + (f"/versions/{version}" if version else "")
        source = redact_url(url)
        record = _retrying(lambda: _get_json(self.session, url, self.retry.timeout_s), f"{self.name}: {source}",
                           self.retry)
        files = {f["name"]: f for f in record.get("files", [])}
        names = _matching(list(files), self.spec.get("files", ["*"]), f"{self.name}: figshare article {article}")
        tree = self.work / "tree"
        got = {}
        for name in names:
            md5 = files[name].get("computed_md5") or files[name].get("supplied_md5") or None
            got[name] = self._fetch(files[name]["download_url"], tree / name, Expected(None, md5, files[name].get("size")))
            if "archive" in self.spec and _strip_archive_suffix(name) != name:
                extract_archive(tree / name, tree / _strip_archive_suffix(name), self.spec["archive"], self.name)
                (tree / name).unlink()
        _replace_dir(tree, self.dest, self.spec.get("expect", ()), self.name)
        self.lock.record(self.name, {"source": source, "files": got})
        return {"source": source, "files": got}


def _get_json(session: requests.Session, url: str, timeout: float) -> dict[str, Any]:
    response = session.get(url, timeout=timeout)
    if response.status_code >= 500 or response.status_code == 429:
        raise requests.ConnectionError(f"HTTP {response.status_code}")
    if response.status_code >= 400:
        raise DownloadError(f"{redact_url(url)}: HTTP {response.status_code} {response.reason}")
    return response.json()


def _strip_archive_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(_TAR_SUFFIXES + (".zip",), key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_download_references(config: Mapping[str, Any]) -> None:
    """Fail before any job runs: every item has one source kind, `keys_from` names an item, and every `requires:`
    receipt under `<resources>/downloads/` names an item (a typo would otherwise wait for a file nobody makes)."""
    items = config.get("downloads", {}).get("items", {})
    receipts = Path(config["resources"]) / "downloads"
    for name, spec in items.items():
        item_kind({"name": name, **spec})
        for selection, entry in spec.get("select", {}).items():
            source = entry.get("keys_from", {}).get("item")
            if source is not None and source not in items:
                raise ValueError(f"downloads.items.{name}.select.{selection}.keys_from.item: unknown item {source!r}")
    for section in ("datasets", "backbones"):
        for name, entry in config.get(section, {}).items():
            for required in entry.get("requires", []):
                path = Path(required)
                if path.parent == receipts and path.suffix == ".json" and path.stem not in items:
                    raise ValueError(f"{section}.{name}.requires: {required} is the receipt of no download item; "
                                     f"defined: {sorted(items)}")


def download(spec: Mapping[str, Any], root: str | Path, lock: str | Path, receipt: str | Path,
             retry: Retry = Retry()) -> dict[str, Any]:
    """Fetch, verify and place one item; returns (and writes) its receipt."""
    return Job(spec, root, Lock(lock), receipt, retry).run()

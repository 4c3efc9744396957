"""One resumable, verified HTTP fetch: the single code path for plain URLs and Hugging Face files.

Why not pooch or `hf_hub_download`: neither resumes a broken 20 GB transfer with HTTP Range *and* verifies it against a
checksum we pin, and we want one place that decides retries, errors and what reaches a log. Bytes go to `<dest>.part`
(kept between runs, so a rerun resumes), are verified, then renamed onto `<dest>`: a failure never leaves a file that
looks complete. Secrets (tokens, signed query strings, user:password@) never reach a message, a log line, a receipt
or the lock file: every URL written anywhere goes through `redact_url`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar
from urllib.parse import unquote, urlsplit

import requests

from metalign.progress import progress

log = logging.getLogger(__name__)
T = TypeVar("T")

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN")
HIDDEN = "<redacted>"
# A URL in free text: scheme://…, or a bare /path?query as in an HTTP request line ("GET /f?X-Amz-Signature=… HTTP/1.1").
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+|(?<![^\s'\"])/[^\s'\"?]*\?[^\s'\"]*", re.IGNORECASE)
# Query parameters that carry credentials or change on every re-signing (S3/GCS/CloudFront signed URLs, API tokens).
_SECRET_PARAM = re.compile(r"x-(amz|goog)-.*|.*(token|secret|passw(or)?d|signature|credential|key).*|sig|auth.*|expires"
                           r"|policy", re.IGNORECASE)
_CHUNK = 1 << 20
_NET_CHUNK = 1 << 16  # small: bytes buffered in a read that breaks are lost, so a resume repeats at most this much


class DownloadError(RuntimeError):
    """A download failed for good (after retries, or at once where retrying cannot help); the message says why."""


class AccessDenied(DownloadError):
    """HTTP 401/403: gated or private; the message says where to accept the terms and that HF_TOKEN must be set."""


def secrets() -> list[str]:
    """Values that must never be printed: tokens from the environment and the locally saved Hugging Face token."""
    values = [os.environ.get(name, "") for name in SECRET_ENV]
    try:
        from huggingface_hub import get_token

        values.append(get_token() or "")
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
    return [v for v in values if len(v) >= 4]


def redact_url(url: str) -> str:
    """`url` with its userinfo and the values of secret parameters blanked; other parameters (`?download=1`) stay.
    A re-signed URL of the same file redacts to the same text, so the result also names a source in the lock file.
    Plain string surgery (no urlsplit): it never raises on a malformed URL and leaves the rest byte for byte."""
    head, _, fragment = url.partition("#")
    head, query_sep, query = head.partition("?")
    scheme, sep, rest = head.partition("://") if "://" in head else ("", "", head)
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = f"{HIDDEN}@{authority.rpartition('@')[2]}"
    out = f"{scheme}{sep}{authority}{slash}{path}{query_sep}{_redact_params(query)}"
    return f"{out}#{_redact_params(fragment)}" if "#" in url else out


def _redact_params(query: str) -> str:
    params = [p.partition("=") for p in query.split("&")] if query else []
    return "&".join(f"{name}={HIDDEN}" if _SECRET_PARAM.fullmatch(unquote(name)) else name + eq + value
                    for name, eq, value in params)


def redact(text: str) -> str:
    """Every URL in a message through `redact_url`, and any token value of the environment blanked."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), str(text))
    for secret in secrets():
        text = text.replace(secret, HIDDEN)
    return text


class _Redacting(logging.Filter):
    """urllib3 logs every request line, signed query and all, at DEBUG (`metalign -v`): blank it like our own text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_Redacting())


@dataclass(frozen=True)
class Retry:
    """Transient failures (connection drops, 5xx, 429) are retried with exponential backoff; 4xx fail at once."""

    attempts: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 120.0
    timeout_s: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))

    def delays(self) -> Iterator[float]:
        """0 before the first attempt, then the backoff before each retry."""
        for attempt in range(self.attempts):
            yield 0.0 if attempt == 0 else self.delay(attempt)

    def run(self, call: Callable[[], T], what: str, reset: Callable[[], None] | None = None,
            sleep: Callable[[float], None] = time.sleep) -> T:
        """The one retry loop of the download stage: `call` until it returns. A `Transient` failure is retried after
        the backoff (`reset` first restores any state the attempt changed); anything else propagates at once; after
        `attempts` transient failures a DownloadError names `what` and the last cause."""
        last = ""
        for delay in self.delays():
            if delay:
                log.warning("%s: %s; retrying in %.0f s", what, last, delay)
                sleep(delay)
            try:
                return call()
            except Transient as err:
                last = redact(str(err))
                if reset is not None:
                    reset()
        raise DownloadError(f"{what}: failed after {self.attempts} attempts: {last}")


@dataclass
class Digests:
    """sha256 always (it is what the lock records), md5 too when a source publishes only md5."""

    want_md5: bool = False
    sha256: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    md5: "hashlib._Hash | None" = None

    def __post_init__(self) -> None:
        self.md5 = hashlib.md5() if self.want_md5 else None

    def update(self, block: bytes) -> None:
        self.sha256.update(block)
        if self.md5 is not None:
            self.md5.update(block)

    def feed_file(self, path: Path) -> None:
        with open(path, "rb") as handle:
            while block := handle.read(_CHUNK):
                self.update(block)

    def as_dict(self) -> dict[str, str]:
        out = {"sha256": self.sha256.hexdigest()}
        if self.md5 is not None:
            out["md5"] = self.md5.hexdigest()
        return out


@dataclass(frozen=True)
class Expected:
    """What a finished file must match; any field may be unknown (then the lock records it after the first fetch)."""

    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    def check(self, got: Mapping[str, str], size: int, what: str) -> None:
        if self.size is not None and size != self.size:
            raise DownloadError(f"{what}: size mismatch: {size} bytes, expected {self.size}")
        for kind in ("sha256", "md5"):
            want = getattr(self, kind)
            if want and got.get(kind) != want.lower():
                raise DownloadError(f"{what}: {kind} mismatch: expected {want}, got {got.get(kind)}")


def hub_headers(url: str, endpoint: str) -> dict[str, str]:
    """The Hugging Face token goes only to the hub's own host; `requests` drops it on redirects to another host."""
    from huggingface_hub import get_token

    token = get_token()
    if token and urlsplit(url).hostname == urlsplit(endpoint).hostname:
        return {"Authorization": f"Bearer {token}"}
    return {}


def access_denied(status: int, what: str, page: str) -> AccessDenied:
    return AccessDenied(f"{what}: HTTP {status}: the repository is gated or private: accept its terms at {page} with "
                        f"your Hugging Face account, create a read token at https://huggingface.co/settings/tokens "
                        f"and export it as HF_TOKEN in the job environment")


class Transient(Exception):
    """An attempt failed in a way worth retrying (a dropped connection, 5xx, 429); the message says how."""


def fetch(url: str, dest: str | Path, *, expected: Expected = Expected(), headers: Mapping[str, str] | None = None,
          retry: Retry = Retry(), what: str | None = None, gated_page: str | None = None,
          session: requests.Session | None = None, sleep: Callable[[float], None] = time.sleep) -> dict[str, object]:
    """Download `url` onto `dest` (resuming `<dest>.part`), verify, rename; returns {sha256, [md5], size}."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    what = what or redact_url(url)
    session = session or requests.Session()
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _attempt(session, url, part, dict(headers or {}), retry.timeout_s, what, gated_page)
            break
        except Transient as err:
            # An attempt that added bytes is progress, not a failure: a long transfer over a flaky link resumes until
            # it is complete; `attempts` failures in a row without progress give up.
            failures = 0 if part.exists() and part.stat().st_size > before else failures + 1
            if failures >= retry.attempts:
                kept = part.exists() and part.stat().st_size > 0
                raise DownloadError(f"{what}: failed {retry.attempts} times without progress: {redact(str(err))}"
                                    + (f" (the partial file {part.name} is kept, a rerun resumes it)" if kept else
                                       " (no bytes were received)")) from None
            delay = retry.delay(max(failures, 1))
            log.warning("%s: %s; retrying in %.0f s", what, redact(str(err)), delay)
            sleep(delay)
    digests = Digests(want_md5=expected.md5 is not None)
    digests.feed_file(part)
    got, size = digests.as_dict(), part.stat().st_size
    try:
        expected.check(got, size, what)
    except DownloadError:
        part.unlink()
        raise
    os.replace(part, dest)
    log.info("%s: verified %d bytes, sha256 %s", what, size, got["sha256"])
    return {**got, "size": size}


def open_stream(session: requests.Session, url: str, headers: Mapping[str, str], timeout: float,
                what: str) -> requests.Response:
    """GET `url` streamed: a dropped connection or timeout is Transient; any other request error (a malformed URL, too
    many redirects) fails at once, its message redacted (requests quotes the URL, query and all)."""
    try:
        return session.get(url, headers=dict(headers), stream=True, timeout=timeout, allow_redirects=True)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise Transient(f"connection failed: {type(err).__name__}") from None
    except requests.RequestException as err:
        raise DownloadError(f"{what}: {type(err).__name__}: {redact(str(err))}") from None


def _attempt(session: requests.Session, url: str, part: Path, headers: dict[str, str], timeout: float, what: str,
             gated_page: str | None) -> None:
    """One request: append to `part` from its current size; raise Transient for what a retry may fix."""
    offset = part.stat().st_size if part.exists() else 0
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with open_stream(session, url, headers, timeout, what) as response:
        status = response.status_code
        if status in (401, 403):
            if gated_page:
                raise access_denied(status, what, gated_page)
            raise DownloadError(f"{what}: HTTP {status} {response.reason}: the source wants credentials or refuses "
                                f"this client")
        if status == 416 and offset:  # the part file already holds everything (or more): verify from scratch
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == offset:
                return
            part.unlink()
            raise Transient("stale partial file rejected by the server (HTTP 416)")
        if status == 429 or status >= 500:
            raise Transient(f"HTTP {status}")
        if status >= 400:
            raise DownloadError(f"{what}: HTTP {status} {response.reason} for {redact_url(response.url or url)}")
        if status == 200 and offset:
            log.info("%s: server ignored the Range request; starting over", what)
            offset = 0
        elif status == 206:
            start = response.headers.get("Content-Range", "bytes 0-").split()[-1].split("-")[0]
            if not start.isdigit() or int(start) != offset:
                part.unlink()
                raise Transient(f"server resumed at byte {start}, not {offset}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = 0
        with open(part, "ab" if offset else "wb") as handle, \
                progress(total=total, initial=offset, unit="B", unit_scale=True, desc=what) as bar:
            try:
                for block in response.iter_content(_NET_CHUNK):
                    handle.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                raise Transient(f"transfer broke after {offset + received} bytes: {type(err).__name__}") from None
        if total is not None and offset + received < total:
            raise Transient(f"truncated: {offset + received} of {total} bytes")

"""`download`: fetch, verify and place one `downloads.items` entry (the download rules call it once per item)."""

from __future__ import annotations

import argparse
import json

from metalign.download.http import DownloadError, Retry, redact
from metalign.download.items import download


def cmd_download(args: argparse.Namespace) -> None:
    try:
        download(json.loads(args.spec), args.root, args.lock, args.receipt,
                 Retry(attempts=args.attempts, timeout_s=args.timeout))
    except DownloadError as err:  # AccessDenied too: its page and instructions survive redaction
        raise ValueError(redact(str(err))) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("download", help="fetch, verify and place one `downloads.items` entry")
    parser.add_argument("--spec", required=True, help="the item's config entry as JSON (with its name)")
    parser.add_argument("--root", required=True, help="the resources root that `dest` is relative to")
    parser.add_argument("--lock", required=True, help="the lock file of recorded checksums and revisions")
    parser.add_argument("--receipt", required=True, help="completion marker written last (the rule's output)")
    parser.add_argument("--attempts", type=int, default=5, help="tries per request for transient failures")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a try fails")
    parser.set_defaults(func=cmd_download)

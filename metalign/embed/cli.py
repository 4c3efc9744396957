"""`extract`: embed a manifest's images with one backbone into one HDF5 file (resumable)."""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import torch

from metalign.embed.concat import concat_embeddings
from metalign.embed.extract import extract


def keep_freed_buffers() -> None:
    """Keep freed heap memory for reuse (glibc `mallopt`). By default glibc serves each conv activation (tens of MB)
    with a fresh mmap and unmaps it when freed, so every batch page-faults its buffers in again: half of a CPU
    extraction's time was the kernel's (EfficientNet-Lite0, 64 × 128², 1 thread: 1.05 → 0.41 s per batch). Numbers are
    unchanged; elsewhere than glibc this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def cmd_extract(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)  # the job's CPU allotment, not every core of the node
    keep_freed_buffers()
    entry = json.loads(args.backbone)
    extract(entry, args.manifest, args.out, batch_size=args.batch_size, num_workers=args.workers,
            device=args.device, amp=args.amp)


def cmd_embeddings_concat(args: argparse.Namespace) -> None:
    concat_embeddings(args.parts, args.manifests, args.out, args.expected_count)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("extract", help="embed a manifest's images with one backbone → HDF5")
    parser.add_argument("--backbone", required=True, help="the backbone's registry entry as JSON (with its name)")
    parser.add_argument("--manifest", required=True, help="the image set's manifest (CSV): the row order")
    parser.add_argument("--out", required=True, help="the embedding file (HDF5: features, ids, provenance)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (0: in process)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (validate first: docs/methods.md §1.3)")
    parser.set_defaults(func=cmd_extract)

    concat = subparsers.add_parser("embeddings-concat",
                                   help="feature file of an image set made of others: their rows, parts in order")
    concat.add_argument("--parts", type=Path, nargs="+", required=True, help="the parts' feature files, in order")
    concat.add_argument("--manifests", type=Path, nargs="+", required=True, help="the parts' manifests, same order")
    concat.add_argument("--out", type=Path, required=True, help="the combined feature file (HDF5)")
    concat.add_argument("--expected-count", type=int, help="images the combined set must hold")
    concat.set_defaults(func=cmd_embeddings_concat)

"""Run every `benchmarks/bench_*.py` (or those named on the command line); each prints one line:
`bench <name>: ours=… baseline=… ratio=…x goal=…`. Benchmarks that return scaling data (things: time vs triplets,
ridge: time vs voxels) also get results/bench/scaling_<name>.csv and .png (one pair each, so running one benchmark
never overwrites another's), and results/bench/lines_<benchmark>.txt its lines. results/bench/report.html gathers
every benchmark's latest lines, the machine and every scaling figure in results/bench/, so running one benchmark
updates its part of the page only. Each lines file starts with its own provenance (when, which commit, whether the
tree was dirty, how many CPUs), so a page that mixes runs says so; a benchmark that fails leaves a `FAILED` line in
place of its old lines (never stale numbers) and `make bench` exits non-zero after running the others."""

from __future__ import annotations

import base64
import csv
import datetime
import html
import importlib
import os
import pkgutil
import platform
import subprocess
import sys
import traceback
from pathlib import Path

from benchmarks.common import LINES

OUT = Path("results/bench")


def write_scaling(name: str, rows: list, out: Path = OUT) -> None:
    """CSV (size, ours_s, baseline_s, baseline_measured) and a log-log figure of ours and the baseline."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"scaling_{name}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["size", "ours_s", "baseline_s", "baseline_measured"])
        for row in rows:
            writer.writerow([*row[:3], row[3] if len(row) > 3 else False])
    fig = scaling_figure(name, rows)
    fig.savefig(out / f"scaling_{name}.png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def scaling_figure(name: str, rows: list):
    """Log-log seconds vs size: ours (measured) and the baseline, from (size, ours_s, baseline_s, …) rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"things": ("triplets", "THINGS odd-one-out (baseline: L-BFGS-B/joblib, scaled by trials)"),
              "ridge": ("voxels", "ridge, one fold (baseline: himalaya RidgeCV float32)")}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    size = [r[0] for r in rows]
    ax.loglog(size, [r[1] for r in rows], "o-", label="ours (measured)")
    ax.loglog(size, [r[2] for r in rows], "--", color="C1", label="baseline")
    for measured, face, label in ((True, "C1", "baseline, measured"), (False, "none", "baseline, extrapolated")):
        points = [r for r in rows if (len(r) > 3 and bool(r[3])) == measured]
        if points:
            ax.loglog([r[0] for r in points], [r[2] for r in points], "s", color="C1", markerfacecolor=face,
                      label=label)
    ax.set_xlabel(labels.get(name, (name,))[0])
    ax.set_ylabel(f"seconds ({os.cpu_count()} CPUs)")
    ax.set_title(labels.get(name, (name, name))[1], fontsize=9)
    ax.legend()
    fig.tight_layout()
    return fig


def provenance() -> str:
    """`# <time> · commit <sha>[+dirty] · <n> CPUs`: where a benchmark's lines come from."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    return (f"# {datetime.datetime.now().isoformat(timespec='seconds')} · commit {commit}{dirty} · "
            f"{os.cpu_count()} CPUs")


def write_lines(name: str, lines: list[str], out: Path = OUT) -> None:
    """results/bench/lines_<name>.txt: the provenance header, then the lines (atomic: temp file, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lines_{name}.txt"
    tmp = path.with_suffix(".txt.tmp")
    tmp.write_text("".join(f"{line}\n" for line in [provenance(), *lines]))
    tmp.replace(path)


def write_report(out: Path = OUT) -> Path:
    """One self-contained HTML page: when and where it ran, every benchmark's latest lines, and every scaling figure
    (inlined)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for path in sorted(out.glob("lines_*.txt"))
             for line in [f"## {path.stem.removeprefix('lines_')}", *path.read_text().splitlines()]]
    figures = "".join(
        f'<h2>{html.escape(png.stem.removeprefix("scaling_"))}</h2><img alt="{html.escape(png.name)}" '
        f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
        f"<p>data: {png.with_suffix('.csv').name}</p>" for png in sorted(out.glob("scaling_*.png")))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    page = (f"<!doctype html><meta charset='utf-8'><title>metalign benchmarks</title><h1>metalign benchmarks</h1>"
            f"<p>{datetime.datetime.now().isoformat(timespec='seconds')} · {html.escape(machine)}</p>"
            f"<pre>{html.escape(chr(10).join(lines))}</pre>{figures}")
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def main(names: list[str], out: Path = OUT) -> int:
    found = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    chosen = [n for n in found if not names or n.removeprefix("bench_") in names or n in names]
    failed = []
    for name in chosen:
        first = len(LINES)
        try:
            result = importlib.import_module(f"benchmarks.{name}").main()
        except Exception as error:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            LINES.append(f"bench {name.removeprefix('bench_')}: FAILED {type(error).__name__}: {error}")
            result = None
        write_lines(name.removeprefix("bench_"), LINES[first:], out)
        for bench, rows in (result or {}).items():
            write_scaling(bench, rows, out)
    print(f"benchmarks: {write_report(out)}")
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

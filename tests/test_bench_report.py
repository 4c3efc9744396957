"""`make bench` output: the scaling CSV and figure hold the measured values, the HTML report inlines them."""

from __future__ import annotations

import base64
import csv
import html
import re

from benchmarks.__main__ import scaling_figure, write_lines, write_report, write_scaling


def test_scaling_data_figure_and_report_hold_the_measured_values(tmp_path):
    rows = [(500_000, 0.92, 19.5, False), (1_000_000, 1.46, 38.7, True), (4_700_000, 7.45, 162.8, False)]
    write_scaling("things", rows, tmp_path)
    with open(tmp_path / "scaling_things.csv") as handle:
        read = [(int(r["size"]), float(r["ours_s"]), float(r["baseline_s"]), r["baseline_measured"] == "True")
                for r in csv.DictReader(handle)]
    assert read == rows
    ours, baseline = scaling_figure("things", rows).axes[0].lines[:2]
    assert list(ours.get_xdata()) == [r[0] for r in rows] and list(ours.get_ydata()) == [r[1] for r in rows]
    assert list(baseline.get_ydata()) == [r[2] for r in rows]
    assert ours.get_label() == "ours (measured)"
    marks = {line.get_label(): list(line.get_xdata()) for line in scaling_figure("things", rows).axes[0].lines[2:]}
    assert marks == {"baseline, measured": [1_000_000], "baseline, extrapolated": [500_000, 4_700_000]}

    line = "bench things_ooo_full_scale_seconds: ours=7.449s baseline=162.8s ratio=21.9x goal=<10s"
    write_lines("things", [line], tmp_path)
    write_lines("sampler", ["bench sampler_batch: ours=1s baseline=10s ratio=10x goal=>=10x"], tmp_path)
    write_lines("things", [line.replace("7.449", "6.001")], tmp_path)  # a rerun of one benchmark replaces its lines
    page = write_report(tmp_path).read_text()
    assert html.escape(line.replace("7.449", "6.001")) in page and "7.449" not in page
    assert "bench sampler_batch" in page and "CPUs" in page
    inlined = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(inlined) == (tmp_path / "scaling_things.png").read_bytes()


def test_a_failing_benchmark_replaces_its_old_lines_and_the_run_fails(tmp_path, monkeypatch, capsys):
    """A benchmark that raises leaves a FAILED line where its old numbers were (never stale numbers under a new
    date), the others still run, every lines file carries its provenance, and the run exits non-zero."""
    import types

    from benchmarks import __main__ as bench_main
    from benchmarks.common import report

    write_lines("sampler", ["bench sampler_batch: ours=1s baseline=10s ratio=10x goal=>=10x"], tmp_path)

    def broken() -> None:
        raise AssertionError("episodes invalid")

    def working() -> None:
        report("codes_fake", 1.0, 3.0, ">=2x")

    def fake(name):
        return types.SimpleNamespace(main=broken if name.endswith("sampler") else working)

    monkeypatch.setattr(bench_main.importlib, "import_module", fake)
    assert bench_main.main(["sampler", "codes"], tmp_path) == 1
    sampler = (tmp_path / "lines_sampler.txt").read_text().splitlines()
    assert sampler[1:] == ["bench sampler: FAILED AssertionError: episodes invalid"]
    codes = (tmp_path / "lines_codes.txt").read_text().splitlines()
    assert codes[1] == "bench codes_fake: ours=1s baseline=3s ratio=3x goal=>=2x"
    for header in (sampler[0], codes[0]):
        assert re.fullmatch(r"# \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d · commit \S+ · \d+ CPUs", header), header
    page = (tmp_path / "report.html").read_text()
    assert "FAILED AssertionError" in page and "ratio=10x" not in page
    assert "benchmarks failed: bench_sampler" in capsys.readouterr().err

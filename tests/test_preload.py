"""The preload server (metalign/preload.py): jobs forked from it write what a fresh interpreter writes, keep their
exit status, log and signals, and fall back to their own process when the server is absent or the environment
differs in what a library reads at import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

BIG = {"n_concepts": 400, "images_per_concept": 20, "image_size": 96, "coco_train": 4000}  # a job that runs for a while
SPEC = {"seed": 7, "n_concepts": 8, "images_per_concept": 2, "image_size": 32, "n_participants": 4,
        "triplets_per_participant": 20, "repeat_fraction": 0.1, "temperature": 0.15, "coco_train": 12, "coco_val": 6}


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """From /proc/<pid>/stat: the process state (R, S, Z …) and its parent's pid; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _running(pid: int) -> bool:
    found = _state_and_parent(pid)
    return found is not None and found[0] != "Z"


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (found := _state_and_parent(int(p.name))) and found[0] != "Z" and found[1] == pid]


def _serve(path: str) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}
    process = subprocess.Popen([sys.executable, "-m", "metalign.preload", "--serve", path, str(os.getpid())],
                               cwd=REPO, env=env)
    process.env = env  # what jobs of this server start from: per-test variables (NILEARN_DATA …) would differ
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert process.poll() is None and time.monotonic() < deadline, "the preload server did not start"
        time.sleep(0.1)
    return process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("preload") / "jobs.sock")
    process = _serve(path)
    yield path, process
    process.terminate()
    process.wait(timeout=30)


def _job(args: list[str], log: Path, socket_path: str | None, base: dict | None = None, **env) -> subprocess.Popen:
    environ = {key: value for key, value in (base or os.environ).items() if key != "METALIGN_PRELOAD_SOCKET"}
    if socket_path:
        environ["METALIGN_PRELOAD_SOCKET"] = socket_path
    with open(log, "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "metalign", *args], cwd=REPO, stderr=stderr,
                                env={**environ, **env})


def _world(out: Path, log: Path, socket_path: str | None, base: dict | None = None, spec: dict = SPEC,
           **env) -> subprocess.Popen:
    return _job(["demo-world", "--spec", json.dumps(spec), "--out", str(out)], log, socket_path, base, **env)


def test_a_forked_job_writes_what_a_fresh_process_writes(server, tmp_path):
    path, process = server
    forked = _world(tmp_path / "forked", tmp_path / "forked.log", path, process.env, OMP_NUM_THREADS="1")
    fresh = _world(tmp_path / "fresh", tmp_path / "fresh.log", None, process.env, OMP_NUM_THREADS="1")
    assert forked.wait(timeout=300) == 0 and fresh.wait(timeout=300) == 0, (tmp_path / "forked.log").read_text()
    assert "running in this process" not in (tmp_path / "forked.log").read_text()  # so the server ran it
    files = sorted(p.relative_to(tmp_path / "fresh") for p in (tmp_path / "fresh").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "forked") for p in (tmp_path / "forked").rglob("*")
                                     if p.is_file())
    for name in files:
        if name.name != "world.json":  # it records its own path; everything else, the planted truth too, is equal
            assert (tmp_path / "forked" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_exit_status_and_error_reach_the_job_log(server, tmp_path):
    path, process = server
    job = _job(["encode", "--ckpt", str(tmp_path / "missing.pt"), "--features", "x.h5", "--out", "y.h5"],
               tmp_path / "job.log", path, process.env)
    assert job.wait(timeout=60) == 2
    log = (tmp_path / "job.log").read_text()
    assert "metalign encode: error:" in log and "missing.pt" in log and "running in this process" not in log


def test_an_environment_read_at_import_runs_in_its_own_process(server, tmp_path):
    path, process = server
    job = _job(["encode", "--ckpt", str(tmp_path / "missing.pt"), "--features", "x.h5", "--out", "y.h5"],
               tmp_path / "job.log", path, process.env,
               HF_HUB_OFFLINE="0" if process.env.get("HF_HUB_OFFLINE") == "1" else "1")
    assert job.wait(timeout=120) == 2
    log = (tmp_path / "job.log").read_text()
    assert "running in this process (its environment differs from the preload server's in HF_HUB_OFFLINE)" in log
    assert "missing.pt" in log


def test_shell_bookkeeping_is_not_a_different_environment():
    """An activated venv exports PS1, which a job's non-interactive bash drops: that alone must not send every job to
    its own interpreter; a variable read at import still does."""
    from metalign.preload import _env_mismatch

    server = {"PS1": "(.venv) $ ", "HOME": "/home/u", "HF_HUB_OFFLINE": "1", "SHLVL": "1"}
    job = {"HOME": "/home/u", "HF_HUB_OFFLINE": "1", "SHLVL": "3"}
    assert _env_mismatch(server, {}, job) == []
    assert _env_mismatch(server, {}, {**job, "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1"}) == ["HF_HUB_OFFLINE"]


def test_no_server_means_a_plain_process(tmp_path):
    job = _job(["encode", "--ckpt", str(tmp_path / "missing.pt"), "--features", "x.h5", "--out", "y.h5"],
               tmp_path / "job.log", str(tmp_path / "absent.sock"))
    assert job.wait(timeout=120) == 2 and "missing.pt" in (tmp_path / "job.log").read_text()


def test_sigterm_to_the_job_ends_its_forked_child(server, tmp_path):
    path, process = server
    job = _world(tmp_path / "big", tmp_path / "big.log", path, process.env, spec={**SPEC, **BIG})
    deadline = time.monotonic() + 60
    while not _children(process.pid):
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "big.log").read_text()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) == -signal.SIGTERM
    deadline = time.monotonic() + 30
    while _children(process.pid):
        assert time.monotonic() < deadline, "the forked child outlived its job"
        time.sleep(0.1)


def test_a_killed_server_takes_its_jobs_with_it(tmp_path):
    path = str(tmp_path / "jobs.sock")
    process = _serve(path)
    job = _world(tmp_path / "big", tmp_path / "big.log", path, process.env, spec={**SPEC, **BIG})
    deadline = time.monotonic() + 60
    # the child's first log line comes after the server told the client its pid
    while not ((children := _children(process.pid)) and (tmp_path / "big.log").stat().st_size):
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "big.log").read_text()
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=30)
    assert job.wait(timeout=30) == 1
    assert "the server stopped before job" in (tmp_path / "big.log").read_text()
    deadline = time.monotonic() + 30
    while any(map(_running, children)):
        assert time.monotonic() < deadline, "a job of the killed server kept running"
        time.sleep(0.1)


def test_the_server_keeps_libraries_and_forgets_metalign():
    code = ("import sys; from metalign.preload import preload; preload(); "
            "print(sorted(m for m in sys.modules if m.startswith('metalign.') and m != 'metalign.preload'), "
            "all(m in sys.modules for m in ('torch', 'pandas', 'sklearn', 'h5py')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"


def test_children_load_cached_bytecode_and_still_see_edits(tmp_path):
    """After `cache_bytecode`, importing a stage compiles no metalign source and loads its bytecode from the private
    prefix (not the source tree's __pycache__), and a module edited after caching is compiled afresh."""
    code = f"""
import importlib, sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from metalign.preload import cache_bytecode
cache_bytecode({str(tmp_path / "pyc")!r})
compiled = []
original = SourceFileLoader.source_to_code
def counted(self, data, path, **kw):
    compiled.append(str(path))
    return original(self, data, path, **kw)
SourceFileLoader.source_to_code = counted
import metalign.train.cli
stages = [m for name, m in sys.modules.items() if name.startswith("metalign.train.")]
assert stages and all(Path(m.__cached__).is_relative_to({str(tmp_path / "pyc")!r}) for m in stages)  # not the tree
assert not [p for p in compiled if "metalign" in p], compiled
sys.path.insert(0, {str(tmp_path)!r})
(Path({str(tmp_path)!r}) / "edited.py").write_text("X = 1\\n")
assert importlib.import_module("edited").X == 1
del sys.modules["edited"]
(Path({str(tmp_path)!r}) / "edited.py").write_text("X = 22\\n")
assert importlib.import_module("edited").X == 22
print("ok")
"""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env,
                          check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_the_wrapper_runs_its_command_and_returns_its_status(tmp_path):
    done = subprocess.run([sys.executable, "-m", "metalign.preload", sys.executable, "-c",
                           "import os, sys; print(os.environ['METALIGN_PRELOAD_SOCKET']); sys.exit(3)"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and done.stdout.strip().endswith("jobs.sock"), done.stderr
    assert not Path(done.stdout.strip()).parent.exists()  # the server and its socket are gone with the command

"""Preloaded job starts: one server imports the heavy libraries once and forks a child per `python -m metalign` job.

Most demo jobs are a few seconds of work behind 1.5–4.5 s of imports (torch, pandas, scikit-learn, h5py, timm …).
`python -m metalign.preload <command …>` runs the command (usually `snakemake …`) with such a server beside it: every
job launched under it that finds the server hands over its argv, working directory, environment and stdin/stdout/
stderr, and the server forks a child that runs the job with those, so the child starts with the libraries already in
memory. The server holds third-party modules only: it imports the stage CLIs once to learn what they need, then
forgets every `metalign` module, so each child runs the code on disk now (edits between jobs take effect, as the
code hashes of the rules expect). Fork safety: the server is one thread that never computes (no BLAS or OpenMP pool
has started), and each child sets its own thread limits from the job's `OMP_NUM_THREADS`.

A job runs in its own process as usual when there is no server (SLURM, a plain `snakemake`), when the server cannot
be reached, or when its environment differs from the server's in anything that a library reads at import time
(`ENV_PER_JOB` lists what may differ: thread counts, PATH, temp dirs, shell bookkeeping); torchrun ranks differ in
RANK/WORLD_SIZE and so run in their own processes. The job's exit status, its log (stderr is the same open file) and
signals (SIGINT/SIGTERM/SIGHUP are forwarded; a vanished client ends its child, a killed server its children) behave
as for a plain process.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

SOCKET_ENV = "METALIGN_PRELOAD_SOCKET"
# What a snakemake job's environment may add or change relative to the server's: per-job thread counts, the PATH that
# common.smk prepends, temp dirs, and what a shell sets for itself (a job's non-interactive bash drops the PS1 that an
# activated venv exports).
ENV_PER_JOB = frozenset({
    "OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS", "PATH", "TMPDIR", "TMP", "TEMP", "TEMPDIR", "PWD", "OLDPWD", "SHLVL", "_", "PS1", "PS2",
    SOCKET_ENV,
})
# Imported inside functions by the stages (backbones, brain volumes, CLIP), so importing the CLIs does not load them.
LAZY_IMPORTS = ("timm", "transformers", "transformers.models.vit", "torchvision.models", "open_clip", "nibabel",
                "nilearn", "nilearn.plotting", "huggingface_hub", "matplotlib.pyplot", "himalaya.ridge")
_HEADER = struct.Struct("!Q")
REQUEST_TIMEOUT_S = 10.0


def _env_mismatch(launched: dict[str, str], by_imports: dict[str, str], job: dict[str, str]) -> list[str]:
    """Variables set differently in the job than in the server, other than those a job may change and those that the
    server's own imports set to the job's value (snakemake imports torch's OpenMP settings too)."""
    return sorted(k for k in set(launched) | set(job) if k not in ENV_PER_JOB and launched.get(k) != job.get(k)
                  and (k not in by_imports or by_imports[k] != job.get(k)))


# ---------------------------------------------------------------- client (every `python -m metalign` job)


def submit(path: str, argv: list[str]) -> int | None:
    """Run `metalign argv` in a child of the server at `path`; its exit status, or None to run in this process."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:
        client.close()
        return None
    with client:
        payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        try:
            socket.send_fds(client, [_HEADER.pack(len(payload)) + payload], [0, 1, 2])
        except OSError:  # a closed stdin/stdout/stderr: nothing to hand over
            return None
        reply = _read_message(client)
        if reply is None or "pid" not in reply:
            if reply and reply.get("refused"):
                print(f"metalign preload: running in this process ({reply['refused']})", file=sys.stderr)
            return None
        pid = reply["pid"]
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: _signal(pid, signum))
        done = _read_message(client)
    if done is None:
        print(f"metalign preload: the server stopped before job {pid} ended", file=sys.stderr)
        return 1
    if done["rc"] < 0:  # ended by a signal: end the same way, so the caller sees what a plain process would show
        signal.signal(-done["rc"], signal.SIG_DFL)
        os.kill(os.getpid(), -done["rc"])
    return done["rc"]


def _read_message(conn: socket.socket) -> dict | None:
    """One length-prefixed JSON message, or None at end of stream."""
    head = _recv_exact(conn, _HEADER.size)
    if head is None:
        return None
    body = _recv_exact(conn, _HEADER.unpack(head)[0])
    return None if body is None else json.loads(body)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        try:
            chunk = conn.recv(left)
        except InterruptedError:
            continue
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _send_message(conn: socket.socket, message: dict) -> None:
    body = json.dumps(message).encode()
    try:
        conn.sendall(_HEADER.pack(len(body)) + body)
    except OSError:
        pass  # the client is gone; its child was (or will be) ended


# ---------------------------------------------------------------- server


def preload() -> None:
    """Import what the stage CLIs import at module level, plus `LAZY_IMPORTS`, then forget every metalign module."""
    before = set(sys.modules)
    from metalign.cli import STAGES

    for name in [*STAGES, *LAZY_IMPORTS]:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional library (open_clip) that this environment lacks
    for name in [m for m in sys.modules if m == "metalign" or m.startswith("metalign.")]:
        if name not in before:
            del sys.modules[name]


def serve(path: str, parent: int) -> None:
    """Accept jobs on the Unix socket `path` until the process `parent` is gone (one thread: safe to fork)."""
    launched = dict(os.environ)
    preload()
    cache_bytecode(str(Path(path).parent / "bytecode"))
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child could not use the GPU: serve nothing
        print("metalign preload: CUDA was initialised while importing; jobs run in their own processes",
              file=sys.stderr)
        return
    # what the libraries set for themselves at import (KMP_INIT_AT_FORK …): a fresh process would have them too
    by_imports = {k: v for k, v in os.environ.items() if launched.get(k) != v}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.replace(path + ".tmp", path)  # clients see the socket only once it accepts
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    # a job's end wakes the loop at once (its client, and so its Snakemake slot, waits for the reply)
    ended, wake = socket.socketpair()
    ended.setblocking(False)
    wake.setblocking(False)
    signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector.register(ended, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # each job's pid → its client's connection (selector data: the pid)
    while os.getppid() == parent:
        for key, _ in selector.select(timeout=0.1):
            if key.fileobj is ended:
                _drain(ended)
            elif key.fileobj is listener:
                conn, _ = listener.accept()
                pid = _start(conn, listener, launched, by_imports)
                if pid is None:
                    conn.close()
                    continue
                children[pid] = conn
                selector.register(conn, selectors.EVENT_READ, data=pid)
            elif not _peek_open(key.fileobj):  # the client vanished (SIGKILL): end its job too
                _signal(key.data, signal.SIGTERM)
                selector.unregister(key.fileobj)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            _send_message(conn, {"rc": os.waitstatus_to_exitcode(status)})
            try:
                selector.unregister(conn)
            except KeyError:
                pass
            conn.close()
    for pid in children:
        _signal(pid, signal.SIGTERM)


def cache_bytecode(prefix: str) -> None:
    """Compile the metalign sources once, into `prefix`, for every child to load instead of compiling its stage's
    modules again (≈70 ms a job where PYTHONDONTWRITEBYTECODE is set). The prefix (sys.pycache_prefix) is private to
    this server and goes with it; the source tree and the libraries' own caches are untouched. The import system still
    checks each cached file against its source (mtime and size), so an edit between jobs is compiled afresh."""
    import compileall

    sys.pycache_prefix, sys.dont_write_bytecode = prefix, False
    compileall.compile_dir(str(Path(__file__).parent), quiet=2)


def _drain(conn: socket.socket) -> None:
    try:
        while conn.recv(4096):
            pass
    except BlockingIOError:
        pass


def _peek_open(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _start(conn: socket.socket, listener: socket.socket, launched: dict[str, str],
           by_imports: dict[str, str]) -> int | None:
    """Read one job request and fork its child; the child's pid (sent to the client), or None if refused. `launched`
    is the server's environment before its imports, `by_imports` what those imports set."""
    conn.settimeout(REQUEST_TIMEOUT_S)  # a client killed between connect and send must not stall the server
    fds: list[int] = []
    try:
        data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
        size = _HEADER.unpack(data[:_HEADER.size])[0] if len(data) >= _HEADER.size else -1
        body = data[_HEADER.size:]
        rest = _recv_exact(conn, size - len(body)) if size > len(body) else b""
        request = json.loads(body + rest) if size >= 0 and rest is not None and len(fds) == 3 else None
    except (OSError, ValueError):
        request = None
    conn.settimeout(None)
    if request is None:
        for fd in fds:
            os.close(fd)
        return None
    differs = _env_mismatch(launched, by_imports, request["env"])
    if differs:
        for fd in fds:
            os.close(fd)
        _send_message(conn, {"refused": "its environment differs from the preload server's in " + ", ".join(differs)})
        return None
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn.close()
        request["env"] = {**request["env"], **by_imports}
        _run_child(request, fds, server)
    for fd in fds:
        os.close(fd)
    _send_message(conn, {"pid": pid})
    return pid


def _end_with_server(server: int) -> None:
    """Ask Linux to send SIGTERM when the server dies, so a killed server leaves no job writing files behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != server:  # the server died before prctl took effect
        os._exit(128 + signal.SIGTERM)


def _run_child(request: dict, fds: list[int], server: int) -> None:
    """In the forked child: become the job (stdio, cwd, environment, threads, signals), run it, exit with its status."""
    rc = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _end_with_server(server)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _limit_threads(os.environ.get("OMP_NUM_THREADS"))
        sys.argv = ["metalign", *request["argv"]]
        from metalign.cli import main

        rc = main(request["argv"], freeze_imports=True)
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - a job's crash is reported in its log, as a plain process would
        import traceback

        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def _limit_threads(value: str | None) -> None:
    """The job's thread allotment for torch and the BLAS pools (their env variables were read at server start)."""
    if not value or not value.isdigit():
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(int(value))
    threadpool_limits(int(value))


# ---------------------------------------------------------------- wrapper: `python -m metalign.preload <command …>`


def run(command: list[str]) -> int:
    """Run `command` with a preload server beside it; the server ends with the command. Linux only: macOS forbids
    forking a process whose system frameworks have started (Accelerate, the Objective-C runtime), so elsewhere the
    command runs as it is and every job starts its own interpreter."""
    if sys.platform != "linux":
        return subprocess.call(command)
    with tempfile.TemporaryDirectory(prefix="metalign-preload-") as tmp:
        path = str(Path(tmp) / "jobs.sock")
        server = subprocess.Popen([sys.executable, "-m", "metalign.preload", "--serve", path, str(os.getpid())],
                                  stdin=subprocess.DEVNULL)
        try:
            env = {**os.environ, SOCKET_ENV: path}
            return subprocess.call(command, env=env)
        except KeyboardInterrupt:
            return 130
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve(argv[1], int(argv[2]))
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m metalign.preload <command …>   (e.g. snakemake --cores 2 all)\n\n" + __doc__)
        return 0 if argv else 2
    return run(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

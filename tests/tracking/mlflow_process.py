"""Running an ``mlflow`` command-line server (``mlflow server``, ``mlflow models serve``) for a test.

The server gets a free loopback port and its own process group, which is stopped as a whole (SIGTERM, then
SIGKILL): a plain kill of the parent leaves workers behind. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback port nothing listens on (the OS picks it; it stays free until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_process(args: Callable[[int], list[str]], probe: str, root: Path, env: Mapping[str, str],
                   start_timeout_s: float, log_name: str = "server.log") -> Iterator[str]:
    """Run ``mlflow <args(port)>`` in ``root`` until the block ends; yields ``http://127.0.0.1:<port>``.

    Args:
        args: the port -> the command's arguments after ``mlflow``.
        probe: the path that answers 200 once the server is up (``/health``, ``/ping``).
        root: working directory; the server's output goes to ``root/<log_name>``.
        env: the server's environment.
        start_timeout_s: fail the test (with the log's tail) if it does not answer by then.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / log_name
    argv = args(port)
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli) if mlflow_cli.exists() else sys.executable,
           *([] if mlflow_cli.exists() else ["-m", "mlflow"]), *argv]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _answers(url + probe):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow {' '.join(argv[:2])}... did not start (rc={proc.poll()}):\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the whole process group the server leads (start_new_session=True)."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:  # no worker of the group may outlive its leader
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)

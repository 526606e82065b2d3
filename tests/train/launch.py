"""Launching training under torchrun from the tests: a free port, and a run whose workers end with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], *, timeout: int = 300,
             env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC ARGS`` on 127.0.0.1, one OpenMP thread a worker. Its own process group:
    if the run hangs, the timeout ends torchrun's workers too, not only torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

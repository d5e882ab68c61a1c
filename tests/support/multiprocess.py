"""How the multi-process tests start their worker scripts, and how every worker process ends.

Tests call :func:`run_worker`; worker scripts end every process (each rank, and the script that launched
them) with :func:`end_process`. Both are here so that every multi-process test does it the same way.

Why workers end with ``os._exit``: a process group that something still references (a DDP wrapper, FSDP2's
DeviceMesh, a model in a reference cycle) outlives ``destroy_process_group``, so gloo's worker threads are
still alive when the interpreter shuts down. A worker thread that then drops the last reference to a tensor
has to take the GIL of an interpreter being torn down; the thread is ended from inside C++ code, and the
process aborts with ``terminate called without an active exception`` (SIGABRT). Whether a thread is that late
depends on scheduling, hence about one run in five on a busy machine. So each process waits until every rank
is past its last collective (barrier), frees what holds the group while the interpreter is whole, destroys
the group, and leaves without interpreter shutdown, its results already on disk.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
# Generous on purpose: on a busy 2-core machine, starting and importing two or three Python processes with torch
# and Lightning takes minutes. A hang still ends the test, with the workers' output.
TIMEOUT_S = 900
# Variables a launcher would take as "this is rank N of an existing job" (pytest run under torchrun, say).
_JOB_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_worker(script: Path, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``python script *args`` as a fresh job and insist that it and every process it started exited with 0."""
    env = {name: value for name, value in os.environ.items() if name not in _JOB_VARIABLES}
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONFAULTHANDLER"] = "1"  # a crash prints every thread's Python stack
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, f"{script.name} {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def launched_children(trainer: Any) -> list[subprocess.Popen[bytes]]:
    """The processes Lightning's ``strategy="ddp"`` launcher started from this one (none on other ranks)."""
    return [p for p in getattr(trainer.strategy.launcher, "procs", []) if isinstance(p, subprocess.Popen)]


def end_process(children: Iterable[subprocess.Popen[bytes]] = (), exitcode: int = 0) -> NoReturn:
    """End a worker process after its last collective; never returns.

    Args:
        children: processes this one started (Lightning's ``trainer.strategy.launcher.procs`` on rank 0 of a
            ``strategy="ddp"`` run): waited for, and a failure of any of them is this process's failure.
        exitcode: the exit status when the children succeeded.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank is past its last collective: nothing is in flight when the group goes
        gc.collect()  # free reference cycles that hold the group (FSDP2's module state) while Python is whole
        dist.destroy_process_group()
    for child in children:
        status = child.wait()
        if status != 0:
            print(f"worker process {child.args} exited with {status}", file=sys.stderr)
            exitcode = exitcode or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exitcode)

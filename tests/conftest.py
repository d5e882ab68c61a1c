"""Shared fixtures; puts tests/ on the path so that test modules import their helpers from ``support``.

Test modules never import each other: what two of them share lives in tests/support/.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


@pytest.fixture(autouse=True)
def restore_global_state() -> Iterator[None]:
    """Undo what a test leaves behind in this process that later tests could depend on (no test reads it today).

    seed_everything (LightningCLI, ``lightning-gns sweep``) sets PL_GLOBAL_SEED, which every later in-process DDP
    setup re-seeds from (``reset_seed``); the digits sweep factory sets torch's threads to 1 and Lightning's DDP
    launcher sets them to cores / processes; the sweep command quiets Lightning's loggers and its factory file
    puts example_projects/ on sys.path.
    """
    env = dict(os.environ)
    threads = torch.get_num_threads()
    path = list(sys.path)
    levels = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    yield
    if os.environ != env:
        os.environ.clear()
        os.environ.update(env)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    sys.path[:] = path
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def restore_process_state() -> Iterator[None]:
    """DDP with one device initializes a gloo group in this process and sets MASTER_ADDR etc.: undo both."""
    env = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)

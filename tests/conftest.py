"""Shared fixtures; puts tests/ on the path so that test modules import their helpers from ``support``.

Test modules never import each other: what two of them share lives in tests/support/.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


@pytest.fixture
def restore_process_state() -> Iterator[None]:
    """DDP with one device initializes a gloo group in this process and sets MASTER_ADDR etc.: undo both."""
    env = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)

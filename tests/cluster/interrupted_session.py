"""Collected only when named on the command line: the test session that
tests/cluster/test_interrupt.py runs in a child pytest and interrupts.

Its one test takes the real `running` fixture (a local cluster, module-scoped, from
tests/cluster/conftest.py, under the repository's tests/conftest.py), announces that it runs,
and sleeps until the parent sends SIGTERM or SIGINT; the fixture's finalizer must then stop the
cluster.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from clusterkit import STARTED_ENV

pytestmark = pytest.mark.skipif(
    STARTED_ENV not in os.environ, reason="run by tests/cluster/test_interrupt.py only"
)


def test_sleeps_until_interrupted(running):
    Path(os.environ[STARTED_ENV]).write_text(str(os.getpid()))
    time.sleep(600)

from __future__ import annotations

import pytest

from tests.server.engines import Loop


@pytest.fixture(scope="module")
def loop():
    """One event loop in a thread per module: the module's engines live on it."""
    lp = Loop()
    yield lp
    lp.close()

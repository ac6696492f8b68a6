"""
The unit tier's timeout: 60 s a test (the tier takes seconds), by pytest-timeout's thread
method, which dumps every stack and ends the run.  The default signal method raises in the
test's thread, where a Deferred or ``inlineCallbacks`` can swallow the exception and let a
loop on a fake clock spin on: a hanging test must fail, not hang.  The unit tier starts no
process, so ending the run leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

UNIT = Path(__file__).parent
TIMEOUT = pytest.mark.timeout(60, method="thread")


def pytest_collection_modifyitems(items):
    for item in items:
        if UNIT in Path(item.path).parents:
            item.add_marker(TIMEOUT)

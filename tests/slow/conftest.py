"""This tier runs the installed package: it must be this checkout's (``tests.support.installed``)."""

import pytest

from tests.support.installed import require_this_checkout


@pytest.fixture(autouse=True, scope="session")
def _installed_is_this_checkout():
    require_this_checkout()

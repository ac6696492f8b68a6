"""
Log output.  Text is twistd's own format, for people at a terminal; JSON is
one object per line on standard output, for log collectors: ``time``,
``level``, ``namespace``, ``message`` (the text line), then the event's named
fields (``method``, ``path``, ``status``, ``outcome``, ``ms``, ``cache``,
``old``, ``new``...), so nobody has to parse the message.

Named fields carry nothing secret: the code never logs the license key,
credentials headers, proxy passwords or query strings.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Optional

from twisted.logger import FileLogObserver, formatEvent

from .status import rfc3339

TEXT = "text"
JSON = "json"
FORMATS = (TEXT, JSON)

_SCALARS = (str, int, float, bool, type(None))


def json_line(event: dict) -> str:
    """One event as one line of JSON."""
    level = event.get("log_level")
    record = {
        "time": rfc3339(event.get("log_time")),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and isinstance(value, _SCALARS):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, separators=(",", ":"), default=str) + "\n"


def json_observer(out: Optional[IO[str]] = None) -> FileLogObserver:
    """
    JSON lines on ``out`` (standard output).  Also a twistd ``--logger``
    factory: ``twistd --logger license_proxy.logformat.json_observer ...``.
    """
    return FileLogObserver(sys.stdout if out is None else out, json_line)

"""JSON log lines: one object per line, the event's named fields, and --log-format."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger
from twisted.python import usage

from license_proxy import tap
from license_proxy.logformat import json_observer


def emitted(emit) -> list[dict]:
    out = io.StringIO()
    log = Logger(namespace="license_proxy.test", observer=json_observer(out))
    emit(log)
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_named_fields_beside_the_message():
    (line,) = emitted(
        lambda log: log.warn("relay {method} /{path} -> {status}", method="GET", path="v1/x", status=200)
    )
    assert line["message"] == "relay GET /v1/x -> 200"
    assert (line["level"], line["namespace"]) == ("warn", "license_proxy.test")
    assert (line["method"], line["path"], line["status"]) == ("GET", "v1/x", 200)
    assert line["time"].endswith("Z")


def test_a_failure_carries_its_traceback_and_objects_are_left_out():
    def emit(log):
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("flush failed for {obj}", obj=object())

    (line,) = emitted(emit)
    assert line["level"] == "critical"
    assert "ZeroDivisionError" in line["traceback"]
    assert "obj" not in line and line["message"].startswith("flush failed for <object")


def test_log_format_option_overrides_the_config(tmp_path):
    path = tmp_path / "license-proxy.toml"
    path.write_text('[log]\nformat = "text"\n[license]\nkey = "k"\n')
    options = tap.Options()
    options.parseOptions(["--config", str(path), "--log-format", "json"])
    assert options.loaded.log_format == "json"
    with pytest.raises(usage.UsageError, match="--log-format: expected text or json"):
        tap.Options().parseOptions(["--config", str(path), "--log-format", "yaml"])

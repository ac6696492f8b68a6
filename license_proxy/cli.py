"""
``license-proxy`` (also installed as ``hermes``, the name the vendor's Helm chart runs): the
vendor's command-line shape over the reference way to run the proxy, ``twistd license-proxy``.

    license-proxy [-v|-vv|-q] serve [FILE]    run in the foreground, as twistd --nodaemon does
    license-proxy [-v|-vv|-q] check [FILE]    validate FILE and the files it names; exit 0 or 2

``serve`` builds twistd's command line and runs twistd in this process, so the process model,
signals, exit statuses and logs are twistd's own.  Without FILE, the built-in defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Mapping, Optional

from . import preflight
from .config import ConfigError

USAGE_ERROR = 2


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    level = _level(args.verbose, args.quiet)
    if args.command == "check":
        return check(args.file, os.environ)
    serve(args.file, level)
    return 0  # a clean stop, as the twistd script's (exit 1 and 2 leave from inside)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) or "license-proxy",
        description="Relay licensing check-ins to the license server, with a trust cache.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log debug events too (-vv: the same; there is no level below debug)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help in (
        ("serve", "run the proxy in the foreground (twistd license-proxy --config FILE)"),
        ("check", "validate FILE and the certificate, key and CA files it names; exit 0 or 2"),
    ):
        command = commands.add_parser(name, help=help)
        command.add_argument(
            "file", nargs="?", metavar="FILE",
            help="the TOML configuration file (default: none, the built-in defaults)",
        )
    return parser


def _level(verbose: int, quiet: bool) -> str:
    if verbose and quiet:
        sys.stderr.write("license-proxy: -v and -q cannot be combined\n")
        raise SystemExit(USAGE_ERROR)
    return "debug" if verbose else "warn" if quiet else "info"


def twistd_argv(file: Optional[str], level: str) -> list[str]:
    """What ``serve`` runs: twistd in the foreground, without a pid file (containers, systemd)."""
    return [
        "twistd", "--nodaemon", "--pidfile=",
        "license-proxy", "--config", file or "", "--log-level", level,
    ]


def serve(file: Optional[str], level: str) -> None:
    from twisted.scripts.twistd import run

    sys.argv = twistd_argv(file, level)
    run()


def check(file: Optional[str], environ: Mapping[str, str]) -> int:
    """What a start would refuse, without starting (``preflight``): one line, exit 0 or 2."""
    try:
        config = preflight.run(file, environ, time.time()).config
    except ConfigError as e:
        print(f"license-proxy: {e}", file=sys.stderr)
        return USAGE_ERROR
    scheme = "https" if config.tls else "http"
    print(
        f"license-proxy: {file or 'the built-in defaults'}: OK: licensing on"
        f" {scheme}://{config.host}:{config.port}{config.base_url}, status on port"
        f" {config.status_port}, upstream {', '.join(config.server_urls)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The TOML configuration file, loaded and checked once, before anything listens.

The vendor's format is kept as it is ([server] host/port/base_url/status_port, [license]
server_url/key, [fips] mode), so an existing license-proxy.toml works unchanged; every other key
has a default. A mistake is reported as a single ConfigError line naming the file and the key,
because a proxy that starts half-configured fails later, far from the cause. ``${VAR}`` is
expanded here because the original does not, and deployments had to run ``sed`` over the file.

Each key is one row of ``_KEYS``: adding a key is a Config field, a row (with its default and its
documentation: the configuration reference is built from this table) and, if needed, a parser.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping

import attrs
from hyperlink import DecodedURL, URLParseError

from .defaults import ANSWER_WITHIN, CREDENTIAL_HEADERS, DEFAULT_MAX_ENTRIES, RETRY_INTERVAL
from .headernames import HOP_BY_HOP, REQUEST_OWN, TOKEN, UNDERSCORE
from .proxyurl import Proxy
from .tls import files


class ConfigError(Exception):
    """The configuration can't be used; str(err) is one line naming the file and the key."""


@attrs.frozen
class Config:
    host: str = "0.0.0.0"  # [server] host
    port: int = 8443  # [server] port: the licensing listener
    base_url: str = "/"  # [server] base_url, always starts and ends with "/"
    status_port: int = 8080  # [server] status_port: plain HTTP
    tls: bool = True  # [server] tls: false serves plain HTTP on the licensing listener
    tls_cert: str | None = None  # [server] tls_cert: PEM path
    tls_key: str | None = None  # [server] tls_key: PEM path
    tls_names: tuple[str, ...] = ()  # [server] tls_names: more names for the generated cert
    max_body_size: int = 1048576  # [server] max_body_size, bytes
    header_timeout: float = 10.0  # [server] header_timeout, seconds from a request's first byte
    idle_timeout: float = 60.0  # [server] idle_timeout, seconds
    max_connections: int = 4096  # [server] max_connections, per listener
    max_connections_per_peer: int = 1024  # [server] max_connections_per_peer, per listener
    backlog: int = 4096  # [server] backlog: each listener's listen queue
    drain_time: float = 5.0  # [server] drain_time, else $LICENSE_PROXY_DRAIN_TIME; 0: none
    fips: bool = False  # [fips] mode
    server_urls: tuple[str, ...] = ("https://license.deepgram.com",)  # [license] server_url
    # [license] key, else $DEEPGRAM_API_KEY: a secret
    key: str | None = attrs.field(default=None, repr=False)
    ca_file: str | None = None  # [license] ca_file
    client_cert: str | None = None  # [license] client_cert
    client_key: str | None = None  # [license] client_key
    timeout: float = 30.0  # [license] timeout, seconds
    startup_timeout: float = 30.0  # [license] startup_timeout, seconds
    answer_within: float = ANSWER_WITHIN  # [license] answer_within, seconds
    retry_interval: float = RETRY_INTERVAL  # [license] retry_interval, seconds
    upstream_max_connections: int = 32  # [license] max_connections, per server_url
    upstream_max_pending: int = 1024  # [license] max_pending, per server_url
    proxy: str = attrs.field(default="", repr=False)  # [license] proxy: may hold a password
    no_proxy: str = ""  # [license] no_proxy
    trust_duration: float = 86400.0  # [trust] duration, seconds
    checkin_interval: float = 60.0  # [trust] checkin_interval, seconds
    cache_path: str = "/var/lib/license-proxy/trust-cache.json"  # [cache] path
    cache_max_entries: int = DEFAULT_MAX_ENTRIES  # [cache] max_entries
    cache_key_headers: tuple[bytes, ...] = CREDENTIAL_HEADERS  # [cache] key_headers, lower, sorted
    peer_urls: tuple[str, ...] = ()  # [peers] urls: the other instances' licensing URLs
    peer_ca_file: str | None = None  # [peers] ca_file
    peer_cert_file: str | None = None  # [peers] cert_file: this instance's peer certificate
    peer_key_file: str | None = None  # [peers] key_file
    peer_name: str | None = None  # [peers] name, else $LICENSE_PROXY_PEERS_NAME
    # PEM from the environment (VARIABLES), used where the file key is unset.
    peer_ca_pem: str | None = attrs.field(default=None, repr=False)
    peer_cert_pem: str | None = attrs.field(default=None, repr=False)
    peer_key_pem: str | None = attrs.field(default=None, repr=False)  # a secret
    # [peers] salt_file's contents, else $LICENSE_PROXY_PEERS_SALT: the shared key salt, a secret
    peer_salt: bytes | None = attrs.field(default=None, repr=False)
    log_format: str = "text"  # [log] format: "text" or "json" (one object per line)

    @property
    def state_dir(self) -> str:
        """The directory holding the trust cache (mount this, not the file)."""
        return os.path.dirname(self.cache_path) or "."


KEY_VARIABLE = "DEEPGRAM_API_KEY"
"""Where the key comes from when the file sets none: the vendor's images require it."""

VARIABLES = {
    "LICENSE_PROXY_PEERS_NAME": "peer_name",
    "LICENSE_PROXY_PEERS_CA": "peer_ca_pem",
    "LICENSE_PROXY_PEERS_CERT": "peer_cert_pem",
    "LICENSE_PROXY_PEERS_KEY": "peer_key_pem",
    "LICENSE_PROXY_PEERS_SALT": "peer_salt",
    "LICENSE_PROXY_DRAIN_TIME": "drain_time",
}
"""The settings also read from the environment (peer PEM in the variable, e.g. from a Secret):
the vendor's Helm chart fixes the config file and mounts nothing more, but takes ``extraEnv``.
A file key wins where both are set (``[peers] name``, ``ca_file``, ``cert_file``, ``key_file``,
``salt_file``, ``[server] drain_time``)."""


def load(path: str | None, environ: Mapping[str, str]) -> Config:
    """
    Read, expand and check the config file at ``path`` (None: no file, the built-in
    defaults, as the vendor's program runs without one); raise ConfigError on any mistake.
    """
    values = {}
    for section, table in (_read_toml(path) if path is not None else {}).items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: top-level key {_toml_key(section)}: keys belong in a section such as"
                " [server]"
            )
        if section not in _SECTIONS:
            known = ", ".join(sorted(_SECTIONS))
            raise ConfigError(f"{path}: unknown section [{_toml_key(section)}] (known: {known})")
        for key, raw in table.items():
            if (section, key) not in _KEYS:
                known = ", ".join(k for s, k in _KEYS if s == section)
                raise ConfigError(
                    f"{path}: unknown key [{section}] {_toml_key(key)} (known: {known})"
                )
            attribute, parse = _KEYS[section, key].attribute, _KEYS[section, key].parse
            try:
                expanded = _expand(raw, environ)
            except ValueError as e:
                raise _error(path, section, key, str(e)) from None
            try:
                values[attribute] = parse(expanded)
            except ValueError as e:
                reason = _unexpanded(str(e), raw, environ)
                raise _error(path, section, key, reason) from None
    if values.get("key") is None:  # unset or ""
        values["key"] = environ.get(KEY_VARIABLE) or None
    _variables(values, environ)
    config = Config(**values)
    _check_combinations(path, config)
    return config


def _variables(values: dict, environ: Mapping[str, str]) -> None:
    """The settings the file leaves unset, from ``VARIABLES``."""
    for variable, attribute in VARIABLES.items():
        value = environ.get(variable)
        if not value:
            continue
        if attribute in _PARSED_VARIABLES:
            if values.get(attribute) is None:
                try:
                    values[attribute] = _PARSED_VARIABLES[attribute](value)
                except ValueError as e:
                    raise ConfigError(f"environment variable {variable}: {e}") from None
        elif values.get(attribute.replace("_pem", "_file")) is None:
            if "-----BEGIN " not in value:
                # Not shown: it may be a key.
                raise ConfigError(f"environment variable {variable}: expected PEM text")
            values[attribute] = value


def require_key(path: str | None, config: Config) -> None:
    """A proxy without a key would relay its own check-ins unlicensed: refuse to run it."""
    if config.key is None:
        where = "the built-in defaults" if path is None else path
        raise ConfigError(
            f"{where}: no license key: set [license] key in the config file or the"
            f" {KEY_VARIABLE} environment variable"
        )


def parse_duration(value: object) -> float:
    """Seconds from a number, or from a string such as "90s", "15m", "48h", "7d" or "1h30m"."""
    if isinstance(value, str) and _DURATION.fullmatch(value):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    else:
        raise ValueError(
            'expected a number of seconds or a duration such as "90s", "15m", "48h", "1h30m",'
            f" got {_show(value)}"
        )
    if not 0 < seconds < math.inf:
        raise ValueError(f"expected a finite duration greater than 0, got {_show(value)}")
    return seconds


def span(seconds: float) -> str:
    """``3d4h``, ``2h5m``, ``4m12s``, ``7s``: the two largest units
    (durations shown to people: the status page, ``license-proxy-status``)."""
    seconds = max(0, int(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])


_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# "$$", "${NAME}", or a "${" that isn't a well-formed reference.
_REFERENCE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)\}|(\{))")


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text: byte {e.object[e.start]:#04x} on line {line}"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {' '.join(str(e).splitlines())}") from None


def _expand(value: object, environ: Mapping[str, str]) -> object:
    """Replace ${VAR} with environ["VAR"] and $$ with $ in every string, also inside lists."""
    if isinstance(value, list):
        return [_expand(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        dollar, name, malformed = match.groups()
        if dollar:
            return "$"
        if malformed:
            raise ValueError('"${" must be followed by a variable name and "}", as in ${NAME}')
        if name not in environ:
            raise ValueError(f"environment variable {name} is not set")
        return environ[name]

    return _REFERENCE.sub(replace, value)


def _unexpanded(reason: str, raw: object, environ: Mapping[str, str]) -> str:
    """``reason`` without the value when it came from the environment: a secret put in
    the wrong key (a license key as a URL) must not be printed."""
    texts = raw if isinstance(raw, list) else [raw]
    names = sorted({m[2] for t in texts if isinstance(t, str) for m in _REFERENCE.finditer(t)
                    if m[2]})
    if not names:
        return reason
    reason = reason.split(", got ")[0]
    if any(environ.get(name) and environ[name] in reason for name in names):
        reason = "not a valid value"
    shown = ", ".join(f"${{{name}}}" for name in names)
    return f"{reason} (the value, from {shown}, is not shown)"


def _check_combinations(path: str, config: Config) -> None:
    if not config.tls and (config.tls_cert or config.tls_key):
        raise _error(
            path, "server", "tls", "tls = false cannot be combined with tls_cert/tls_key"
        )
    if config.tls_names and (config.tls_cert or not config.tls):
        raise _error(
            path, "server", "tls_names",
            "names the generated certificate: not with tls_cert/tls_key or tls = false",
        )
    for section, cert, key in (
        ("server", "tls_cert", "tls_key"),
        ("license", "client_cert", "client_key"),
    ):
        for given, missing in ((cert, key), (key, cert)):
            if getattr(config, given) and not getattr(config, missing):
                raise _error(path, section, missing, f"missing, required when {given} is set")
    if config.status_port == config.port:
        raise _error(path, "server", "status_port", f"must differ from port ({config.port})")
    _check_peers(path, config)


def _check_peers(path: str, config: Config) -> None:
    """Peers prove themselves to each other by certificate (``peers``): with any peer setting,
    the CA, this instance's certificate and key (each from its file or its variable), and a TLS
    listener (where they are checked); the peers listed or named, not both."""
    given = [key for key, variable in _PEER_MATERIAL.items() if _peer_material(config, key)]
    if not (config.peer_urls or config.peer_name or given):
        return
    if config.peer_urls and config.peer_name:
        raise _error(path, "peers", "name", "not with urls: the peers are listed or named")
    for key, variable in _PEER_MATERIAL.items():
        if not _peer_material(config, key):
            raise _error(
                path, "peers", key, f"missing (or {variable}), required when peers are set"
            )
    if not config.tls:
        raise _error(path, "server", "tls", "tls = false cannot be combined with [peers]")


def _peer_material(config: Config, key: str) -> str | None:
    attribute = _KEYS["peers", key].attribute
    return getattr(config, attribute) or getattr(config, attribute.replace("_file", "_pem"))


#: The variables parsed as their file keys' values are (the others hold PEM).
_PARSED_VARIABLES: dict[str, Callable[[str], object]] = {
    "peer_name": lambda value: _peer_name(value),
    "peer_salt": lambda value: _salt(value),
    "drain_time": lambda value: _KEYS["server", "drain_time"].parse(value),
}

#: The peer keys that name PEM files, each with the variable that can hold the PEM instead.
_PEER_MATERIAL = {
    "ca_file": "LICENSE_PROXY_PEERS_CA",
    "cert_file": "LICENSE_PROXY_PEERS_CERT",
    "key_file": "LICENSE_PROXY_PEERS_KEY",
}


def _error(path: str, section: str, key: str, reason: str) -> ConfigError:
    return ConfigError(f"{path}: [{section}] {key}: {reason}")


def _toml_key(name: str) -> str:
    """A key as TOML would spell it: bare if it can be, else quoted (and so on one line)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _kind(value: object) -> str:
    """What sort of TOML value this is, without showing it."""
    for type_, name in _KINDS:
        if isinstance(value, type_):
            return name
    return "a date or time"


_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
          (list, "a list"), (dict, "a table"))


def _show(value: object) -> str:
    """A value as TOML would spell it, for an error message; lists and tables by their kind."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float)):
        return repr(value)
    return _kind(value)


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _non_empty_string(value: object) -> str:
    if _string(value) == "":
        raise ValueError("expected a non-empty string, got ''")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"expected an integer from 1 to 65535, got {_show(value)}")
    return value


class NotOfKind(ValueError):
    """A value that is not of the kind a ``Bounded`` key takes."""


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NotOfKind()
    return value


@attrs.frozen
class Bounded:
    """
    A duration or count within bounds an operator could mean: ``[trust] duration =
    "3000000d"`` once made every status answer a 500 (a year past 9999), ``checkin_interval
    = 1e-9`` thousands of check-ins a second.  ``parse`` refuses what is no number at all
    (``NotOfKind``: then the range is said too).
    """

    kind: str  # "a duration"
    parse: Callable[[object], float]
    low: float
    high: float
    #: Shows a bound as the key is written: "1s", "3650d", "1048576".
    spell: Callable[[float], str] = str

    def __call__(self, value: object) -> float:
        try:
            number = self.parse(value)
        except NotOfKind:
            number = None
        if number is None or not self.low <= number <= self.high:
            raise ValueError(f"expected {self.kind} {self.range}, got {_show(value)}")
        return number

    @property
    def range(self) -> str:
        return f"from {self.spell(self.low)} to {self.spell(self.high)}"


def _spell_duration(seconds: float) -> str:
    for unit in "dhm":
        if seconds >= _UNIT_SECONDS[unit] and seconds % _UNIT_SECONDS[unit] == 0:
            return f"{seconds // _UNIT_SECONDS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _duration_or_zero(value: object) -> float:
    """A duration, or 0 for none (``0``, ``"0s"``, ``"0m"``…); ``NotOfKind`` otherwise, so that
    the message gives the range, 0 included."""
    if isinstance(value, str) and re.fullmatch(r"0(?:\.0+)?[smhd]?", value):
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    try:
        return parse_duration(value)
    except ValueError:
        raise NotOfKind() from None


def _seconds(low: float, high: float) -> Bounded:
    return Bounded("a duration", parse_duration, low, high, _spell_duration)


def _count(high: int, low: int = 1) -> Bounded:
    return Bounded("an integer", _integer, low, high)


_HOUR, _DAY = 3600, 86400


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")


def _base_url(value: object) -> str:
    if not _PATH.fullmatch(_string(value)):
        raise ValueError(
            f'expected a URL path starting with "/" (ASCII, percent-encoded), got {value!r}'
        )
    return value if value.endswith("/") else value + "/"


_FIPS_MODES = {"enabled": True, "disabled": False}


def _fips_mode(value: object) -> bool:
    if not isinstance(value, str) or value not in _FIPS_MODES:
        raise ValueError(f'expected "enabled" or "disabled", got {_show(value)}')
    return _FIPS_MODES[value]


def _log_format(value: object) -> str:
    if value not in ("text", "json"):
        raise ValueError(f'expected "text" or "json", got {_show(value)}')
    return value


def _server_urls(value: object) -> tuple[str, ...]:
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, list):
        raise ValueError(f"expected an https:// URL or a list of them, got {_show(value)}")
    if not urls:
        raise ValueError("expected an https:// URL or a list of them, got an empty list")
    return tuple(_https_url(url) for url in urls)


def _https_url(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an https:// URL, got {_show(value)}")
    try:
        url = DecodedURL.from_text(value)
    except URLParseError as e:
        raise ValueError(f"expected an https:// URL, got {value!r}: {e}") from None
    if any(url.userinfo):
        # Don't repeat the URL: it holds a password, or something someone took for one.
        raise ValueError("expected an https:// URL without a user name or password")
    if url.scheme != "https" or not url.host:
        raise ValueError(f"expected an https:// URL with a host, got {value!r}")
    if not 1 <= url.port <= 65535:
        raise ValueError(f"expected an https:// URL with a port from 1 to 65535, got {value!r}")
    if url.fragment:
        raise ValueError(f"expected an https:// URL without a #fragment, got {value!r}")
    if url.query or "?" in value:
        # Not repeated: a query string is where tokens hide, and the URL is logged.
        raise ValueError("expected an https:// URL without a ?query")
    return value


def _peer_urls(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of https:// URLs, got {_show(value)}")
    return tuple(_https_url(url) for url in value)


def _peer_name(value: object) -> str | None:
    """A DNS name (not an address: it is re-resolved, and the peers' certificates carry it)."""
    name = _string(value)
    if name == "":
        return None
    if _is_ip(name) or not _DNS_NAME.fullmatch(name) or name.startswith("*."):
        raise ValueError(
            f"expected a DNS name such as license-proxy-peers.NAMESPACE.svc.cluster.local,"
            f" got {_show(name)}"
        )
    return name


def _tls_names(value: object) -> tuple[str, ...]:
    """Host names and IP addresses, as a certificate's subjectAltName can hold them."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of host names or IP addresses, got {_show(value)}")
    for name in value:
        if not isinstance(name, str) or not (_is_ip(name) or _DNS_NAME.fullmatch(name)):
            raise ValueError(
                f"expected host names (such as proxy.example.com) or IP addresses, got"
                f" {_show(name)}"
            )
    return tuple(value)


_DNS_NAME = re.compile(
    r"(?=.{1,253}$)(\*\.)?([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _secret(value: object) -> str | None:
    """The license key: never shown, even when it's the wrong type. Empty means unset."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)}")
    return value or None


SALT_BYTES = (16, 1024)
"""The shared salt's length bounds: short enough to guess is no salt, long is a mistake."""


def _salt(text: str) -> bytes:
    """The shared key salt: the text, surrounding white space (a file's last newline) removed.
    Never shown: it is a secret."""
    salt = text.strip().encode("utf-8")
    low, high = SALT_BYTES
    if not low <= len(salt) <= high:
        raise ValueError(f"a salt of {low} to {high} bytes expected, got {len(salt)}")
    return salt


def _salt_file(value: object) -> bytes | None:
    """``[peers] salt_file``: read now (a typo fails at start, ``license-proxy check`` says it)."""
    path = _readable_file(value)
    if path is None:
        return None
    try:
        text = files.read(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path!r}: {e}") from None
    return _salt(text)


def _readable_file(value: object) -> str | None:
    """A file that can be read now (``tls.files``' rules), so a typo fails at start, not at
    first use."""
    path = _string(value)
    if path == "":
        return None
    try:
        files.read(path)
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    return path


def _key_headers(value: object) -> tuple[bytes, ...]:
    """Header names, any case; lower-cased and sorted, so the key doesn't depend on their order."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of header names, got {_show(value)}")
    names = set()
    for name in value:
        if not (isinstance(name, str) and name.isascii() and TOKEN.fullmatch(name.encode())):
            raise ValueError(f"expected header names, got {_show(name)}")
        lower = name.lower().encode("ascii")
        if UNDERSCORE in lower:
            raise ValueError(f"{name}: a header name with _ is refused in requests (use -)")
        if lower in HOP_BY_HOP | REQUEST_OWN:
            raise ValueError(f"{name} is never relayed as the client sent it, so can't identify one")
        names.add(lower)
    return tuple(sorted(names))


def _proxy_url(value: object) -> str:
    """A forward proxy URL; "" leaves the choice to the environment."""
    if _string(value):
        Proxy.parse(value)
    return value


@attrs.frozen
class Key:
    """One key: where it goes, how it is read, and how the configuration reference shows it."""

    attribute: str  # of Config
    #: Takes the TOML value after ${VAR} expansion and returns the attribute's value, or raises
    #: ValueError("expected ..., got ...").
    parse: Callable[[object], object]
    default: str  # as TOML when it is a value (checked against Config's), else in words
    doc: str | None  # Markdown; None: documented with the key before it (a pair such as cert/key)

    @property
    def default_is_value(self) -> bool:
        """Whether ``default`` is a TOML value (a string, number, list or boolean), not words."""
        return self.default[:1] in '"[0123456789' or self.default in ("true", "false")


_KEYS: dict[tuple[str, str], Key] = {
    ("server", "host"): Key(
        "host", _non_empty_string, '"0.0.0.0"',
        'address both listeners bind to (`"::"` for IPv6)',
    ),
    ("server", "port"): Key(
        "port", _port, '8443',
        'licensing listener (HTTPS)',
    ),
    ("server", "base_url"): Key(
        "base_url", _base_url, '"/"',
        'URL prefix of licensing requests; anything else gets 404',
    ),
    ("server", "status_port"): Key(
        "status_port", _port, '8080',
        'status listener (plain HTTP)',
    ),
    ("server", "tls"): Key(
        "tls", _boolean, 'true',
        (
            '`false` serves the licensing listener as plain HTTP (behind a TLS-terminating '
            'load balancer)'
        ),
    ),
    ("server", "tls_cert"): Key(
        "tls_cert", _readable_file, 'unset',
        (
            'PEM certificate (chain) and key of the licensing listener. Unset: a self-signed '
            'certificate (for the host name, `localhost`, `127.0.0.1`, `::1`, '
            '`license-proxy`, `deepgram-license-proxy-internal` and its `.svc` forms, see '
            '[What the API and Engine containers must '
            'trust](deploying.md#what-the-api-and-engine-containers-must-trust)) is generated on first '
            'start and kept as `tls.crt`/`tls.key` in the state directory, so it stays the '
            'same across restarts. Setting them with `tls = false` is an error'
        ),
    ),
    ("server", "tls_key"): Key(
        "tls_key", _readable_file, 'unset',
        None,
    ),
    ("server", "tls_names"): Key(
        "tls_names", _tls_names, '[]',
        (
            'more host names or IP addresses for the generated certificate (e.g. '
            '`["license.example.com", "10.0.0.7"]`); a new certificate is made at the next '
            'start when one is missing. Not with `tls_cert` or `tls = false`'
        ),
    ),
    ("server", "max_body_size"): Key(
        "max_body_size", _count(100 * 1024 * 1024), '1048576',
        (
            'largest request body in bytes, on both listeners: a larger `Content-Length` gets '
            '413 before the body is read, a chunked body 413 as soon as it grows past it'
        ),
    ),
    ("server", "header_timeout"): Key(
        "header_timeout", _seconds(1, _HOUR), '"10s"',
        (
            'a request, head and body, must be complete this long after its first byte, else '
            '408; bytes trickled in do not move the deadline (slowloris). Time spent '
            'answering is not counted'
        ),
    ),
    ("server", "idle_timeout"): Key(
        "idle_timeout", _seconds(1, _DAY), '"60s"',
        (
            'a connection with no request under way is closed after this long without a byte; '
            'covers a client that never sends anything or never starts TLS'
        ),
    ),
    ("server", "max_connections"): Key(
        "max_connections", _count(1_048_576), '4096',
        'open connections per listener (each has its own); one more is closed at once',
    ),
    ("server", "max_connections_per_peer"): Key(
        "max_connections_per_peer", _count(1_048_576), '1024',
        (
            'open connections per listener from one client address; generous because whole '
            'fleets often arrive from one NAT or load-balancer address'
        ),
    ),
    ("server", "backlog"): Key(
        "backlog", _count(65535), '4096',
        (
            'connections each listener lets wait for their accept (the listen queue): a fleet '
            'reconnecting at once after a blip overflows a small one, and each SYN dropped '
            'costs its client a retry 1 s, then 3 s, later. The kernel caps it at '
            '`net.core.somaxconn` (4096 on Linux 5.4 and later); see '
            '[A reconnect storm](performance.md#a-reconnect-storm)'
        ),
    ),
    ("server", "drain_time"): Key(
        "drain_time", Bounded("a duration", _duration_or_zero, 0, 5 * 60, _spell_duration),
        '"5s"',
        (
            'after SIGTERM, the licensing listener keeps answering this long, each answer with '
            '`Connection: close` and kept-alive connections closed while idle, so that a '
            'Kubernetes Service or a load balancer that still sends check-ins here while it '
            'takes the instance out gets them answered; then the stop. `0`: stop at once. '
            'Also `$LICENSE_PROXY_DRAIN_TIME` (the vendor\'s Helm chart fixes the file); see '
            '[Stopping](running.md#stopping)'
        ),
    ),
    ("fips", "mode"): Key(
        "fips", _fips_mode, '"disabled"',
        (
            '`"enabled"`: run only on a FIPS-validated OpenSSL in FIPS mode, else refuse to '
            'start (exit 2, one line saying why and what would make it possible); see [FIPS '
            'mode](#fips-mode)'
        ),
    ),
    ("license", "server_url"): Key(
        "server_urls", _server_urls, '"https://license.deepgram.com"',
        (
            'the license server; a list of `https://` URLs is tried in order for every relay '
            'and check-in, all sharing one cache; a URL known to be down is skipped (see '
            '[Outages](outages.md#outages))'
        ),
    ),
    ("license", "key"): Key(
        "key", _secret, 'DEEPGRAM_API_KEY',
        (
            "license key for the proxy's own check-in, sent as `Authorization: Token <key>`. "
            'Unset (or `""`): the `DEEPGRAM_API_KEY` environment variable, as in the vendor\'s '
            'images; with neither, the proxy refuses to start (exit 2). Never logged, shown '
            'in status or metrics, or written to the cache'
        ),
    ),
    ("license", "ca_file"): Key(
        "ca_file", _readable_file, 'system trust store',
        'PEM bundle of the roots that verify the license server',
    ),
    ("license", "client_cert"): Key(
        "client_cert", _readable_file, 'unset',
        'client certificate for a license server that requires mutual TLS',
    ),
    ("license", "client_key"): Key(
        "client_key", _readable_file, 'unset',
        None,
    ),
    ("license", "timeout"): Key(
        "timeout", _seconds(1, _HOUR), '"30s"',
        (
            'the one deadline of an exchange with one license server URL: connect, TLS, '
            'headers and body'
        ),
    ),
    ("license", "startup_timeout"): Key(
        "startup_timeout", _seconds(1, _DAY), '"30s"',
        'how long a new instance tries to reach the license server before giving up',
    ),
    ("license", "answer_within"): Key(
        "answer_within", _seconds(0.1, _HOUR), '"2s"',
        (
            'the longest a request that has a trusted answer waits for the license server: '
            'past it, the request gets the trusted answer and the exchange finishes in the '
            'background (its result still updates the cache and the state). Also the connect '
            'timeout (name resolution and TCP connect, to the server or to a forward proxy; '
            'at most `timeout`). See [Outages](outages.md#outages)'
        ),
    ),
    ("license", "retry_interval"): Key(
        "retry_interval", _seconds(1, _HOUR), '"5s"',
        (
            'while a license server is down, it is probed with the check-in request every '
            '`retry_interval`, jittered between half of it and all of it, one probe at a '
            'time; the first answer makes it usable again'
        ),
    ),
    ("license", "max_connections"): Key(
        "upstream_max_connections", _count(1024), '32',
        (
            'most connections (exchanges) open to each `server_url` at once, check-ins and '
            "probes included; the requests beyond wait for one, first come first served (see "
            '[Outages](outages.md#outages))'
        ),
    ),
    ("license", "max_pending"): Key(
        "upstream_max_pending", _count(65536, low=0), '1024',
        (
            'most requests waiting for one of those connections, per `server_url`; one that '
            'finds the queue full, or waits `answer_within`, is answered as in an outage '
            '(the next `server_url`, else from trust, else 502) and counted in '
            '`license_proxy_upstream_overflows_total`'
        ),
    ),
    ("license", "proxy"): Key(
        "proxy", _proxy_url, 'unset',
        (
            'forward proxy to the license server: `http://`, `https://`, `socks5://` or '
            '`socks5h://`, with optional `user:password@`; wins over '
            '`HTTPS_PROXY`/`ALL_PROXY` (see [Egress through a corporate '
            'proxy](egress.md#egress-through-a-corporate-proxy))'
        ),
    ),
    ("license", "no_proxy"): Key(
        "no_proxy", _string, 'unset',
        'hosts reached directly, in `NO_PROXY` syntax; wins over `NO_PROXY`',
    ),
    ("trust", "duration"): Key(
        "trust_duration", _seconds(1, 3650 * _DAY), '"24h"',
        'how long after the last successful check-in cached answers may be served',
    ),
    ("trust", "checkin_interval"): Key(
        "checkin_interval", _seconds(1, _DAY), '"60s"',
        'how often the proxy checks in by itself',
    ),
    ("cache", "path"): Key(
        "cache_path", _non_empty_string, '"/var/lib/license-proxy/trust-cache.json"',
        (
            "the trust cache's snapshot, with its journal beside it (`PATH.journal`); its "
            'directory is the **state directory** (mount the directory, never the file: the '
            'files are replaced by rename). Created 0700 if missing; one writable by others '
            'keeps the files in `private/` (see [Security rules](security.md#security-rules))'
        ),
    ),
    ("cache", "max_entries"): Key(
        "cache_max_entries", _count(1_000_000), '10000',
        (
            'most answers kept; when full, the one stored longest ago makes room, answers not '
            'asked for again a `checkin_interval` later first (see [The trust '
            'cache](trust-cache.md#the-trust-cache))'
        ),
    ),
    ("cache", "key_headers"): Key(
        "cache_key_headers", _key_headers, '["Authorization", "Cookie", "X-Api-Key"]',
        (
            'request headers that tell licensees apart, any case: each is part of every cache '
            "key, so one licensee's cached answer never goes to another. Add the header your "
            'licensees are identified by (`X-Auth-Token`, a vendor header); a hop-by-hop '
            'header, `Host` or `Content-Length` is refused (never sent as the client sent it), '
            'and so is a name with `_` (requests with one are refused: see [Security '
            'rules](security.md#security-rules))'
        ),
    ),
    ("peers", "urls"): Key(
        "peer_urls", _peer_urls, '[]',
        (
            'the other instances behind the same load balancer, as their licensing URLs '
            '(`https://` only, with their `base_url`, e.g. '
            '`["https://proxy-b.example:8443/"]`): a request this instance would answer 502 '
            'is asked of them first, and their answer kept (see [Two '
            'instances](two-instances.md#two-instances))'
        ),
    ),
    ("peers", "name"): Key(
        "peer_name", _peer_name, 'unset',
        (
            'instead of `urls`: one DNS name (a Kubernetes headless Service) whose every '
            'address is a peer, re-resolved every few seconds, this instance excepted; each is '
            "reached at this instance's own `port` and `base_url`, its certificate verified "
            'against the name. Else `$LICENSE_PROXY_PEERS_NAME` (see [Found by '
            'DNS](two-instances.md#found-by-dns))'
        ),
    ),
    ("peers", "ca_file"): Key(
        "peer_ca_file", _readable_file, 'unset (required with peers)',
        (
            "CA certificates (PEM) the peers' certificates must chain to: the ones their "
            "listeners present to peers and the client certificates they present "
            "(`cert_file`). Only a request over a connection with a client certificate "
            "chaining to it is a peer's (see [Two instances](two-instances.md#two-instances)); "
            "give it a CA that signs nothing else. Else the PEM in `$LICENSE_PROXY_PEERS_CA`"
        ),
    ),
    ("peers", "cert_file"): Key(
        "peer_cert_file", _readable_file, 'unset (required with peers)',
        (
            "this instance's peer certificate (PEM, chaining to `ca_file`, extended key usages "
            "`clientAuth`, and with `name` also `serverAuth` and the name), presented when it "
            "asks a peer, and with `name` to a peer asking it. Else the PEM in "
            "`$LICENSE_PROXY_PEERS_CERT` (and the key's in `$LICENSE_PROXY_PEERS_KEY`)"
        ),
    ),
    ("peers", "key_file"): Key(
        "peer_key_file", _readable_file, 'unset',
        None,
    ),
    ("peers", "salt_file"): Key(
        "peer_salt", _salt_file, 'unset',
        (
            "a file holding the key salt the peers share (16 to 1024 bytes, e.g. "
            "`openssl rand -hex 32`; from a Secret of its own, as `etc/kubernetes` does): the trust cache "
            "keys its answers with it, so an instance that starts can take its peers' answers "
            "before it reports ready. Unset: no such pull (answers are still pushed and asked). "
            "Else `$LICENSE_PROXY_PEERS_SALT` (see [The shared salt](two-instances.md#the-shared-salt))"
        ),
    ),
    ("log", "format"): Key(
        "log_format", _log_format, '"text"',
        (
            '`"json"`: one JSON object per line on standard output (see [Logs](operations.md#logs)); '
            '`--log-format` overrides it'
        ),
    ),
}
_SECTIONS = frozenset(section for section, _ in _KEYS)

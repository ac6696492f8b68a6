"""
``[fips] mode = "enabled"``, honestly: the proxy runs only when the OpenSSL it links is a
FIPS-validated module in FIPS mode, and otherwise refuses to start.

There is one OpenSSL in the process: pyOpenSSL (both TLS sides) uses the one cryptography
links, which the cryptography wheel bundles and builds without a FIPS provider.  In FIPS
mode (``fips=yes`` as OpenSSL's default property) every algorithm, TLS included, is
fetched from the FIPS provider, so nothing outside it can be negotiated on either side.
"""

from __future__ import annotations

from OpenSSL import SSL

from .config import Config, ConfigError
from .twistedseams import fips_enabled


def in_fips_mode() -> bool:
    """Whether the process's OpenSSL fetches every algorithm from its FIPS provider."""
    return fips_enabled()


def openssl_version() -> str:
    return SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()


def require(path: str | None, config: Config, fips_mode: bool, openssl: str) -> None:
    """Raise ConfigError (one line: why, and what would make it possible) unless ``config``
    can run as it asks: FIPS mode wanted, and ``fips_mode`` (the OpenSSL ``openssl``) has it."""
    if config.fips and not fips_mode:
        where = "the built-in defaults" if path is None else path
        raise ConfigError(
            f'{where}: [fips] mode: "enabled" needs a FIPS-validated OpenSSL in FIPS mode, and'
            f" this process's {openssl} is not (the cryptography wheel bundles it without a"
            " FIPS provider); install cryptography built against a system OpenSSL 3 whose"
            ' FIPS provider is installed and enabled (fips=yes in openssl.cnf), or set'
            ' mode = "disabled"'
        )

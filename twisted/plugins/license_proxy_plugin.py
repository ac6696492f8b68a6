"""twistd plugin: ``twistd license-proxy --config PATH``."""

from twisted.application.service import ServiceMaker

license_proxy = ServiceMaker(
    "license-proxy",
    "license_proxy.tap",
    "Relay licensing check-ins to the license server, with a trust cache.",
    "license-proxy",
)

"""
Everything TLS, in one place: the policy both sides offer (``policy``), the contexts built from
the config's files (``contexts``: the listener's, the upstream client's ``UpstreamTLS``, the
peers'), their reload when the files change or on SIGHUP (``reload``), and certificate
generation (``certs``: the listener's self-signed certificate, the demo's and the tests' PKIs).
"""

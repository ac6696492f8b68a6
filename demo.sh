#!/usr/bin/env bash
# Quickstart: install license-proxy into .venv and run it in front of a local demo license
# server, so anyone can watch its states (Ready -> Connected -> TrustBased -> Failed) without an
# account.  Needs only python3 (3.11+), and PyPI for the install.  Ctrl-C stops both.
set -euo pipefail

cd "$(dirname "$0")" # every path below is relative to the repository
PYTHON=${PYTHON:-python3}
DEMO_DIR=.demo
UPSTREAM_PORT=9443

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "demo.sh: needs Python 3.11 or newer; set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv ..."
  "$PYTHON" -m venv .venv
fi
echo "Installing license-proxy into .venv ..."
.venv/bin/pip install --quiet --disable-pip-version-check .
mkdir -p "$DEMO_DIR"

# Stop on exit only the demo server this script started, never one the user started by hand.
upstream_pid=
stop_upstream() {
  if [ -n "$upstream_pid" ] && kill -0 "$upstream_pid" 2>/dev/null; then
    kill "$upstream_pid" 2>/dev/null || true
    wait "$upstream_pid" 2>/dev/null || true
    echo "Demo license server stopped."
  fi
}
trap stop_upstream EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

running=$(cat "$DEMO_DIR/upstream.pid" 2>/dev/null || true)
if [ -n "$running" ] && kill -0 "$running" 2>/dev/null; then
  echo "A demo license server is already running (pid $running); using it."
else
  .venv/bin/license-proxy-demo-upstream --dir "$DEMO_DIR" --port "$UPSTREAM_PORT" \
    >>"$DEMO_DIR/upstream.log" 2>&1 &
  upstream_pid=$!
  # It writes its pid file only once it listens: wait for that, at most 30 s (the first start
  # also makes the certificates and the config).
  for _ in $(seq 300); do
    [ "$(cat "$DEMO_DIR/upstream.pid" 2>/dev/null || true)" = "$upstream_pid" ] && break
    if ! kill -0 "$upstream_pid" 2>/dev/null; then
      echo "demo.sh: the demo license server did not start; end of $DEMO_DIR/upstream.log:" >&2
      tail -n 5 "$DEMO_DIR/upstream.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  if [ "$(cat "$DEMO_DIR/upstream.pid" 2>/dev/null || true)" != "$upstream_pid" ]; then
    echo "demo.sh: the demo license server is not listening after 30 s;" \
      "see $DEMO_DIR/upstream.log" >&2
    exit 1
  fi
  echo "Demo license server listening on https://localhost:$UPSTREAM_PORT" \
    "(log: $DEMO_DIR/upstream.log)."
fi

cat <<EOF

Starting license-proxy in front of it. In another terminal, in $PWD:
  watch the state:    watch -n1 curl -s http://127.0.0.1:8080/v1/status
  relay a request:    curl -sk https://127.0.0.1:8443/v1/anything
  stop the upstream:  kill \$(cat $DEMO_DIR/upstream.pid)     (TrustBased; Failed 2 minutes later)
  start it again:     .venv/bin/license-proxy-demo-upstream --dir $DEMO_DIR &     (Connected)
Ctrl-C here stops the proxy and the demo license server it started.

EOF
.venv/bin/twistd --nodaemon --pidfile= license-proxy --config "$DEMO_DIR/license-proxy.toml"

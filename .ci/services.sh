#!/usr/bin/env bash
# Installs what the runner tests need beyond pip packages: Debian's Prometheus Pushgateway.
# .ci/run calls this before pytest. The tests start and stop the services themselves, on free ports:
#   moto's S3 server:  python -m moto.server -H 127.0.0.1 -p PORT        (pip: moto[server])
#   the Pushgateway:   prometheus-pushgateway --web.listen-address=127.0.0.1:PORT
# Under CI=true a missing service fails the tests instead of skipping them.
set -euo pipefail

if ! command -v prometheus-pushgateway >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends prometheus-pushgateway
fi
prometheus-pushgateway --version 2>&1 | head -n 1

python - <<'PY'
import importlib.util, sys
missing = [m for m in ("moto", "flask", "s3fs") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages for the runner tests: {missing}; pip install 'moto[server]' s3fs")
print("moto server and s3fs: ok")
PY

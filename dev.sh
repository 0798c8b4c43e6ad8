#!/usr/bin/env bash
# bms_ai developer entry point (works on a fresh machine; installs what it needs).
#   ./dev.sh demo [ARGS]   main job: the whole node graph on a bundled recorded drive
#   ./dev.sh test [ARGS]   CI run: ruff, then every test tier but slow (ARGS: one pytest run with them)
#   ./dev.sh bench [ARGS]  performance figures as JSON
#   ./dev.sh setup         only create/refresh the virtual environment (.venv)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
VENV="${BMS_AI_VENV:-$HERE/.venv}"
PY="$VENV/bin/python"

# Every rclpy process stays on this machine (DESIGN.md section 8).
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export PYBAMM_DISABLE_TELEMETRY=true
export PYTHONUNBUFFERED=1

setup() {
  if [ ! -x "$PY" ]; then
    echo "[dev] creating virtual environment in $VENV" >&2
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.bms_ai_setup" want
  want="$(cat setup.py requirements-ros.txt | sha256sum | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[dev] installing bms_ai and its dependencies into $VENV" >&2
    pipq() { "$PY" -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" >&2 || true; "$PY" -m pip check >/dev/null 2>&1 || true; }
    pipq --upgrade pip
    pipq -r requirements-ros.txt
    pipq -e ".[test,train,fleet]"
    "$PY" -c "import rclpy, cantools, can, onnxruntime, bms_ai" \
      || { echo "[dev] installation incomplete (see pip output above)" >&2; exit 1; }
    echo "$want" > "$stamp"
  fi
}

system_packages() {
  # iproute2 for the private network namespace of the udp_multicast end-to-end test.
  if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2) >&2 || true
  fi
  # Real MQTT broker for the uploader tests (Debian package).
  if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "[dev] installing mosquitto (apt-get)" >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto) >&2 \
        || echo "[dev] mosquitto could not be installed; MQTT tests will be skipped" >&2
    else
      echo "[dev] mosquitto missing and not root: run 'sudo apt-get install mosquitto' for the MQTT tests" >&2
    fi
  fi
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/bms-ai" demo "$@" ;;
  bench) setup; exec "$VENV/bin/bms-ai" bench "$@" ;;
  test)
    setup
    system_packages
    "$PY" -m ruff check bms_ai test launch
    # CI effort for property tests (conftest.py; a plain `pytest` uses the quick "dev" profile)
    export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
    if [ $# -gt 0 ]; then exec "$PY" -m pytest -q -m "not slow" "$@"; fi
    # Tiers within one process run on two workers; the ROS and multi-process tiers measure
    # timing and delivery, so they run alone afterwards (both run even if the first fails).
    rc=0
    "$PY" -m pytest -q -n 2 -m "not slow and not (ros or e2e)" || rc=$?
    "$PY" -m pytest -q -m "(ros or e2e) and not slow" || rc=$?
    exit "$rc"
    ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac

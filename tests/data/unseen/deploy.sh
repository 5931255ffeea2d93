#!/usr/bin/env bash
set -euo pipefail

APP_DIR="${APP_DIR:-/srv/app}"
RELEASES="$APP_DIR/releases"
KEEP="${KEEP:-5}"
STAMP="$(date +%Y%m%d%H%M%S)"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ $# -lt 1 ]]; then
  echo "usage: $0 <git-ref> [--skip-tests]" >&2
  exit 2
fi
REF="$1"; shift
SKIP_TESTS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --skip-tests) SKIP_TESTS=1 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$RELEASES/$STAMP"
log "fetching $REF"
git -C "$APP_DIR/repo" fetch --quiet origin
git -C "$APP_DIR/repo" archive "$REF" | tar -x -C "$RELEASES/$STAMP"

cd "$RELEASES/$STAMP"
if [[ -f requirements.txt ]]; then
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt
fi
if [[ $SKIP_TESTS -eq 0 ]]; then
  log "running tests"
  .venv/bin/python -m pytest -q || { log "tests failed, aborting"; rm -rf "$RELEASES/$STAMP"; exit 1; }
fi

ln -sfn "$RELEASES/$STAMP" "$APP_DIR/current"
systemctl --user restart app.service
for i in 1 2 3 4 5; do
  if curl -fsS http://127.0.0.1:8080/health >/dev/null; then log "healthy"; break; fi
  sleep 2
done

ls -1dt "$RELEASES"/* | tail -n +$((KEEP + 1)) | xargs -r rm -rf
log "deployed $REF as $STAMP"

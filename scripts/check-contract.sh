#!/usr/bin/env bash
# The API contract: `buf lint` (buf.yaml) and `buf breaking` against the
# descriptor set of the last release, proto/releases/$RELEASE.binpb. A
# change that removes, renumbers or retypes a field, or renames a message,
# fails; adding RPCs, messages and fields passes.
#
# buf comes from the npm package @bufbuild/buf, installed into
# ${DATAGATE_DEV_DIR:-.dev}/npm on the first run when it is not on PATH.
#
# When a release ships, its descriptor set is written with
#   buf build -o proto/releases/vX.Y.Z.binpb
# and RELEASE below moves to it.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RELEASE=v0.1.0
BUF_VERSION=1.75.0

say() { echo "check-contract: $*"; }

BUF=$(command -v buf || true)
if [ -z "$BUF" ]; then
  BUF=$STATE/npm/node_modules/.bin/buf
  if [ ! -x "$BUF" ]; then
    command -v npm >/dev/null || { say "neither buf nor npm found (apt-get install npm)"; exit 1; }
    say "installing @bufbuild/buf@$BUF_VERSION into $STATE/npm (npm)"
    mkdir -p "$STATE/npm"
    npm install --prefix "$STATE/npm" --no-audit --no-fund --loglevel=error \
      "@bufbuild/buf@$BUF_VERSION" >&2
  fi
fi

"$BUF" lint
say "ok: buf lint ($("$BUF" --version))"
"$BUF" breaking --against "proto/releases/$RELEASE.binpb"
say "ok: buf breaking against $RELEASE"

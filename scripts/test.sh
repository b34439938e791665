#!/usr/bin/env bash
# `make test`: start the databases (scripts/dev-env.sh), then the unit and
# integration tests, then the grpcurl smoke test. `make lint` runs first.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
eval "$(scripts/dev-env.sh up)"
cargo test
scripts/smoke.sh

#!/usr/bin/env bash
# `make test`: start the databases (scripts/dev-env.sh), then the unit and
# integration tests (the fault suite, tests/faults, among them: its scenarios
# run one at a time on private servers), then the grpcurl smoke test.
# `make lint` runs first.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# Assigned first, so that a failure stops this script (set -e) instead of
# being hidden inside eval.
DEV_ENV=$(scripts/dev-env.sh up)
eval "$DEV_ENV"
cargo test
scripts/smoke.sh

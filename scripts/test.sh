#!/usr/bin/env bash
# `make test`: start the databases (scripts/dev-env.sh), then the unit and
# integration tests (the fault suite, tests/faults, among them: its scenarios
# run one at a time on private servers), then the grpcurl smoke test.
# `make lint` runs first.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
dev_env_up
cargo test
scripts/smoke.sh

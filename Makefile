# The few verbs people need. `make run` and `make test` work on a fresh
# machine: scripts/dev-env.sh installs and starts what is missing.
# `. scripts/lib.sh && dev_env_up` starts it and exports its environment; a
# failure there stops the target.
SHELL := /bin/bash
.DEFAULT_GOAL := help
.PHONY: help run test test-faults lint smoke fuzz bench-n1 bench-cache bench-search bench-analytics bench bench-quick bench-points bench-writes bench-cpu bench-ab env-up env-down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

run: ## start the databases, migrate, seed, and run datagate on :50051
	@scripts/run.sh

test: lint ## lint, then unit + integration tests and the grpcurl smoke test
	@scripts/test.sh

test-faults: ## the fault suite: private PostgreSQL, Redis and MongoDB killed, paused and restarted under load (about 2.5 min; figures in RELIABILITY.md)
	@. scripts/lib.sh && dev_env_up && cargo test --test faults -- --test-threads=1 --nocapture

lint: ## rustfmt, clippy (warnings are errors), the layering rule, the deployment files (kustomize, schemas, hadolint), the alert rules and their tests (promtool), the API contract (buf lint, buf breaking)
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo test --quiet --test layers
	scripts/check-deploy.sh
	scripts/check-monitoring.sh
	scripts/check-contract.sh

smoke: ## only the grpcurl smoke test
	@. scripts/lib.sh && dev_env_up && scripts/smoke.sh

fuzz: ## fuzz the request, page-token, grpc-timeout, search and token-entry parsers, FUZZ_SECONDS (60) each; fails on a crash
	@scripts/fuzz.sh

bench-n1: ## ListUsersWithOrders, batched loaders vs the naive per-user path (release build)
	@. scripts/lib.sh && dev_env_up && cargo bench --bench list_users_with_orders

bench-cache: ## GetUser cache hit vs miss and a Zipf hit ratio (release build)
	@. scripts/lib.sh && dev_env_up && cargo bench --bench cache

bench-search: ## SearchProducts over one million products, uncached and cached (release build)
	@. scripts/lib.sh && dev_env_up && cargo bench --bench search

bench-analytics: ## GetCategoryMetrics and GetRevenueTrend over two million orders (release build)
	@. scripts/lib.sh && dev_env_up && cargo bench --bench analytics

bench: ## The standard suite: the release service on a generated dataset, driven by datagate-bench (under 15 min, a cold release build included), then bench-writes
	@scripts/bench-load.sh full
	@scripts/bench-writes.sh

bench-writes: ## CreateOrder against pgbench TPC-B (-M prepared) at 16 clients, back to back on the same server; prints the ratio (release build)
	@scripts/bench-writes.sh

bench-quick: ## The same on an empty database, 1 s per scenario, 1 and 4 callers (under 3 min)
	@scripts/bench-load.sh quick

bench-points: ## GetUser (hit, near, uncached) and its references at 1, 16 and 64 callers, then h2load (a few minutes; run 3 times for the spread)
	@scripts/bench-load.sh points

bench-cpu: ## Instructions per GetUser (callgrind) of the release service and of the reference servers, and their ratios
	@scripts/bench-cpu.sh

bench-ab: ## GetUser against this tree's release build and another build (BASE=path/to/datagate), alternately in one run, at 1 and 64 streams; CACHE=on for hits
	@scripts/bench-ab.sh

env-up: ## start PostgreSQL, Redis and nx-27017; prints the environment
	@scripts/dev-env.sh up

env-down: ## stop them
	@scripts/dev-env.sh down

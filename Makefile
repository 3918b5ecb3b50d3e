# chatstore: the two commands are `make dev` and `make test`.
CONFIG ?= cluster-configs/local-3region.toml
CARGO  ?= cargo

.PHONY: dev dev-geo test chaos fuzz bench bench-geo bench-idle build verify fix clean nextest
SEED ?=
RETENTION ?=
DURATION ?= 120

## Build (release) and run a local three-region cluster; data under ./data.
dev:
	$(CARGO) build --release --bins
	./target/release/chatstore dev --config $(CONFIG)

## The same cluster with simulated distance between regions: every call
## between regions takes the round trip in the config's [latency] table.
dev-geo:
	$(CARGO) build --release --bins
	./target/release/chatstore dev --geo --config $(CONFIG)

## Run the whole test suite (unit, property, in-process, multi-process and
## chaos), then the chaos checker's self-test against a deliberately broken
## node (a separate build with the test-only feature `broken-early-ack`).
test: nextest
	$(CARGO) nextest run --no-fail-fast
	$(CARGO) nextest run --no-fail-fast --features broken-early-ack --test chaos_broken

## One chaos run: `make chaos SEED=42 DURATION=300` replays seed 42 for 300 s
## (a random seed, printed, when SEED is empty); RETENTION=3 sets a 3 s change
## retention, so change collection runs under the faults.
chaos: nextest
	CHATSTORE_SEED=$(SEED) CHATSTORE_CHAOS_SECS=$(DURATION) CHATSTORE_CHAOS_RETENTION_SECS=$(RETENTION) $(CARGO) nextest run --test chaos --run-ignored only --no-capture chaos_from_env

## Long property runs over every decoder and request validator (release
## build): FUZZ_CASES per property, default 200000. `make test` runs 512.
FUZZ_CASES ?= 200000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release --test hostile_input

## Geo benchmark (release build): per-region write, SESSION read and
## GetDifference latency on a simulated 80/150/200 ms deployment, and region
## failover; writes its section of BENCHMARKS.md. BENCH_SECS (default 10) per region.
bench-geo:
	$(CARGO) test --release --test geo -- --ignored bench_geo --nocapture

## Idle-shard benchmark (release build): CPU and RSS of nodes hosting 100
## and 1,000 shards, quiet and ticking, and the cost of waking a quiet shard;
## writes its section of BENCHMARKS.md. BENCH_SECS (default 20) per window.
bench-idle:
	$(CARGO) test --release --test idle -- --ignored bench_idle --nocapture

## Release binaries.
build:
	$(CARGO) build --release --bins

## Benchmarks: a fresh local cluster, the fixed suite of `chatctl
## bench-suite`, results into BENCHMARKS.md. BENCH_SECS=3 for a quick try.
bench:
	CARGO="$(CARGO)" CONFIG="$(CONFIG)" ./scripts/bench.sh

## Read-only checks: formatting, lints, tests.
verify: nextest
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features broken-early-ack -- -D warnings
	$(CARGO) nextest run --no-fail-fast

## Apply formatting and lint fixes.
fix:
	$(CARGO) fmt
	$(CARGO) clippy --fix --allow-dirty --all-targets

clean:
	$(CARGO) clean
	rm -rf data

# cargo-nextest runs the tests (test groups keep multi-node tests serial);
# install it if this machine lacks it.
nextest:
	@$(CARGO) nextest --version >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked

# chatstore: the two commands are `make dev` and `make test`.
CONFIG ?= cluster-configs/local-3region.toml
CARGO  ?= cargo

.PHONY: dev test build verify fix clean nextest

## Build (release) and run a local three-region cluster; data under ./data.
dev:
	$(CARGO) build --release --bins
	./target/release/chatstore dev --config $(CONFIG)

## Run the whole test suite (unit, property, in-process and multi-process).
test: nextest
	$(CARGO) nextest run --no-fail-fast

## Release binaries.
build:
	$(CARGO) build --release --bins

## Read-only checks: formatting, lints, tests.
verify: nextest
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
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

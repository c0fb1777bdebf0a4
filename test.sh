#!/usr/bin/env bash
# Runs the whole test suite: unit tests (no root needed), integration tests over real network
# namespaces, veths and nftables, and end-to-end tests with runc. Needs root for the last two.
set -euo pipefail
cd "$(dirname "$0")"
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features fault-injection -- -D warnings
cargo test --release --features fault-injection -- --test-threads=4

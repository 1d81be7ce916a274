#!/usr/bin/env bash
# The standard benchmark: 1M seed-shaped rows on a throwaway, durable
# PostgreSQL cluster; figures on stdout, report.json + throughput.svg in bench-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
exec target/release/rekey bench --rows "${ROWS:-1000000}" --repeat "${REPEAT:-3}" --report-dir bench-out "$@"

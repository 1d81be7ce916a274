#!/usr/bin/env bash
# Runs rekey's whole test suite on a fresh Debian machine: installs what is
# missing (PostgreSQL server binaries, Python interop packages), then checks
# formatting (cargo fmt --check), runs clippy (warnings are errors; with and
# without the aws feature), cargo-deny's policy checks when it is installed,
# and `cargo test`. The tests start their own throwaway PostgreSQL cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "test.sh: need root to run: $*" >&2; return 1; fi
}

have_pg_server() {
    command -v initdb >/dev/null 2>&1 && return 0
    [ -x "$(pg_config --bindir 2>/dev/null)/initdb" ] && return 0
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

if ! have_pg_server; then
    echo "test.sh: installing PostgreSQL server binaries" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
# Under root the harness runs the server as `postgres` (initdb refuses root).
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

python_has() { python3 -c "import $1" >/dev/null 2>&1; }
need_py=()
python_has cryptography || need_py+=(cryptography)
python_has tink || need_py+=(tink)
python_has boto3 || need_py+=(boto3)
{ python_has moto && python_has flask && python_has flask_cors; } || need_py+=("moto[server]")
if [ ${#need_py[@]} -gt 0 ]; then
    echo "test.sh: installing Python packages: ${need_py[*]}" >&2
    python3 -m pip install --quiet "${need_py[@]}" 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages "${need_py[@]}"
fi

# Formatting and lints fail the run like a failing test does.
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# A build without AWS support must stay possible (the `aws` feature, on by default).
cargo clippy --all-targets --locked --no-default-features -- -D warnings
# The dependency policy in deny.toml. Advisories are left out: their database
# comes from GitHub, which CI cannot reach. This script does not install
# cargo-deny (building it would take CI many minutes): it runs where it is installed.
if cargo deny --version >/dev/null 2>&1; then
    cargo deny check bans licenses sources
else
    echo "test.sh: cargo-deny is not installed; skipped the dependency policy check (deny.toml)"
fi

exec cargo test --locked "$@"

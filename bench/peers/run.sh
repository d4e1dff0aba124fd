#!/usr/bin/env bash
# Headwater beside its peers: starts a private PostgreSQL cluster (scripts/lib/postgres.sh),
# builds both programs of the benchmark in release, runs `headwater-peers` with the arguments
# given (e.g. `--runs 3`, `--quick`), and stops the cluster, also on failure or Ctrl-C.
#
#   bench/peers/run.sh [headwater-peers flags…]
#
# The cluster's data directory and the benchmark's working directory are both in /tmp, on the
# same disk: the fsync bound printed beside the figures is that disk's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

# shellcheck source=../../scripts/lib/postgres.sh
source "$root/scripts/lib/postgres.sh"
trap postgres_stop EXIT INT TERM

echo "building bench/peers/sqlx-peers (release)" >&2
cargo build --release --locked --manifest-path "$here/sqlx-peers/Cargo.toml"
echo "building bench/peers (release)" >&2
cargo build --release --locked --manifest-path "$here/Cargo.toml"

postgres_start

"$here/target/release/headwater-peers" \
  --postgres "$HEADWATER_TEST_POSTGRES_URL" \
  --peers-bin "$here/sqlx-peers/target/release/headwater-peers-sqlx" \
  --dir "${TMPDIR:-/tmp}" \
  "$@"

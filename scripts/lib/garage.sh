# Garage (S3-compatible object store) for the S3 repository tests and bench.
# Source it; do not run it.  Built once per machine from crates.io into a
# shared cache directory and reused afterwards (846 s on 2 cores at nice 19
# beside a clippy build; longer on a loaded machine).
# shellcheck shell=bash

GARAGE_VERSION=${GARAGE_VERSION:-2.5.0}
GARAGE_ROOT=${GARAGE_ROOT:-/var/cache/aula/garage-$GARAGE_VERSION}

# garage_cached: true when this machine already has the Garage build.
garage_cached() {
  [ -x "$GARAGE_ROOT/bin/garage" ] && "$GARAGE_ROOT/bin/garage" --version 2>/dev/null | grep -q "$GARAGE_VERSION"
}

# ensure_garage: build Garage if the cache has none; exports AULA_GARAGE
# (the path of the binary), which the S3 tests and bench-repo read.
ensure_garage() {
  local bin="$GARAGE_ROOT/bin/garage"
  if [ ! -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
    mkdir -p "$GARAGE_ROOT"
    log "building garage $GARAGE_VERSION into $GARAGE_ROOT (once per machine, long)"
    local t0 t1
    t0=$(date +%s)
    # Only what the tests use: the S3 API on a SQLite metadata store with
    # bundled libraries. No K2V, metrics exporter or LMDB.
    (
      exec 9>"$GARAGE_ROOT.lock"
      flock 9
      [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$GARAGE_VERSION" && exit 0
      CARGO_TARGET_DIR="$GARAGE_ROOT/build" nice -n 19 cargo install garage \
        --version "$GARAGE_VERSION" --locked --root "$GARAGE_ROOT" \
        --no-default-features --features bundled-libs,sqlite &&
        rm -rf "$GARAGE_ROOT/build"
    ) || die "cargo install garage failed"
    t1=$(date +%s)
    log "garage built in $((t1 - t0)) s"
  fi
  AULA_GARAGE=$bin
  export AULA_GARAGE
}

# garage_cluster_start DIR N PORT_BASE: start N Garage nodes on loopback
# (replication factor min(N, 3)), each in DIR/nN, with S3 on PORT_BASE+10i;
# lay them out, create bucket "aula" and import a fresh key. Sets
# GARAGE_ENDPOINTS (comma-separated), GARAGE_KEY_ID, GARAGE_SECRET and
# appends the node PIDs to GARAGE_PIDS. Needs ensure_garage first.
# GARAGE_EXTRA_CONF: lines added to every node's config (e.g. block_size).
garage_cluster_start() {
  local dir=$1 n=$2 base=$3 rf i cfg rpc_secret id ids=() eps=()
  rf=$((n < 3 ? n : 3))
  rpc_secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  GARAGE_KEY_ID=GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  GARAGE_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  GARAGE_PIDS=${GARAGE_PIDS:-}
  for ((i = 0; i < n; i++)); do
    mkdir -p "$dir/n$i"
    cfg=$dir/n$i/garage.toml
    cat > "$cfg" <<CONF
metadata_dir = "$dir/n$i/meta"
data_dir = "$dir/n$i/data"
db_engine = "sqlite"
replication_factor = $rf
compression_level = "none"
${GARAGE_EXTRA_CONF:-}
rpc_bind_addr = "127.0.0.1:$((base + 10 * i + 1))"
rpc_public_addr = "127.0.0.1:$((base + 10 * i + 1))"
rpc_secret = "$rpc_secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$((base + 10 * i))"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$((base + 10 * i + 3))"
CONF
    RUST_LOG=warn "$AULA_GARAGE" -c "$cfg" server >"$dir/n$i/garage.log" 2>&1 &
    GARAGE_PIDS="$GARAGE_PIDS $!"
    eps+=("http://127.0.0.1:$((base + 10 * i))")
  done
  for ((i = 0; i < n; i++)); do
    id=""
    for _ in $(seq 100); do
      id=$("$AULA_GARAGE" -c "$dir/n$i/garage.toml" node id -q 2>/dev/null) && break
      sleep 0.2
    done
    [ -n "$id" ] || die "garage node $i did not start (see $dir/n$i/garage.log)"
    ids+=("${id%%@*}")
    [ "$i" -gt 0 ] && garage_retry "$dir/n0/garage.toml" node connect "${ids[$i]}@127.0.0.1:$((base + 10 * i + 1))"
  done
  for ((i = 0; i < n; i++)); do
    garage_retry "$dir/n0/garage.toml" layout assign -z "dc$((i + 1))" -c 1G "${ids[$i]:0:16}"
  done
  garage_retry "$dir/n0/garage.toml" layout apply --version 1
  garage_retry "$dir/n0/garage.toml" bucket create aula
  garage_retry "$dir/n0/garage.toml" key import -n aula "$GARAGE_KEY_ID" "$GARAGE_SECRET" --yes
  garage_retry "$dir/n0/garage.toml" bucket allow --read --write --owner aula --key "$GARAGE_KEY_ID"
  GARAGE_ENDPOINTS=$(IFS=,; echo "${eps[*]}")
  export GARAGE_ENDPOINTS GARAGE_KEY_ID GARAGE_SECRET GARAGE_PIDS
}

# garage_retry CONFIG ARGS…: a garage CLI command, retried for up to 30 s
# while the cluster settles.
garage_retry() {
  local cfg=$1 out
  shift
  for _ in $(seq 100); do
    out=$("$AULA_GARAGE" -c "$cfg" "$@" 2>&1) && return 0
    sleep 0.3
  done
  die "garage $*: $out"
}

# garage_credentials FILE: write the key and endpoints as an
# aula-imager/aula-bootserver credentials file (mode 0600).
garage_credentials() {
  (umask 077 && printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\nAWS_ENDPOINT_URL=%s\nAWS_REGION=garage\n' \
    "$GARAGE_KEY_ID" "$GARAGE_SECRET" "$GARAGE_ENDPOINTS" > "$1")
}

#!/usr/bin/env bash
# Used by bench-swarm: a swarm member that asks one peer for every chunk of
# an image over and over, three at a time, as fast as the links allow.
# Usage: swarm-loader.sh REPO_URL IMAGE VERSION PEER_IP IDS_FILE
# LOADER_TOKEN: the credential it joins with (a repository read token);
# LOADER_VIEW_TOKEN: one that may list the members (API or viewer token).
# Prints the bytes of each chunk received, one per line.
set -euo pipefail
url=$1 image=$2 version=$3 peer=$4 ids=$5
join=$(curl -sfk -H "Authorization: Bearer $LOADER_TOKEN" -X POST -d "{\"image\":\"$image\",\"version\":$version}" "$url/v1/swarm/join")
token=$(printf '%s' "$join" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
# The peer's chunk server, once it has joined.
addr=""
while [ -z "$addr" ]; do
  addr=$(curl -sfk -H "Authorization: Bearer $LOADER_VIEW_TOKEN" "$url/v1/swarm" | python3 -c '
import json, sys
for s in json.load(sys.stdin)["sessions"]:
    for m in s["members"]:
        if m["addr"] and m["addr"].startswith(sys.argv[1] + ":"):
            print(m["addr"])' "$peer" | head -1)
  [ -n "$addr" ] || sleep 0.05
done
config=$(mktemp)
trap 'rm -f "$config"' EXIT
while read -r id; do
  printf 'url = "http://%s/v1/swarm/chunks/%s"\noutput = "/dev/null"\n' "$addr" "$id"
done < "$ids" > "$config"
while :; do
  curl -s --parallel --parallel-max 3 -H "Authorization: Bearer $token" -w '%{size_download}\n' -K "$config" || sleep 0.05
done

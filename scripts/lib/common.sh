# Shared helpers for Aula's scripts. Source it; do not run it.
# shellcheck shell=bash

AULA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export AULA_ROOT

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "$0 needs root (loop mounts, cache drops, network namespaces)"; }

# Install Debian packages that are missing (no-op when all are present).
apt_need() {
  local missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  # QEMU 7.2 (bookworm) conflicts with a newer qemu-utils from backports:
  # take bookworm's along with it.
  case " ${missing[*]} " in
    *" qemu-system-x86 "*) missing+=(qemu-utils/bookworm) ;;
  esac
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" >/dev/null
}

# Install the Debian packages listed in scripts/deps/FILE (one a line, '#'
# comments), saying first which ones the caller needs.
apt_need_list() { # FILE
  local f="$AULA_ROOT/scripts/deps/$1" pkgs
  pkgs=$(grep -v '^[[:space:]]*#' "$f" | tr '\n' ' ')
  log "$(basename "$0") needs Debian packages (scripts/deps/$1): $pkgs"
  # shellcheck disable=SC2086 # one package a word
  apt_need $pkgs
}

# Build the release binaries once.
build_release() {
  log "building release binaries"
  (cd "$AULA_ROOT" && cargo build --release --quiet --workspace) || die "cargo build failed"
  AULA_IMAGER="$AULA_ROOT/target/release/aula-imager"
  export AULA_IMAGER
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# now_s: seconds since the epoch with nanoseconds.
now_s() { date +%s.%N; }

# median of the arguments (numbers).
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# ratio A B → A/B with 3 decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "inf"; else printf "%.3f", a / b }'; }

# Build the realistic ext4 benchmark file (see shared/notes/baseline.md):
# a 4 GiB ext4 holding copies of /usr (900 MiB, then 300 MiB of it again),
# 200 MiB of random files, 100 MiB of zero-filled files, and 512 MiB of
# random data written, synced and deleted (stale data in free space).
# Usage: mkbenchfs OUT_FILE [SIZE_MIB] — knobs: USR_MB DUP_MB RAND_MB ZERO_MB JUNK_MB
# shellcheck shell=bash

# bench_fill10m DIR COUNT SOURCE PREFIX SUFFIX: COUNT files of 10 MiB read
# from SOURCE, named PREFIX<i>SUFFIX (shared with mkbenchntfs.sh).
bench_fill10m() {
  local dir=$1 count=$2 src=$3 prefix=$4 suffix=$5 i
  mkdir -p "$dir"
  for ((i = 0; i < count; i++)); do head -c 10M "$src" > "$dir/$prefix$i$suffix"; done
}

# bench_stale_junk MNT MIB: random data written, synced and deleted, so the
# free space holds stale data that an imager must not copy.
bench_stale_junk() {
  head -c "${2}M" /dev/urandom > "$1/junk"
  sync
  rm -f "$1/junk"
  sync
}

mkbenchfs() {
  local out=$1 size_mb=${2:-4096}
  local usr_mb=${USR_MB:-900} dup_mb=${DUP_MB:-300} rand_mb=${RAND_MB:-200} zero_mb=${ZERO_MB:-100} junk_mb=${JUNK_MB:-512}
  local stamp="$out.params"
  local params="v1 $size_mb $usr_mb $dup_mb $rand_mb $zero_mb $junk_mb"
  if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$params" ]; then
    log "reusing $out ($params)"
    return 0
  fi
  rm -f "$out" "$stamp"
  log "building $out: ${size_mb} MiB ext4 ($params)"
  truncate -s "${size_mb}M" "$out"
  mkfs.ext4 -q -F -L aula-bench "$out"
  local mnt
  mnt=$(mktemp -d /tmp/aula-mnt.XXXXXX)
  mount -o loop "$out" "$mnt" || { rmdir "$mnt"; die "cannot loop-mount $out"; }
  # Files from /usr in a fixed pseudo-random order (hash of the path).
  find /usr -xdev -type f -size -64M -readable 2>/dev/null |
    awk '{ h = 0; for (i = 1; i <= length($0); i++) h = (h * 31 + index("abcdefghijklmnopqrstuvwxyz0123456789/._-", substr($0, i, 1))) % 1000003; printf "%07d %s\n", h, $0 }' |
    sort | cut -d' ' -f2- > "$mnt/.list"
  python3 - "$mnt" "$usr_mb" "$dup_mb" <<'PY'
import os, shutil, sys
mnt, usr_mb, dup_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paths = open(os.path.join(mnt, ".list")).read().split("\n")
def copy(limit, dest):
    done = 0
    for n, p in enumerate(paths):
        if not p or done >= limit:
            continue
        try:
            size = os.path.getsize(p)
            d = os.path.join(mnt, dest, "%02d" % (n % 97))
            os.makedirs(d, exist_ok=True)
            shutil.copyfile(p, os.path.join(d, "%d-%s" % (n, os.path.basename(p))))
            done += size
        except OSError:
            pass
copy(usr_mb << 20, "usr")
copy(dup_mb << 20, "usr-again")
PY
  rm -f "$mnt/.list"
  bench_fill10m "$mnt/random" $((rand_mb / 10)) /dev/urandom r ""
  bench_fill10m "$mnt/zero" $((zero_mb / 10)) /dev/zero z ""
  bench_stale_junk "$mnt" "$junk_mb"
  umount "$mnt"
  rmdir "$mnt"
  e2fsck -fn "$out" >/dev/null 2>&1 || die "benchmark filesystem $out is not clean"
  echo "$params" > "$stamp"
}

# Build the NTFS benchmark file of bench-imaging: an mkntfs volume (3 GiB by
# default) filled through ntfs-3g with a Windows-like mix — many small files
# (files under 256 KiB from /usr, like a Windows system tree), large
# compressible files (files of 1 MiB and more from /usr, like DLLs and
# installers), incompressible files (random, like media and cabinets),
# zero-filled files (like a preallocated pagefile) and random data written,
# synced and deleted (stale data in free space).
# Usage: mkbenchntfs OUT_FILE [SIZE_MIB] — knobs: NTFS_SMALL_MB NTFS_BIG_MB
#        NTFS_RAND_MB NTFS_ZERO_MB NTFS_JUNK_MB
# Needs bench_fill10m and bench_stale_junk from mkbenchfs.sh (source it first).
# shellcheck shell=bash

mkbenchntfs() {
  local out=$1 size_mb=${2:-3072}
  local small_mb=${NTFS_SMALL_MB:-500} big_mb=${NTFS_BIG_MB:-500} rand_mb=${NTFS_RAND_MB:-300}
  local zero_mb=${NTFS_ZERO_MB:-100} junk_mb=${NTFS_JUNK_MB:-512}
  local stamp="$out.params"
  local params="ntfs-v1 $size_mb $small_mb $big_mb $rand_mb $zero_mb $junk_mb"
  if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$params" ]; then
    log "reusing $out ($params)"
    return 0
  fi
  rm -f "$out" "$stamp"
  log "building $out: ${size_mb} MiB NTFS through ntfs-3g ($params)"
  truncate -s "${size_mb}M" "$out"
  mkntfs -q -F -f -L aula-bench "$out" >/dev/null 2>&1 || die "mkntfs failed on $out"
  local mnt
  mnt=$(mktemp -d /tmp/aula-mnt.XXXXXX)
  ntfs-3g "$out" "$mnt" || { rmdir "$mnt"; die "cannot mount $out with ntfs-3g"; }
  # Files from /usr in a fixed pseudo-random order (hash of the path).
  find /usr -xdev -type f -readable 2>/dev/null |
    awk '{ h = 0; for (i = 1; i <= length($0); i++) h = (h * 31 + index("abcdefghijklmnopqrstuvwxyz0123456789/._-", substr($0, i, 1))) % 1000003; printf "%07d %s\n", h, $0 }' |
    sort | cut -d' ' -f2- > "$W/.ntfs-list"
  python3 - "$mnt" "$W/.ntfs-list" "$small_mb" "$big_mb" <<'PY'
import os, shutil, sys
mnt, listing, small_mb, big_mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
paths = [p for p in open(listing).read().split("\n") if p]
def copy(limit, dest, lo, hi):
    done = 0
    for n, p in enumerate(paths):
        if done >= limit:
            break
        try:
            size = os.path.getsize(p)
            if not (lo <= size < hi):
                continue
            d = os.path.join(mnt, dest, "%02d" % (n % 97))
            os.makedirs(d, exist_ok=True)
            shutil.copyfile(p, os.path.join(d, "%d-%s" % (n, os.path.basename(p))))
            done += size
        except OSError:
            pass
copy(small_mb << 20, "Windows/System32", 1, 256 << 10)
copy(big_mb << 20, "Program Files", 1 << 20, 64 << 20)
PY
  rm -f "$W/.ntfs-list"
  bench_fill10m "$mnt/Users/media" $((rand_mb / 10)) /dev/urandom m .cab
  bench_fill10m "$mnt/zero" $((zero_mb / 10)) /dev/zero pagefile .sys
  bench_stale_junk "$mnt" "$junk_mb"
  umount "$mnt"
  rmdir "$mnt"
  ntfsfix -n "$out" >/dev/null 2>&1 || die "benchmark filesystem $out is not clean"
  echo "$params" > "$stamp"
}

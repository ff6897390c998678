# Helpers shared by live-image/build and live-image/refdisk. Source it; do not run it.
# shellcheck shell=bash
#
# Callers set WORK (cache directory) before calling these functions and have
# sourced scripts/lib/common.sh (log, die, apt_need).

# kernel_resolve: sets KPKG (linux-image-<abi>-amd64) and KVER (<abi>-amd64)
# from linux-image-amd64's dependency, updating the apt lists once if needed.
# KERNEL_PACKAGE=linux-image-… pins another package.
kernel_resolve() {
  KPKG=${KERNEL_PACKAGE:-}
  if [ -z "$KPKG" ]; then
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$KPKG" ]; then
      log "apt lists do not know linux-image-amd64; running apt-get update"
      apt-get update -qq >/dev/null
      KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
  fi
  [ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-amd64"
  KVER=${KPKG#linux-image-}
  export KPKG KVER
}

# kernel_fetch: downloads (never installs) the kernel package and extracts
# vmlinuz, the config and the module tree without the driver classes a live
# imaging system never needs, then runs depmod. Cached in $WORK/kernel/$KVER.
# Sets KROOT (a tree with boot/ and lib/modules/$KVER) and VMLINUZ.
kernel_fetch() {
  kernel_resolve
  local kdir=$WORK/kernel/$KVER
  KROOT=$kdir/root
  VMLINUZ=$KROOT/boot/vmlinuz-$KVER
  export KROOT VMLINUZ
  if [ -f "$kdir/.done" ] && [ -f "$VMLINUZ" ]; then
    return 0
  fi
  log "fetching $KPKG (download only, not installed)"
  rm -rf "$kdir"
  mkdir -p "$kdir/deb" "$KROOT"
  # _apt cannot write into root-owned work dirs; download as root quietly.
  (cd "$kdir/deb" && apt-get download -q "$KPKG" 2>&1 | grep -v -e '^W: Download is performed unsandboxed' >&2) ||
    { apt-get update -qq >/dev/null && (cd "$kdir/deb" && apt-get download -q "$KPKG" >/dev/null 2>&1); } ||
    die "apt-get download $KPKG failed"
  local deb
  deb=$(ls "$kdir"/deb/*.deb)
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$KROOT" \
    --wildcards './boot/vmlinuz-*' './boot/config-*' './lib/modules/*' \
    --exclude='*/kernel/drivers/gpu' --exclude='*/kernel/drivers/media' \
    --exclude='*/kernel/drivers/net/wireless' --exclude='*/kernel/sound' \
    --exclude='*/kernel/drivers/staging' --exclude='*/kernel/drivers/infiniband' \
    --exclude='*/kernel/drivers/iio' --exclude='*/kernel/drivers/bluetooth' \
    --exclude='*/kernel/net/bluetooth' --exclude='*/kernel/net/wireless' \
    --exclude='*/kernel/net/mac80211' --exclude='*/kernel/drivers/input/touchscreen'
  depmod -b "$KROOT" "$KVER"
  rm -f "$deb"
  touch "$kdir/.done"
}

# kernel_config_has OPTION: true if the kernel config sets OPTION=y.
kernel_config_has() {
  grep -qx "$1=y" "$KROOT/boot/config-$KVER"
}

# modules_closure NAME...: prints the .ko paths (relative to the module tree)
# needed for NAMEs, dependencies first, each once. Names the kernel has built
# in are skipped; unknown names are an error unless OPTIONAL_MODULES=1.
modules_closure() {
  local name line paths=() seen=""
  for name in "$@"; do
    if ! line=$(modprobe -d "$KROOT" -S "$KVER" --show-depends "$name" 2>&1); then
      [ "${OPTIONAL_MODULES:-0}" = 1 ] && { log "module $name: not in $KVER, skipped"; continue; }
      die "module $name: $line"
    fi
    while read -r kind path _; do
      [ "$kind" = insmod ] || continue
      path=${path#"$KROOT/lib/modules/$KVER/"}
      case " $seen " in *" $path "*) continue ;; esac
      seen="$seen $path"
      paths+=("$path")
    done <<<"$line"
  done
  [ ${#paths[@]} -eq 0 ] || printf '%s\n' "${paths[@]}"
}

# install_modules ROOT NAME...: copies the closure of NAMEs into
# ROOT/lib/modules/$KVER with the kernel's modules.builtin*/order and runs
# depmod there, so the guest's modprobe resolves names and aliases.
install_modules() {
  local root=$1 rel
  shift
  local mdir=$root/lib/modules/$KVER
  mkdir -p "$mdir"
  while read -r rel; do
    [ -n "$rel" ] || continue
    mkdir -p "$mdir/$(dirname "$rel")"
    cp -p "$KROOT/lib/modules/$KVER/$rel" "$mdir/$rel"
  done < <(modules_closure "$@")
  cp -p "$KROOT/lib/modules/$KVER"/modules.{builtin,builtin.modinfo,order} "$mdir/"
  depmod -b "$root" "$KVER"
  # Binary indexes are for kmod; busybox modprobe reads the text files.
  rm -f "$mdir"/*.bin
}

# copy_elf ROOT FILE...: copies each executable to the same path under ROOT,
# plus its shared libraries (copy_libs). Symlinks are copied as symlinks and
# followed.
copy_elf() {
  local root=$1 f
  shift
  for f in "$@"; do
    [ -e "$f" ] || die "copy_elf: $f does not exist"
    copy_path "$root" "$f"
    copy_libs "$root" "$f"
  done
}

# copy_libs ROOT FILE: copies every shared library ldd names for FILE and the
# dynamic loader into ROOT (nothing for static executables and scripts).
copy_libs() {
  local root=$1 real lib
  real=$(readlink -f "$2")
  ldd "$real" >/dev/null 2>&1 || return 0
  while read -r lib; do
    copy_path "$root" "$lib"
  done < <(ldd "$real" | awk '/=> \// {print $3} /^\t\/[^ ]+ \(0x/ {print $1}')
}

# copy_path ROOT PATH: copies PATH (following and recreating symlinks) into ROOT.
copy_path() {
  local root=$1 p=$2 target
  [ -e "$root$p" ] || [ -L "$root$p" ] && [ ! -L "$p" ] && cmp -s "$p" "$root$p" && return 0
  mkdir -p "$root$(dirname "$p")"
  if [ -L "$p" ]; then
    target=$(readlink "$p")
    ln -sfn "$target" "$root$p"
    case $target in
      /*) copy_path "$root" "$target" ;;
      *) copy_path "$root" "$(dirname "$p")/$target" ;;
    esac
  else
    cp -pf "$p" "$root$p"
  fi
}

# install_busybox ROOT: the static busybox and a link for every applet,
# without replacing files already in ROOT.
install_busybox() {
  local root=$1 applet
  local bb=/bin/busybox
  file -L "$bb" 2>/dev/null | grep -q 'statically linked' ||
    die "$bb is not the static busybox (install busybox-static)"
  mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
  cp -pf "$bb" "$root/bin/busybox"
  while read -r applet; do
    [ -n "$applet" ] || continue
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done < <("$bb" --list-full)
}

# make_cpio ROOT OUT: packs ROOT into a newc cpio compressed by $COMPRESS
# (zstd or gzip), with files owned by root and stable order and timestamps.
make_cpio() {
  local root=$1 out=$2
  local comp=(gzip -9 -n)
  [ "${COMPRESS:-gzip}" = zstd ] && comp=(zstd -q -19 -T0 --stdout)
  [ "${COMPRESS:-gzip}" = none ] && comp=(cat)
  (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    "${comp[@]}" >"$out.tmp"
  mv -f "$out.tmp" "$out"
}

# pe_signature_size FILE: prints the size of the Authenticode signature
# table of a PE32+ image (its security data directory), 0 when unsigned.
pe_signature_size() {
  local f=$1 pe magic
  pe=$(od -An -t u4 -j 60 -N 4 "$f" | tr -d ' ')
  [ "$(od -An -c -j "$pe" -N 2 "$f" | tr -d ' ')" = PE ] || { echo 0; return; }
  magic=$(od -An -t x2 -j $((pe + 24)) -N 2 "$f" | tr -d ' ')
  [ "$magic" = 020b ] || { echo 0; return; }
  # PE32+: data directories at optional header + 112; the security one is 5th.
  od -An -t u4 -j $((pe + 24 + 112 + 4 * 8 + 4)) -N 4 "$f" | tr -d ' '
}

# signed_chain_fetch: downloads (never installs) shim-signed and
# grub-efi-amd64-signed and extracts the Microsoft-signed shim and Debian's
# signed GRUB images: the network one (GRUBNET) and the disk one (GRUBEFI,
# for the reference Secure Boot disk). Cached in $WORK/signed. Sets SHIM,
# GRUBNET and GRUBEFI.
# The kernel of linux-image-<abi>-amd64 is already Debian-signed (the
# unsigned build is the -unsigned package); check_signed checks all three.
signed_chain_fetch() {
  local sdir=$WORK/signed pkg deb
  SHIM=$sdir/root/usr/lib/shim/shimx64.efi.signed
  GRUBNET=$sdir/root/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed
  GRUBEFI=$sdir/root/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed
  export SHIM GRUBNET GRUBEFI
  if [ -f "$sdir/.done" ] && [ -f "$SHIM" ] && [ -f "$GRUBNET" ] && [ -f "$GRUBEFI" ]; then
    return 0
  fi
  log "fetching shim-signed and grub-efi-amd64-signed (download only, not installed)"
  rm -rf "$sdir"
  mkdir -p "$sdir/deb" "$sdir/root"
  for pkg in shim-signed grub-efi-amd64-signed; do
    (cd "$sdir/deb" && apt-get download -q "$pkg" 2>&1 | grep -v -e '^W: Download is performed unsandboxed' >&2) ||
      { apt-get update -qq >/dev/null && (cd "$sdir/deb" && apt-get download -q "$pkg" >/dev/null 2>&1); } ||
      die "apt-get download $pkg failed"
  done
  for deb in "$sdir"/deb/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$sdir/root" \
      --wildcards './usr/lib/shim/shimx64.efi.signed' './usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed' \
      './usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed' \
      2>/dev/null || true
  done
  [ -f "$SHIM" ] || die "shim-signed holds no usr/lib/shim/shimx64.efi.signed"
  [ -f "$GRUBNET" ] || die "grub-efi-amd64-signed holds no grubnetx64.efi.signed"
  [ -f "$GRUBEFI" ] || die "grub-efi-amd64-signed holds no grubx64.efi.signed"
  (cd "$sdir/deb" && ls) >"$sdir/packages.txt"
  rm -f "$sdir"/deb/*.deb
  touch "$sdir/.done"
}

# check_signed FILE...: dies unless every FILE carries an Authenticode signature.
check_signed() {
  local f n
  for f in "$@"; do
    n=$(pe_signature_size "$f")
    [ "${n:-0}" -gt 0 ] || die "$f is not a signed EFI image"
  done
}

# QEMU helpers for Aula's VM tests (scripts/e2e, scripts/test-disk-boot).
# Source after common.sh; do not run. One VM at a time: the helpers keep the
# running VM's PID in VM_PID and its start time in VM_T0.
# shellcheck shell=bash

OVMF_CODE=${OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
OVMF_VARS_TEMPLATE=${OVMF_VARS_TEMPLATE:-/usr/share/OVMF/OVMF_VARS_4M.fd}
# Secure Boot: the SMM build and variables with Microsoft's keys enrolled.
OVMF_SB_CODE=${OVMF_SB_CODE:-/usr/share/OVMF/OVMF_CODE_4M.secboot.fd}
OVMF_SB_VARS_TEMPLATE=${OVMF_SB_VARS_TEMPLATE:-/usr/share/OVMF/OVMF_VARS_4M.ms.fd}
VM_TIMEOUT_S=${VM_TIMEOUT_S:-300}
VM_PID=""
VM_T0=""

# vm_accel: the QEMU accelerator. KVM on these machines is PVM, which runs
# only PVM-aware guests (shared/notes/e2e-boot.md §2), so TCG unless ACCEL=kvm.
vm_accel() { echo "${ACCEL:-tcg}"; }

# stamp: copies stdin to stdout, each line prefixed with the epoch time
# (seconds.microseconds) at which it was complete.
stamp() {
  local l
  while IFS= read -r l || [ -n "$l" ]; do
    printf '%s %s\n' "$EPOCHREALTIME" "$l"
  done
}

# vm_common_args: the machine every test boots (q35, 1 CPU, 1 GiB, serial on stdio).
vm_common_args() {
  printf '%s\n' -accel "$(vm_accel)" -M q35 -cpu max -smp 1 -m 1024 \
    -nographic -monitor none -serial stdio -no-reboot
}

# vm_disk_args FILE: the machine's disk: DISK_MODEL=virtio (default), nvme or
# sata (q35's AHCI controller).
vm_disk_args() {
  # bootindex=2: after the NIC (bootindex=1). With a QEMU boot order, OVMF
  # drops devices that have none, so a local boot (iPXE "exit") would never
  # reach the disk.
  case ${DISK_MODEL:-virtio} in
    virtio) printf '%s\n' -drive "file=$1,format=raw,if=none,id=d0" -device "virtio-blk-pci,drive=d0,bootindex=2" ;;
    nvme) printf '%s\n' -drive "file=$1,format=raw,if=none,id=d0" -device "nvme,drive=d0,serial=aula0,bootindex=2" ;;
    sata) printf '%s\n' -drive "file=$1,format=raw,if=none,id=d0" -device "ide-hd,drive=d0,bus=ide.0,bootindex=2" ;;
    *) die "DISK_MODEL must be virtio, nvme or sata" ;;
  esac
}

# vm_uefi_args VARS_COPY: pflash drives for OVMF with a private copy of the variables.
vm_uefi_args() {
  cp -f "$OVMF_VARS_TEMPLATE" "$1"
  # IPv6 network boot off, as lab PCs usually have it: the boot network has
  # no DHCPv6 server, and OVMF would spend ~70 s on PXEv6 before trying the
  # disk when a machine boots locally.
  printf '%s\n' -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE" \
    -drive "if=pflash,format=raw,unit=1,file=$1" \
    -fw_cfg name=opt/org.tianocore/IPv6PXESupport,string=n
}

# vm_uefi_sb_args VARS_COPY: OVMF with Secure Boot on (SMM, secure flash,
# Microsoft keys enrolled), with a private copy of the variables.
vm_uefi_sb_args() {
  cp -f "$OVMF_SB_VARS_TEMPLATE" "$1"
  printf '%s\n' -machine smm=on -global driver=cfi.pflash01,property=secure,value=on \
    -global ICH9-LPC.disable_s3=1 \
    -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_SB_CODE" \
    -drive "if=pflash,format=raw,unit=1,file=$1" \
    -fw_cfg name=opt/org.tianocore/IPv6PXESupport,string=n
}

# vm_start LOG [NETNS] -- QEMU-ARGS...: starts QEMU in the background (inside
# NETNS when given) under `timeout $VM_TIMEOUT_S`, its console time-stamped
# into LOG. Sets VM_PID and VM_T0 (epoch seconds just before the start).
vm_start() {
  local log=$1 ns=${2:-}
  shift 2
  [ "${1:-}" = -- ] && shift
  [ -z "$VM_PID" ] || die "vm_start: a VM is already running (pid $VM_PID)"
  local pre=() common
  [ -n "$ns" ] && pre=(ip netns exec "$ns")
  mapfile -t common < <(vm_common_args)
  : >"$log"
  VM_T0=$EPOCHREALTIME
  "${pre[@]}" timeout "$VM_TIMEOUT_S" qemu-system-x86_64 "${common[@]}" "$@" \
    </dev/null > >(stamp >>"$log") 2>&1 &
  VM_PID=$!
}

# vm_running: true while the VM started last is alive.
vm_running() { [ -n "$VM_PID" ] && kill -0 "$VM_PID" 2>/dev/null; }

# vm_stop: stops the VM (TERM, then KILL after 5 s) and reaps it.
vm_stop() {
  [ -n "$VM_PID" ] || return 0
  if kill -0 "$VM_PID" 2>/dev/null; then
    kill -TERM "$VM_PID" 2>/dev/null || true
    local _
    for _ in $(seq 50); do
      kill -0 "$VM_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$VM_PID" 2>/dev/null || true
  fi
  wait "$VM_PID" 2>/dev/null || true
  VM_PID=""
}

# vm_wait_exit TIMEOUT_S: waits for the VM to exit by itself; false on timeout.
vm_wait_exit() {
  local deadline=$((SECONDS + $1))
  while vm_running; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
  wait "$VM_PID" 2>/dev/null || true
  VM_PID=""
  sleep 0.1 # let the time-stamper drain
}

# log_time LOG REGEX [T0]: seconds from T0 (default VM_T0) to the first line
# of the time-stamped LOG matching the extended REGEX; empty when none.
log_time() {
  local t0=${3:-$VM_T0}
  grep -a -m1 -E -- "$2" "$1" 2>/dev/null |
    awk -v t0="$t0" '{ printf "%.2f\n", $1 - t0 }'
}

# log_line LOG REGEX: the first matching line without its time stamp and CRs.
log_line() {
  grep -a -m1 -E -- "$2" "$1" 2>/dev/null | cut -d' ' -f2- | tr -d '\r' |
    sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g'
}

# wait_for_log LOG REGEX TIMEOUT_S [WHAT]: waits until LOG has a line matching
# REGEX; fails (returns 1) when the VM exits first or the time runs out.
wait_for_log() {
  local log=$1 re=$2 deadline=$((SECONDS + $3))
  while ! grep -a -q -E -- "$re" "$log" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "timeout after $3 s waiting for ${4:-/$re/} in $log"
      return 1
    fi
    if [ -n "$VM_PID" ] && ! vm_running; then
      sleep 0.2
      grep -a -q -E -- "$re" "$log" 2>/dev/null && return 0
      log "the VM exited before ${4:-/$re/} appeared in $log"
      return 1
    fi
    sleep 0.1
  done
}

# show_tail FILE [N]: the last N lines of FILE, escape sequences removed, for failure reports.
show_tail() {
  local n=${2:-40}
  [ -f "$1" ] || return 0
  printf -- '----- last %s lines of %s -----\n' "$n" "$1" >&2
  tail -n "$n" "$1" | tr -d '\r' | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g' >&2
  printf -- '----- end of %s -----\n' "$1" >&2
}

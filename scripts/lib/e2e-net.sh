# Network-namespace helpers for Aula's VM tests. Source after common.sh.
# The namespace holds a bridge with the boot network's addresses
# (10.213.0.1/24, fd00:213::1/64) and one tap for the VM; nothing in it is
# routed anywhere, so guest traffic never leaves it.
# shellcheck shell=bash

E2E_BRIDGE=aulabr0
E2E_TAP=aulatap0
E2E_ADDR4=10.213.0.1
E2E_ADDR6=fd00:213::1

# netns_up NS: creates NS with the bridge and the tap (deleting a stale NS of that name).
netns_up() {
  local ns=$1
  ip netns del "$ns" 2>/dev/null || true
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add "$E2E_BRIDGE" type bridge
  ip -n "$ns" link set "$E2E_BRIDGE" type bridge stp_state 0 forward_delay 0
  ip -n "$ns" addr add "$E2E_ADDR4/24" dev "$E2E_BRIDGE"
  ip -n "$ns" -6 addr add "$E2E_ADDR6/64" dev "$E2E_BRIDGE" nodad
  ip -n "$ns" link set "$E2E_BRIDGE" up
  ip netns exec "$ns" ip tuntap add dev "$E2E_TAP" mode tap
  ip -n "$ns" link set "$E2E_TAP" master "$E2E_BRIDGE"
  ip -n "$ns" link set "$E2E_TAP" up
}

# netns_down NS: deletes NS (with its bridge and tap); no error when absent.
netns_down() { ip netns del "$1" 2>/dev/null || true; }

# vm_nic_args MAC [ROMFILE]: QEMU arguments for a virtio NIC on the namespace's
# tap, first in the boot order. Without ROMFILE the NIC has QEMU's iPXE ROM;
# "none" leaves it without one (UEFI then uses OVMF's own PXE client).
# NIC_MODEL picks the QEMU NIC (virtio-net-pci, e1000, e1000e, rtl8139 …).
vm_nic_args() {
  local rom=""
  [ "${2:-}" = none ] && rom=",romfile="
  [ -n "${2:-}" ] && [ "$2" != none ] && rom=",romfile=$2"
  printf '%s\n' -netdev "tap,id=n0,ifname=$E2E_TAP,script=no,downscript=no" \
    -device "${NIC_MODEL:-virtio-net-pci},netdev=n0,mac=$1,bootindex=1$rom"
}

# http_ok NS URL: true when URL answers 2xx from inside NS.
http_ok() { ip netns exec "$1" curl -fsS -o /dev/null --max-time 2 "$2" 2>/dev/null; }

# wait_http NS URL TIMEOUT_S: waits until URL answers inside NS.
wait_http() {
  local deadline=$((SECONDS + $3))
  until http_ok "$1" "$2"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# wait_https NS URL TIMEOUT_S: waits until an https URL answers inside NS
# (liveness only: the certificate is checked by the callers that follow).
wait_https() {
  local deadline=$((SECONDS + $3))
  until ip netns exec "$1" curl -fsS -k -o /dev/null --max-time 2 "$2" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

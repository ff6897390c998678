# The end-to-end flow with aula-bootserver as the core (E2E_CORE=deployments):
# a room of QEMU machines re-imaged by ONE call to the deployment API
# (POST /v1/deployments), then watched through GET /v1/deployments/{id}
# while the script plays the machines' power buttons and keeps its own
# checks of each step (PXE → live system → restored disk → restored OS).
#
# Source it from scripts/e2e after the boot server runs and the reference
# images are published; needs NS, HTTPS_URL, SERVER_PIN, API_TOKEN, W, the
# server_api helper of e2e-core.sh and the vm_* helpers. One VM runs at a time (two cores), so the
# deployment restores one machine at a time (max_concurrent 1); the machines
# waiting for their turn stay in "waking" (their one-shot live boot is set).
# shellcheck shell=bash

DEMO_MACHINES=${DEMO_MACHINES:-2}
DEMO_IMAGE=${DEMO_IMAGE:-ref-bios}
DEMO_ROOM=${DEMO_ROOM:-Demo room}
# The console is forwarded from the host's 127.0.0.1:DEMO_CONSOLE_PORT (the
# first free port from there) into the namespace, while the demo runs and
# DEMO_HOLD seconds after it ends.
DEMO_CONSOLE_PORT=${DEMO_CONSOLE_PORT:-8443}
DEMO_HOLD=${DEMO_HOLD:-0}
FORWARD_PID=""

# api METHOD PATH [JSON]: the boot server's API over HTTPS (its certificate
# pinned) with the API token; prints the body.
api() {
  local args=(--max-time 10 -X "$1")
  [ -n "${3:-}" ] && args+=(-H 'Content-Type: application/json' -d "$3")
  server_api "${args[@]}" "$HTTPS_URL$2"
}

# jget JSON EXPR: a value from JSON (python3 expression over `d`).
jget() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2"; }

# console_forward: forwards 127.0.0.1:PORT on the host to the server's
# HTTPS listener in the namespace (socat, one `ip netns exec` per
# connection), checks the console answers through it with the server's
# pinned certificate, and sets CONSOLE_PORT and CONSOLE_URL.
console_forward() {
  local port=$DEMO_CONSOLE_PORT last=$((DEMO_CONSOLE_PORT + 20))
  while [ "$port" -le "$last" ]; do
    if ! ss -Hltn "sport = :$port" | grep -q .; then
      socat "TCP4-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" \
        "EXEC:ip netns exec $NS socat STDIO TCP4\:$E2E_ADDR4\:8443" 2>>"$W/console-forward.log" &
      FORWARD_PID=$!
      local i
      for i in $(seq 1 20); do
        ss -Hltn "sport = :$port" | grep -q . && break
        sleep 0.1
      done
      if curl -fsS --max-time 5 -k --pinnedpubkey "$SERVER_PIN" -o /dev/null "https://127.0.0.1:$port/"; then
        CONSOLE_PORT=$port
        CONSOLE_URL=https://127.0.0.1:$port
        return 0
      fi
      kill "$FORWARD_PID" 2>/dev/null || true
      wait "$FORWARD_PID" 2>/dev/null || true
      FORWARD_PID=""
    fi
    port=$((port + 1))
  done
  return 1
}

# console_forward_stop: ends the forwarder (cleanup calls it).
console_forward_stop() {
  [ -n "$FORWARD_PID" ] || return 0
  kill "$FORWARD_PID" 2>/dev/null || true
  wait "$FORWARD_PID" 2>/dev/null || true
  FORWARD_PID=""
}

# demo_mac N: the MAC of demo machine N.
demo_mac() { printf '52:54:00:a0:2b:%02x' "$1"; }

# demo_vm_args N: QEMU arguments of demo machine N (SeaBIOS, PXE first).
demo_vm_args() {
  local disk=$W/disk-demo-$1.raw
  vm_nic_args "$(demo_mac "$1")"
  vm_disk_args "$disk"
  printf '%s\n' -boot n
}

# demo_power_on N: "presses the power button" of machine N (a blank disk on
# the first boot) and checks it reaches the live system.
demo_power_on() {
  local n=$1 args
  CUR_SERIAL=$W/serial-demo-$n.log
  [ -f "$W/disk-demo-$n.raw" ] || truncate -s 256M "$W/disk-demo-$n.raw"
  mapfile -t args < <(demo_vm_args "$n")
  step "power on demo-pc$(printf %02d "$n") (PXE)"
  vm_start "$CUR_SERIAL" "$NS" -- "${args[@]}"
  wait_for_log "$CUR_SERIAL" 'iPXE initialising|iPXE 1\.' 45 "the iPXE banner" || fail "iPXE did not start"
  wait_for_log "$CUR_SERIAL" 'Linux version' 60 "the live kernel" || fail "the live kernel did not start"
  wait_for_log "$CUR_SERIAL" 'AULA-LIVE-READY ip=10\.213\.' "$BOOT_TIMEOUT_S" "AULA-LIVE-READY" ||
    fail "the live system did not report AULA-LIVE-READY"
  log "demo-pc$(printf %02d "$n"): live system up; the deployment takes it from here"
}

# demo_boot_restored N: machine N rebooted after its restore; boot it from
# its disk and check the restored OS's marker.
demo_boot_restored() {
  local n=$1 args
  vm_wait_exit 60 || fail "demo-pc$(printf %02d "$n") did not restart after the deployment's reboot"
  CUR_SERIAL=$W/serial-demo-local-$n.log
  mapfile -t args < <(demo_vm_args "$n")
  step "boot demo-pc$(printf %02d "$n") again: the server now hands it local boot"
  vm_start "$CUR_SERIAL" "$NS" -- "${args[@]}"
  wait_for_log "$CUR_SERIAL" "AULA-REFERENCE-OS-BOOTED" 120 "the restored OS's marker" ||
    fail "the restored OS did not boot from disk (no AULA-REFERENCE-OS-BOOTED)"
  log "demo-pc$(printf %02d "$n"): the restored OS booted ($(log_line "$CUR_SERIAL" 'AULA-REFERENCE-OS-BOOTED'))"
  vm_wait_exit 30 || vm_stop
}

deploy_demo() {
  local i body dep id
  step "the room, its machines and an operator, through the console API"
  api POST /v1/rooms '{"name":"'"$DEMO_ROOM"'","description":"QEMU machines of scripts/demo"}' >/dev/null ||
    fail "POST /v1/rooms failed"
  for i in $(seq 1 "$DEMO_MACHINES"); do
    api POST /v1/machines '{"mac":"'"$(demo_mac "$i")"'","name":"demo-pc'"$(printf %02d "$i")"'","room":"'"$DEMO_ROOM"'","seat":'"$i"'}' >/dev/null ||
      fail "POST /v1/machines failed"
    rm -f "$W/disk-demo-$i.raw"
  done
  local password
  password=demo-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf '%s\n' "$password" | "$BOOTSERVER" user add demo --users-file "$W/server/data/users.toml" >/dev/null ||
    fail "aula-bootserver user add failed"

  step "ONE call: POST /v1/deployments (room \"$DEMO_ROOM\", image $DEMO_IMAGE, whole disk 1, reboot into it)"
  body='{"room":"'"$DEMO_ROOM"'","image":"'"$DEMO_IMAGE"'","disk":1,"method":"unicast","after":"reboot-local","max_concurrent":1}'
  dep=$(api POST /v1/deployments "$body") || fail "POST /v1/deployments was refused"
  id=$(jget "$dep" 'd["id"]')
  console_forward || fail "could not forward the console to 127.0.0.1 (ports $DEMO_CONSOLE_PORT-$((DEMO_CONSOLE_PORT + 20)) taken, or no answer through socat)"
  echo
  echo "  Watch it live in the lab console, from a browser on this machine:"
  echo "    $CONSOLE_URL/#/deployments/$id"
  echo "    user: demo   password: $password"
  echo "  The certificate is the boot server's own (self-signed; accept it once). Its key"
  echo "  is pinned on the machines' kernel line: $SERVER_FP"
  echo "  From another machine: ssh -L $CONSOLE_PORT:127.0.0.1:$CONSOLE_PORT <this host>, then the same URL."
  echo "  (The server runs in network namespace $NS, at $HTTPS_URL; 127.0.0.1 is forwarded there.)"
  [ "$DEMO_HOLD" -gt 0 ] || echo "  Set DEMO_HOLD=600 to keep the console up for 10 minutes after the run."
  echo

  local started=$SECONDS deadline=$((SECONDS + 300 + DEMO_MACHINES * 300)) last="" now states cur="" n state
  declare -A seen_done=()
  while :; do
    [ "$SECONDS" -lt "$deadline" ] || fail "deployment $id did not finish in time"
    dep=$(api GET "/v1/deployments/$id") || fail "GET /v1/deployments/$id failed"
    states=$(jget "$dep" '" ".join(m["name"]+"="+m["state"]+(":"+str(round(100*m["bytes_done"]/m["bytes_total"]))+"%" if m["bytes_total"] else "") for m in d["machines"])')
    if [ "$states" != "$last" ]; then
      log "deployment $id: $states"
      last=$states
    fi
    now=$(jget "$dep" 'd["state"]')
    case $now in finished | cancelled) break ;; esac
    # Power buttons: one machine at a time.
    for i in $(seq 1 "$DEMO_MACHINES"); do
      n=demo-pc$(printf %02d "$i")
      state=$(jget "$dep" '[m["state"] for m in d["machines"] if m["name"]=="'"$n"'"][0]')
      if [ "$state" = failed ]; then
        fail "$n failed: $(jget "$dep" '[m["reason"] for m in d["machines"] if m["name"]=="'"$n"'"][0]')"
      fi
      if [ -z "$cur" ] && [ "$state" = waking ] && [ -z "${seen_done[$i]:-}" ]; then
        cur=$i
        demo_power_on "$i"
      fi
      if [ "$cur" = "$i" ] && [ "$state" = "done" ]; then
        seen_done[$i]=1
        cur=""
        demo_boot_restored "$i"
      fi
    done
    sleep 1
  done
  # The last machine may end in the same poll as the deployment.
  if [ -n "$cur" ]; then
    [ "$(jget "$dep" '[m["state"] for m in d["machines"] if m["name"]=="demo-pc'"$(printf %02d "$cur")"'"][0]')" = "done" ] ||
      fail "demo-pc$(printf %02d "$cur") did not end done"
    seen_done[$cur]=1
    demo_boot_restored "$cur"
  fi
  local ndone nfailed
  ndone=$(jget "$dep" 'd["done"]')
  nfailed=$(jget "$dep" 'd["failed"]')
  if [ "$ndone" != "$DEMO_MACHINES" ] || [ "$nfailed" != 0 ]; then
    fail "deployment $id ended with $ndone done and $nfailed failed of $DEMO_MACHINES"
  fi
  for i in $(seq 1 "$DEMO_MACHINES"); do
    [ -n "${seen_done[$i]:-}" ] || fail "demo-pc$(printf %02d "$i") ended done without the script seeing it boot its OS"
  done
  local images
  images=$(api GET "/v1/machines?room=$(jget "$(api GET /v1/rooms)" '[r["id"] for r in d if r["name"]=="'"$DEMO_ROOM"'"][0]')")
  [ "$(jget "$images" 'sorted(set(m["image"] for m in d["machines"]))')" = "['$DEMO_IMAGE']" ] ||
    fail "the machines do not record $DEMO_IMAGE as their image"
  if [ "$DEMO_HOLD" -gt 0 ]; then
    step "console kept up for ${DEMO_HOLD} s (DEMO_HOLD): $CONSOLE_URL/#/deployments/$id"
    sleep "$DEMO_HOLD"
  fi
  step "done"
  echo
  echo "PASS: one POST /v1/deployments re-imaged the $DEMO_MACHINES machines of \"$DEMO_ROOM\": each was woken, booted the live system, restored $DEMO_IMAGE, was switched to local boot, rebooted and booted the restored OS"
  echo "RESULT deploy_machines=$DEMO_MACHINES deploy_done=$ndone deploy_failed=$nfailed deploy_s=$((SECONDS - started))"
}

# The end-to-end script acting as the core server (as OpenGnsys' ogCore would):
# finds a registered agent, checks its certificate against the fingerprint it
# registered and pins it, calls its CloningEngine API over HTTPS, and follows
# the job through the webhooks the agent posts to the boot server
# (GET /v1/agents/{mac}/events with the read-only viewer token).
# Every call to the boot server is HTTPS pinned to its own certificate.
# Source it; needs E2E netns helpers, NS, HTTPS_URL, SERVER_PIN, API_TOKEN
# and VIEWER_TOKEN.
# shellcheck shell=bash
# shellcheck disable=SC2034 # JOB_* are read by the sourcing script

# server_api ARGS…: curl to the boot server's API with the API token,
# trusting only the server's certificate (its public key, pinned).
server_api() {
  ip netns exec "$NS" curl -fsS --max-time 5 -k --pinnedpubkey "$SERVER_PIN" \
    -H "Authorization: Bearer $API_TOKEN" "$@"
}

# server_view ARGS…: the same with the read-only viewer token.
server_view() {
  ip netns exec "$NS" curl -fsS --max-time 5 -k --pinnedpubkey "$SERVER_PIN" \
    -H "Authorization: Bearer $VIEWER_TOKEN" "$@"
}

# core_agent MAC: sets AGENT_IP, AGENT_PORT, AGENT_TOKEN and AGENT_FP from the
# boot server's registry (GET /v1/agents with the API token).
core_agent() {
  local json
  json=$(server_api "$HTTPS_URL/v1/agents") || return 1
  local line
  line=$(MAC="$1" python3 -c '
import json, os, sys
mac = os.environ["MAC"].lower()
for a in json.load(sys.stdin):
    if mac in [m.lower() for m in a.get("macs", [])]:
        ips = [i for i in a.get("ips", []) if ":" not in i]
        print(ips[0] if ips else "", a["port"], a.get("token") or "", a["cert_fingerprint"])
        break
' <<<"$json")
  [ -n "$line" ] || return 1
  read -r AGENT_IP AGENT_PORT AGENT_TOKEN AGENT_FP <<<"$line"
  [ -n "$AGENT_IP" ] && [ -n "$AGENT_TOKEN" ]
}

# core_check_cert: the agent's TLS certificate is the one it registered;
# sets AGENT_PIN (curl's --pinnedpubkey form of its key), so every later
# call reaches that agent only.
core_check_cert() {
  local pem der_fp
  pem=$(ip netns exec "$NS" openssl s_client -connect "$AGENT_IP:$AGENT_PORT" </dev/null 2>/dev/null |
    openssl x509 2>/dev/null) || return 1
  der_fp=$(openssl x509 -outform DER <<<"$pem" | sha256sum | cut -d' ' -f1)
  [ "sha256:$der_fp" = "$AGENT_FP" ] || return 1
  AGENT_PIN=sha256//$(openssl x509 -pubkey -noout <<<"$pem" | openssl pkey -pubin -outform der |
    openssl dgst -sha256 -binary | base64)
}

# core_call OP JSON [TOKEN]: POST /CloningEngine/OP to the agent; prints the
# job id. Fails (with the agent's answer on stderr) unless it is accepted.
core_call() {
  local op=$1 body=$2 token=${3:-$AGENT_TOKEN} out code
  out=$(ip netns exec "$NS" curl -sS -k --pinnedpubkey "$AGENT_PIN" --max-time 15 -w '\n%{http_code}' \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -d "$body" "https://$AGENT_IP:$AGENT_PORT/CloningEngine/$op") || {
    echo "core: POST /CloningEngine/$op: no answer from the agent" >&2
    return 1
  }
  code=${out##*$'\n'}
  out=${out%$'\n'*}
  if [ "$code" != 200 ] && [ "$code" != 202 ]; then
    echo "core: POST /CloningEngine/$op answered $code: $out" >&2
    return 1
  fi
  python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])' <<<"$out"
}

# core_job_state JOB: the job's state as the agent reports it (GET /v1/jobs/JOB).
core_job_state() {
  ip netns exec "$NS" curl -fsS -k --pinnedpubkey "$AGENT_PIN" --max-time 5 -H "Authorization: Bearer $AGENT_TOKEN" \
    "https://$AGENT_IP:$AGENT_PORT/v1/jobs/$1" 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin).get("state",""))' 2>/dev/null
}

# core_follow MAC JOB TIMEOUT_S [ON_PROGRESS] [CALLED_AT]: follows JOB through the agent's
# webhooks (stored by the boot server) until it ends; prints progress as it
# comes. ON_PROGRESS gets (phase, bytes fetched) for each progress event and
# ("state:STATE", 0) for each state change. Sets JOB_STATE, JOB_SUMMARY (one line), JOB_RUN_S (running →
# end, from the events' timestamps), JOB_CHUNKS / JOB_FETCHED / JOB_UNREAD
# (a restore's chunks: all, fetched, known in place unread), JOB_RESULT (the
# job's whole result, JSON on one line), JOB_BYTES (used bytes of a restore or
# create) and JOB_ERROR. Calls ON_PROGRESS (a function name) once per new
# progress event with the bytes done as its argument. CALLED_AT (epoch
# seconds) stands in for the job's start when its "running" event is gone
# (the boot server keeps events in memory: a restart loses them). Returns 0
# when the job succeeded.
core_follow() {
  local mac=$1 job=$2 deadline=$((SECONDS + $3)) hook=${4:-} called=${5:-0} seen=0 events line ended_at=""
  JOB_STATE="" JOB_SUMMARY="" JOB_RUN_S="" JOB_BYTES="" JOB_ERROR="" JOB_CHUNKS=0 JOB_FETCHED=0 JOB_UNREAD=0 JOB_RESULT="{}"
  while [ "$SECONDS" -lt "$deadline" ]; do
    events=$(server_view --max-time 3 "$HTTPS_URL/v1/agents/$mac/events" 2>/dev/null) || events="[]"
    while IFS= read -r line; do
      case $line in
        P\ *)
          printf '    %s\n' "${line#P }" >&2
          if [ -n "$hook" ]; then
            local words
            read -r -a words <<<"$line"
            "$hook" "${words[-2]}" "${words[-1]}"
          fi
          ;;
        S\ *)
          printf '    %s\n' "${line#S }" >&2
          if [ -n "$hook" ]; then
            local sw
            read -r -a sw <<<"$line"
            "$hook" "state:${sw[2]}" 0
          fi
          ;;
        END\ *) read -r _ JOB_STATE JOB_RUN_S JOB_BYTES <<<"$line" ;;
        SUMMARY\ *) JOB_SUMMARY=${line#SUMMARY } ;;
        RESULTJ\ *) JOB_RESULT=${line#RESULTJ } ;;
        STATS\ *) read -r _ JOB_CHUNKS JOB_FETCHED JOB_UNREAD <<<"$line" ;;
        ERROR\ *) JOB_ERROR=${line#ERROR } ;;
        SEEN\ *) seen=${line#SEEN } ;;
      esac
    done < <(JOB="$job" SEEN="$seen" CALLED="$called" python3 -c '
import json, os, sys
from datetime import datetime
job, seen = os.environ["JOB"], int(os.environ["SEEN"])
evs = [e for e in json.load(sys.stdin) if e.get("job_id") == job]
evs.sort(key=lambda e: e.get("seq", 0))
def ts(e):
    return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
mib = lambda b: b / 1048576
for e in evs:
    if e.get("seq", 0) <= seen:
        continue
    p = e.get("progress") or {}
    if e.get("event") == "progress" and p:
        rate = p.get("rate_bps", 0) / 1048576
        print("P %s %s: %.1f/%.1f MiB, %.1f MiB/s, fetched %.1f MiB, in place %.1f MiB %s %d" % (
            e["op"], p.get("phase", ""), mib(p.get("bytes_done", 0)), mib(p.get("bytes_total", 0)), rate,
            mib(p.get("bytes_fetched", 0)), mib(p.get("bytes_skipped", 0)), p.get("phase", "-"), p.get("bytes_fetched", 0)))
    elif e.get("event") == "state":
        print("S %s %s (seq %d)" % (e["op"], e["state"], e["seq"]))
    seen = max(seen, e.get("seq", 0))
print("SEEN %d" % seen)
end = [e for e in evs if e.get("state") in ("succeeded", "failed", "cancelled") and e.get("event") == "state"]
if end:
    e = end[-1]
    running = [x for x in evs if x.get("state") == "running"]
    run_s = ts(e) - (ts(running[0]) if running else float(os.environ["CALLED"]))
    r = e.get("result") or {}
    stats = r.get("stats") or {}
    used = stats.get("bytes_used") or r.get("used_bytes") or 0
    print("END %s %.2f %d" % (e["state"], run_s, used))
    print("STATS %d %d %d" % (stats.get("chunks", 0), stats.get("chunks_fetched", 0), stats.get("chunks_unread", 0)))
    print("SUMMARY " + json.dumps(r, sort_keys=True)[:400])
    print("RESULTJ " + json.dumps(r, sort_keys=True))
    if e.get("error"):
        print("ERROR " + e["error"].get("message", "") + " | disk: " + e["error"].get("disk_state", ""))
' <<<"$events")
    if [ -n "$JOB_STATE" ]; then
      [ "$JOB_STATE" = succeeded ]
      return
    fi
    # Reconcile with the agent: a webhook the boot server stored just before
    # it restarted is gone with its memory. When the agent says the job has
    # ended but no event told us within 10 s, take the agent's word.
    if [ $((SECONDS % 5)) = 0 ]; then
      local st
      st=$(core_job_state "$job")
      case $st in
        succeeded | failed | cancelled)
          : "${ended_at:=$SECONDS}"
          if [ $((SECONDS - ended_at)) -ge 10 ]; then
            echo "    (no webhook for the end of $job: the core restarted; state from the agent's API)" >&2
            JOB_STATE=$st JOB_SUMMARY="state from GET /v1/jobs/$job" JOB_RUN_S=${JOB_RUN_S:-0}
            [ "$JOB_STATE" = succeeded ]
            return
          fi
          ;;
      esac
    fi
    sleep 0.5
  done
  JOB_STATE=timeout
  return 1
}

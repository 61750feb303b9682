#!/usr/bin/env bash
# An agent worker in redis-cli and bash: the Redis-level protocol of the runtime, by hand (README,
# "Agents from any language"). It takes one work entry, answers every message its conversation has
# queued with an echo, and acknowledges the entry. Not a production worker: no heartbeat (a run
# longer than AGENT_CLAIM_IDLE_SECONDS is taken over), no stop button, no takeover of dead ones.
#   REDIS_CLI="redis-cli -u redis://127.0.0.1:6379/0" app/agent/scripts/echo-agent.sh
set -euo pipefail
read -r -a cli <<< "${REDIS_CLI:-redis-cli}"
here=$(cd "$(dirname "$0")" && pwd)
shards=${AGENT_SHARDS:-8}
lease_ms=${AGENT_LEASE_MS:-15000}
consumer="sh-$$"
token="sh-$$-$RANDOM$RANDOM"
json() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }
field() { python3 -c 'import json, sys; e = json.loads(sys.argv[1]); print(e.get(sys.argv[2]) or e.get("args", {}).get(sys.argv[2], ""))' "$1" "$2"; }
now() { python3 -c 'from datetime import datetime, timezone; print(datetime.now(timezone.utc).isoformat(timespec="microseconds"))'; }

# 1. One work entry from any shard (consumer group "agents"; made from the start if missing).
streams=() ids=()
for ((s = 0; s < shards; s++)); do
  "${cli[@]}" XGROUP CREATE "agent:work:{$s}" agents 0 MKSTREAM >/dev/null 2>&1 || true
  streams+=("agent:work:{$s}") ids+=(">")
done
mapfile -t entry < <("${cli[@]}" --raw XREADGROUP GROUP agents "$consumer" COUNT 1 BLOCK 5000 STREAMS "${streams[@]}" "${ids[@]}")
[ "${#entry[@]}" -ge 4 ] || { echo "no work"; exit 0; }
stream=${entry[0]} entry_id=${entry[1]} cid=${entry[3]}
meta="conv:{$cid}:meta" events="conv:{$cid}:events" inbox="conv:{$cid}:inbox" run="conv:{$cid}:run"
channel="conv:{$cid}:live" reply="conv:{$cid}:reply"

while true; do
  # 2. The lease, and the message to answer (status, cause, steps written, stop, repository,
  #    branch, title, then the history newest first: entry id, "e", event JSON, ...).
  mapfile -t claim < <("${cli[@]}" --raw --eval "$here/acquire.lua" "$meta" "$events" "$inbox" "$run" , "$token" "$lease_ms" 1)
  [ "${claim[0]}" = ok ] || { echo "conversation $cid: ${claim[0]}"; break; }
  cause=${claim[1]} message=${claim[9]}
  # 3. Its events, step by step: the same step sent again is stored once.
  "${cli[@]}" --eval "$here/emit.lua" "$meta" "$events" "$run" "$channel" "$reply" , "$token" "$cause" 1 \
    "\"timestamp\":\"$(now)\",\"source\":\"agent\",\"type\":\"agent_state_changed\",\"cause\":$cause,\"agent_state\":\"running\"}" \
    0 PUBLISH running "" >/dev/null
  "${cli[@]}" --eval "$here/emit.lua" "$meta" "$events" "$run" "$channel" "$reply" , "$token" "$cause" 2 \
    "\"timestamp\":\"$(now)\",\"source\":\"agent\",\"type\":\"agent_message\",\"cause\":$cause,\"content\":$(json "$(field "$message" content)")}" \
    0 PUBLISH "" 1 >/dev/null
  # 4. The end of the run: agent_state_changed (step 3), the message off the inbox; 1: more queued.
  mapfile -t end < <("${cli[@]}" --raw --eval "$here/finish.lua" "$meta" "$events" "$run" "$channel" "$reply" "$inbox" , \
    "$token" "$cause" 3 "$(now)" awaiting_user_input 0 PUBLISH "$lease_ms")
  echo "conversation $cid: message $cause answered (event ${end[0]})"
  [ "${end[1]}" = 1 ] || break
done
# 5. The entry is done: acknowledged and deleted.
"${cli[@]}" XACK "$stream" agents "$entry_id" >/dev/null
"${cli[@]}" XDEL "$stream" "$entry_id" >/dev/null

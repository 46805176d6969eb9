#!/usr/bin/env bash
# A walk through the CrowNest REST API with curl: create a sandbox, write a
# file, run it, stream a command's log, export an artifact, download it, kill.
#
# Run it against a local server:
#   target/debug/crownest serve &                          # 127.0.0.1:7420
#   export CROWNEST_API_KEY=$(target/debug/crownest keys create --org demo --scopes all)
#   bash examples/curl.sh                                  # needs curl and jq
set -euo pipefail
BASE=${CROWNEST_BASE_URL:-http://127.0.0.1:7420}
: "${CROWNEST_API_KEY:?set CROWNEST_API_KEY}"
api() { curl -sS --fail-with-body -H "x-api-key: $CROWNEST_API_KEY" "$@"; }
json=(-H 'content-type: application/json')

echo "== create a sandbox (Idempotency-Key makes a retry safe)"
SBX=$(api -X POST "$BASE/v1/sandboxes" "${json[@]}" -H "Idempotency-Key: $(cat /proc/sys/kernel/random/uuid)" \
      -d '{"template":"python","ttlMs":600000,"metadata":{"job":"curl-demo"}}' | jq -r .id)
echo "$SBX"
trap 'api -X DELETE "$BASE/v1/sandboxes/$SBX" >/dev/null || true' EXIT

echo "== write /workspace/hello.py"
api -X PUT "$BASE/v1/sandboxes/$SBX/files?path=hello.py" -H 'content-type: application/octet-stream' \
    --data-binary $'print(40 + 2)\nopen("out.txt", "w").write("hello from the sandbox\\n")\n' | jq -c .

echo "== run it (blocks until it ends; a non-zero exit is a result, not an error)"
api -X POST "$BASE/v1/sandboxes/$SBX/commands" "${json[@]}" -d '{"command":"python hello.py"}' \
    | jq -c '{id, status, exitCode, stdout}'

echo "== start a background command and stream its log (SSE)"
CMD=$(api -X POST "$BASE/v1/sandboxes/$SBX/commands" "${json[@]}" \
      -d '{"command":"for i in 1 2 3; do echo tick $i; sleep 0.2; done","background":true}' | jq -r .id)
api -N "$BASE/v1/sandboxes/$SBX/commands/$CMD/logs"

echo "== export out.txt as an artifact and download it"
ART=$(api -X POST "$BASE/v1/sandboxes/$SBX/artifacts" "${json[@]}" -d '{"path":"out.txt"}' | jq -r .id)
api "$BASE/v1/artifacts/$ART" | jq -c '{id, name, size, mime}'
api "$BASE/v1/artifacts/$ART/content"

echo "== errors are {\"error\":{code,message,details}}"
curl -sS -H "x-api-key: $CROWNEST_API_KEY" "$BASE/v1/sandboxes/sbx_does_not_exist"; echo

echo "== kill"
api -X DELETE "$BASE/v1/sandboxes/$SBX" | jq -c '{id, status, endReason}'
trap - EXIT

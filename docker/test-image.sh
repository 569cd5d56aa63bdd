#!/usr/bin/env bash
# make test-docker: build the CPU image with podman, run it the way a TEI user runs TEI's image
# (a models folder mounted at /data, TEI's arguments), check /health, /embed, /rerank and the image's
# HEALTHCHECK, then remove everything it created. Talks to 127.0.0.1 only; bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP=${CONTAINER_SETUP:-../shared/tools/container-setup.sh}
MODELS=${MODELS:-models}
BUNDLE=${BUNDLE:-all-MiniLM-L6-v2}
IMAGE=localhost/embedrank-test:cpu
PORT=${TEST_DOCKER_PORT:-18080}

if ! command -v podman >/dev/null 2>&1 || ! podman image exists docker.io/library/debian:bookworm-slim; then
  if [ ! -f "$SETUP" ]; then
    echo "test-docker: SKIPPED: no podman and no container setup script at $SETUP"
    exit "${SKIP_EXIT_CODE:-0}"
  fi
  if ! bash "$SETUP" > /tmp/embedrank-container-setup.log 2>&1; then
    echo "test-docker: SKIPPED: the container setup could not run here (log: /tmp/embedrank-container-setup.log)"
    tail -5 /tmp/embedrank-container-setup.log || true
    exit "${SKIP_EXIT_CODE:-0}"
  fi
fi
test -f "$MODELS/$BUNDLE/manifest.json" || { echo "test-docker: $MODELS/$BUNDLE is missing (make export-default)"; exit 1; }

cid=""
cleanup() {
  if [ -n "$cid" ]; then podman rm -f "$cid" >/dev/null 2>&1 || true; fi
  if [ "${KEEP_IMAGE:-0}" != "1" ]; then podman rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

started=$(date +%s)
podman build --pull=never --format docker -q -f docker/Dockerfile.cpu --target cpu -t "$IMAGE" . >/dev/null
echo "test-docker: built $IMAGE in $(( $(date +%s) - started ))s, $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes"

# TEI's arguments, unchanged: the model from the mounted /data, the image's port 80.
cid=$(podman run -d -p "127.0.0.1:$PORT:80" -v "$(pwd)/$MODELS:/data:ro" "$IMAGE" \
      --model-id "/data/$BUNDLE" --max-client-batch-size 64 --auto-truncate true)
url="http://127.0.0.1:$PORT"
for _ in $(seq 1 120); do
  if curl -fsS "$url/health" >/dev/null 2>&1; then break; fi
  if [ "$(podman inspect -f '{{.State.Running}}' "$cid")" != "true" ]; then podman logs "$cid"; exit 1; fi
  sleep 1
done
curl -fsS "$url/health" >/dev/null || { podman logs "$cid"; echo "test-docker: /health never answered"; exit 1; }

user=$(podman exec "$cid" id -u)
[ "$user" != "0" ] || { echo "test-docker: the server runs as root"; exit 1; }
pid1=$(podman exec "$cid" cat /proc/1/comm)
[ "$pid1" = "tini" ] || { echo "test-docker: PID 1 is $pid1, not tini"; exit 1; }

embed=$(curl -fsS "$url/embed" -H 'Content-Type: application/json' -d '{"inputs": ["What is Deep Learning?", "hi"]}')
python3 - "$embed" <<'PY'
import json, math, sys
vectors = json.loads(sys.argv[1])
assert len(vectors) == 2 and len(vectors[0]) == 384, "unexpected /embed shape"
assert abs(math.sqrt(sum(v * v for v in vectors[0])) - 1) < 1e-4, "vectors are not normalized"
PY
rerank=$(curl -fsS "$url/rerank" -H 'Content-Type: application/json' \
  -d '{"query": "Where is Munich?", "texts": ["The sky is blue.", "Munich is a city in Germany."]}')
python3 - "$rerank" <<'PY'
import json, sys
ranked = json.loads(sys.argv[1])
assert [item["index"] for item in ranked] == [1, 0], f"unexpected ranking {ranked}"
PY

podman healthcheck run "$cid" >/dev/null || { echo "test-docker: the image's HEALTHCHECK failed"; exit 1; }
echo "test-docker: /health, /embed, /rerank and the HEALTHCHECK passed (non-root uid $user, PID 1 tini)"

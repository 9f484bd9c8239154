#!/usr/bin/env bash
# Builds the mailgate container image from an already-built static release binary, runs it the
# way Kubernetes runs the chart (non-root 65532, read-only root filesystem, no capabilities,
# /data and /tmp writable), and checks it: gRPC health with grpcurl, reflection, one email
# through the file drop, the image's HEALTHCHECK (`mailgate healthcheck`), and a graceful stop
# on SIGTERM with exit code 0. Cleans up everything it created.
#
# Nothing is pulled from a registry: the base image (what distroless/static holds: passwd and
# group with the nonroot user 65532, CA certificates, /tmp) is made from local files and
# imported, and Containerfile.local COPYs the binary in (podman build --pull=never). The
# Dockerfile's Rust builder stage is not run here; build the binary first:
#
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release --locked --target x86_64-unknown-linux-gnu --bin mailgate
#   bash .ci/image-check.sh target/x86_64-unknown-linux-gnu/release/mailgate
#
# Needs root (rootful podman). Tools: INSTALL_IMAGE_TOOLS=1 .ci/install-tools.sh (podman,
# buildah, runc from Debian; grpcurl from PyPI), run by this script unless
# IMAGE_CHECK_SKIP_INSTALL=1.
#
# Environment:
#   IMAGE_CHECK_ALLOW_DYNAMIC=1  accept a dynamically linked binary (e.g. target/debug/mailgate)
#                                by copying its shared libraries into the base image. That
#                                checks the image plumbing with the real program, not the
#                                static build.
#   IMAGE_CHECK_PLUMBING_ONLY=1  the binary is a static busybox standing in for mailgate:
#                                checks the build, the image configuration, the user, the
#                                read-only root, /data, the CA bundle and the published port;
#                                no gRPC (for testing this script without a mailgate binary).
#   IMAGE_CHECK_KEEP_IMAGES=1    keep the built images (default: removed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { echo "usage: bash .ci/image-check.sh PATH/TO/STATIC/mailgate" >&2; exit 2; }
[ $# -eq 1 ] || usage
BIN=$1
[ -f "$BIN" ] && [ -x "$BIN" ] || { echo "image-check: $BIN is not an executable file" >&2; exit 2; }
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
[ "$(id -u)" = 0 ] || { echo "image-check: needs root (rootful podman)" >&2; exit 2; }

ALLOW_DYNAMIC=${IMAGE_CHECK_ALLOW_DYNAMIC:-0}
PLUMBING_ONLY=${IMAGE_CHECK_PLUMBING_ONLY:-0}

t0=$(date +%s.%N)
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
step() { printf '\n==> %s (%ss)\n' "$*" "$(since "$t0")"; }
fail() { echo "image-check: FAIL: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
step "tools"
export TOOLS_DIR=${TOOLS_DIR:-$ROOT/.tools}
if [ "${IMAGE_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  t=$(now)
  INSTALL_TEST_TOOLS=0 INSTALL_IMAGE_TOOLS=1 bash .ci/install-tools.sh >/dev/null
  echo "install-tools (podman, buildah, runc, grpcurl): $(since "$t") s"
fi
export PATH="$TOOLS_DIR/bin:$PATH"
export CONTAINERS_CONF="$ROOT/.ci/podman-containers.conf"
command -v podman >/dev/null || fail "podman is not installed"
GRPCURL="$TOOLS_DIR/bin/grpcurl"
[ "$PLUMBING_ONLY" = 1 ] || [ -x "$GRPCURL" ] || fail "grpcurl is not installed in $TOOLS_DIR/bin"

TAG="check-$$"
BASE_IMAGE="localhost/mailgate-base:$TAG"
IMAGE="localhost/mailgate:$TAG"
NAME="mailgate-image-check-$$"
WORK=$(mktemp -d)
cleanup() {
  set +e
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1
  if [ "${IMAGE_CHECK_KEEP_IMAGES:-0}" != 1 ]; then
    podman rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
step "binary"
is_dynamic() {  # has an ELF program interpreter (PT_INTERP)
  python3 - "$1" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    head = f.read(64)
    if head[:4] != b"\x7fELF" or head[4] != 2:
        sys.exit("not a 64-bit ELF file")
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        if struct.unpack("<I", f.read(4))[0] == 3:  # PT_INTERP
            sys.exit(0)
sys.exit(1)
PY
}
if is_dynamic "$BIN"; then
  [ "$ALLOW_DYNAMIC" = 1 ] || fail "$BIN is dynamically linked; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" --target x86_64-unknown-linux-gnu (or set IMAGE_CHECK_ALLOW_DYNAMIC=1 to check the plumbing with it)"
  echo "$BIN: dynamically linked; its shared libraries go into the base image (IMAGE_CHECK_ALLOW_DYNAMIC=1)"
  LINKAGE=dynamic
else
  echo "$BIN: statically linked"
  LINKAGE=static
fi
ls -l "$BIN"

# ---------------------------------------------------------------------------------------------
step "base image (local files, podman import)"
t=$(now)
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
[ -s "$CA_BUNDLE" ] || fail "$CA_BUNDLE is missing (apt-get install ca-certificates)"
rootfs="$WORK/rootfs"
mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/home/nonroot" "$rootfs/root"
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
echo "hosts: files dns" >"$rootfs/etc/nsswitch.conf"
cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/root"
chown 65532:65532 "$rootfs/home/nonroot"
if [ "$PLUMBING_ONLY" = 1 ]; then
  # busybox runs the applet named by argv[0]: give it its own name for the plumbing checks.
  mkdir -p "$rootfs/bin"
  cp "$BIN" "$rootfs/bin/busybox"
fi
if [ "$LINKAGE" = dynamic ]; then
  ldd "$BIN" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
    cp -L --parents "$lib" "$rootfs/"
  done
fi
tar --numeric-owner -C "$rootfs" -cf "$WORK/base.tar" .
podman import -q "$WORK/base.tar" "$BASE_IMAGE" >/dev/null
echo "base image $BASE_IMAGE: $(du -h "$WORK/base.tar" | cut -f1) in $(since "$t") s"

# ---------------------------------------------------------------------------------------------
step "image (Containerfile.local, --pull=never)"
t=$(now)
ctx="$WORK/context"
mkdir -p "$ctx/data"
cp "$BIN" "$ctx/mailgate"
chmod 0755 "$ctx/mailgate"
podman build -q --pull=never --format docker --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  -f "$ROOT/Containerfile.local" -t "$IMAGE" "$ctx" >/dev/null
echo "image $IMAGE built in $(since "$t") s; size $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"

podman image inspect "$IMAGE" >"$WORK/inspect.json"
python3 - "$WORK/inspect.json" <<'PY'
import json, sys
image = json.load(open(sys.argv[1]))[0]
config = image["Config"]
env = dict(e.split("=", 1) for e in config.get("Env", []))
health = image.get("Healthcheck") or config.get("Healthcheck") or {}
checks = {
    "user is 65532:65532": config.get("User") == "65532:65532",
    "entrypoint is /mailgate": config.get("Entrypoint") == ["/mailgate"],
    "cmd is serve": config.get("Cmd") == ["serve"],
    "exposes 50051/tcp": "50051/tcp" in (config.get("ExposedPorts") or {}),
    "MAILGATE_LISTEN_ADDR=0.0.0.0:50051": env.get("MAILGATE_LISTEN_ADDR") == "0.0.0.0:50051",
    "MAILGATE_DATA_DIR=/data": env.get("MAILGATE_DATA_DIR") == "/data",
    "healthcheck runs mailgate healthcheck": health.get("Test", [])[:3] == ["CMD", "/mailgate", "healthcheck"],
}
for what, ok in checks.items():
    print(("ok   " if ok else "FAIL ") + what)
sys.exit(0 if all(checks.values()) else 1)
PY

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DATA="$WORK/data"
mkdir -p "$DATA"
chown 65532:65532 "$DATA"
chmod 0750 "$DATA"
PORT=$(free_port)
# The pod's securityContext, as far as podman expresses it. The HEALTHCHECK gets no timer
# (podman would need systemd for it); `podman healthcheck run` runs it below.
TMPFS_OPTS="rw,size=64m,mode=1777"
RUN_FLAGS=(--read-only --tmpfs "/tmp:$TMPFS_OPTS" -v "$DATA:/data"
           --cap-drop ALL --security-opt no-new-privileges --health-interval disable)

if [ "$PLUMBING_ONLY" = 1 ]; then
  # -------------------------------------------------------------------------------------------
  step "plumbing with a stand-in binary (busybox): user, read-only root, /data, CA bundle"
  out=$(podman run --rm "${RUN_FLAGS[@]}" --no-healthcheck --entrypoint /bin/busybox "$IMAGE" sh -c '
    echo "uid=$(id -u) gid=$(id -g)"
    touch /data/probe && echo "data=writable"
    touch /tmp/probe && echo "tmp=writable"
    if touch /probe 2>/dev/null; then echo "root=writable"; else echo "root=read-only"; fi
    test -s /etc/ssl/certs/ca-certificates.crt && echo "ca=present"
    test -x /mailgate && cmp -s /mailgate /bin/busybox && echo "binary=/mailgate"
    echo "listen=$MAILGATE_LISTEN_ADDR data_dir=$MAILGATE_DATA_DIR"')
  echo "$out"
  for want in "uid=65532 gid=65532" "data=writable" "tmp=writable" "root=read-only" "ca=present" \
              "binary=/mailgate" \
              "listen=0.0.0.0:50051 data_dir=/data"; do
    grep -qxF "$want" <<<"$out" || fail "expected '$want' from the container"
  done
  [ -f "$DATA/probe" ] && [ "$(stat -c %u "$DATA/probe")" = 65532 ] || fail "/data is not the host directory"

  step "plumbing: published port 50051"
  podman run -d --name "$NAME" "${RUN_FLAGS[@]}" --no-healthcheck -p "127.0.0.1:$PORT:50051" \
    --entrypoint /bin/busybox "$IMAGE" httpd -f -p 50051 -h /etc/ssl/certs >/dev/null
  python3 - "$PORT" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/ca-certificates.crt"
for _ in range(50):
    try:
        body = urllib.request.urlopen(url, timeout=2).read()
        break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("image-check: FAIL: nothing answers on the published port")
assert b"BEGIN CERTIFICATE" in body
print(f"ok   127.0.0.1:{sys.argv[1]} -> container port 50051 answered ({len(body)} bytes)")
PY
  podman rm -f -t 0 "$NAME" >/dev/null
  step "done: plumbing only (no gRPC was checked); $LINKAGE binary"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
step "run (read-only root, user 65532, no capabilities, SQLite and file drop in /data)"
KEY=$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
# An API key for the check: the image listens on 0.0.0.0, where mailgate requires keys.
TOKEN=$(python3 -c 'import secrets; print("mgk_" + secrets.token_urlsafe(32))')
HASH=$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)
KEYS="[{name = \"image-check\", role = \"service\", hash = \"sha256:$HASH\"}]"
if podman run --rm "${RUN_FLAGS[@]}" --no-healthcheck -e MAILGATE_ENCRYPTION__KEY="$KEY" "$IMAGE" \
    >"$WORK/nokeys.out" 2>&1; then
  fail "the image started on 0.0.0.0 without API keys"
fi
grep -q "no API keys are configured" "$WORK/nokeys.out" \
  || { cat "$WORK/nokeys.out" >&2; fail "no clear refusal without API keys"; }
echo "ok   without API keys the image refuses to listen on 0.0.0.0"
t=$(now)
# (podman 4.3 still complains that it cannot reach systemd for the healthcheck timer: noise.)
podman run -d --name "$NAME" "${RUN_FLAGS[@]}" -p "127.0.0.1:$PORT:50051" \
  -e MAILGATE_ENCRYPTION__KEY="$KEY" -e MAILGATE_AUTH__KEYS="$KEYS" "$IMAGE" >/dev/null 2>"$WORK/run.err" \
  || { cat "$WORK/run.err" >&2; fail "podman run failed"; }
serving=0
for _ in $(seq 1 150); do
  if "$GRPCURL" -plaintext -max-time 2 "127.0.0.1:$PORT" grpc.health.v1.Health/Check 2>/dev/null \
      | grep -q '"SERVING"'; then
    serving=1
    break
  fi
  [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || break
  sleep 0.2
done
if [ "$serving" != 1 ]; then
  podman logs "$NAME" 2>&1 | tail -30 >&2
  fail "grpc.health.v1.Health/Check did not answer SERVING on 127.0.0.1:$PORT"
fi
echo "ok   grpc.health.v1.Health/Check: SERVING after $(since "$t") s"
"$GRPCURL" -plaintext "127.0.0.1:$PORT" grpc.health.v1.Health/Check

step "gRPC: reflection and one email through the file drop"
"$GRPCURL" -plaintext -H 'x-tenant-id: acme' "127.0.0.1:$PORT" list >"$WORK/list.txt"
grep -qx 'mailgate.v1.SendService' "$WORK/list.txt" || fail "reflection does not list mailgate.v1.SendService"
echo "ok   reflection lists $(wc -l <"$WORK/list.txt") services"
if "$GRPCURL" -plaintext -H 'x-tenant-id: acme' -d '{"to": [{"email": "bob@example.com"}]}' \
    "127.0.0.1:$PORT" mailgate.v1.SendService/SendEmail >"$WORK/anon.txt" 2>&1; then
  fail "SendEmail without a key was accepted"
fi
grep -q "Unauthenticated" "$WORK/anon.txt" || { cat "$WORK/anon.txt" >&2; fail "no UNAUTHENTICATED without a key"; }
echo "ok   SendEmail without a key: Unauthenticated"
"$GRPCURL" -plaintext -H 'x-tenant-id: acme' -H "authorization: Bearer $TOKEN" -d '{
  "to": [{"email": "bob@example.com"}], "subject": "image check", "text_body": "It works."
}' "127.0.0.1:$PORT" mailgate.v1.SendService/SendEmail >"$WORK/send.json"
cat "$WORK/send.json"
delivered=0
for _ in $(seq 1 100); do
  if compgen -G "$DATA/outbox/acme/*.eml" >/dev/null; then delivered=1; break; fi
  sleep 0.1
done
[ "$delivered" = 1 ] || fail "no .eml file appeared in /data/outbox/acme"
echo "ok   delivered to the file drop: $(ls "$DATA/outbox/acme")"

step "HEALTHCHECK of the image (mailgate healthcheck inside the container)"
podman healthcheck run "$NAME" || fail "podman healthcheck run failed"
echo "ok   HEALTHCHECK passed"
user=$(podman top "$NAME" huser user | tail -n +2 | tr -s ' ')
echo "process user (host uid, container user): $user"
case "$user" in *65532*) ;; *) fail "mailgate does not run as 65532" ;; esac

step "graceful stop (SIGTERM)"
t=$(now)
podman stop -t 40 "$NAME" >/dev/null 2>"$WORK/stop.err" || { cat "$WORK/stop.err" >&2; fail "podman stop failed"; }
code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
echo "stopped in $(since "$t") s with exit code $code"
podman logs "$NAME" 2>&1 | tail -3
[ "$code" = 0 ] || fail "exit code $code after SIGTERM (want 0)"
podman logs "$NAME" 2>&1 | grep -q 'mailgate stopped' || fail "no 'mailgate stopped' in the log"

step "done: $LINKAGE binary checked in the image"

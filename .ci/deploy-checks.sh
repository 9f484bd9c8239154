#!/usr/bin/env bash
# Checks of the deployment artefacts, offline: the Helm chart (helm lint --strict, helm
# template for every value set in helm/ci-values/, kubernetes-validate --strict on the rendered
# manifests at the oldest and newest supported Kubernetes, assertions in check_rendered.py,
# and the failures the chart must produce), and hadolint on the Dockerfile and
# Containerfile.local, whose runtime instructions must be identical.
#
#   bash .ci/deploy-checks.sh          (from a fresh clone; installs its tools into .tools/)
#
# Tools: INSTALL_DEPLOY_TOOLS=1 .ci/install-tools.sh (helm, kubectl, hadolint,
# kubernetes-validate); skipped with DEPLOY_CHECKS_SKIP_INSTALL=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
t0=$(date +%s)
step() { printf '\n==> %s (%ss)\n' "$*" "$(( $(date +%s) - t0 ))"; }
failed=0
fail() { echo "FAIL: $*" >&2; failed=1; }

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the
# validator knows. A value set may raise the oldest with a "# kube-min: X.Y.Z" line.
KUBE_OLDEST=1.27.0
KUBE_NEWEST=1.37.0

step "tools"
export TOOLS_DIR=${TOOLS_DIR:-$ROOT/.tools}
if [ "${DEPLOY_CHECKS_SKIP_INSTALL:-0}" != 1 ]; then
  INSTALL_TEST_TOOLS=0 INSTALL_DEPLOY_TOOLS=1 bash .ci/install-tools.sh >/dev/null
fi
export PATH="$TOOLS_DIR/bin:$PATH"
for tool in helm hadolint kubernetes-validate tools-python; do
  command -v "$tool" >/dev/null || { echo "FAIL: $tool is not installed in $TOOLS_DIR/bin" >&2; exit 1; }
done
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# Keep helm's cache and configuration out of the user's home.
export HELM_CACHE_HOME="$OUT/helm/cache" HELM_CONFIG_HOME="$OUT/helm/config" HELM_DATA_HOME="$OUT/helm/data"
echo "$(helm version --short), $(hadolint --version), kubernetes-validate $(kubernetes-validate --version)"

CHART=helm/mailgate
# ---------------------------------------------------------------------------------------------
step "helm lint, template, kubernetes-validate, assertions for each value set"
shopt -s nullglob
value_sets=(helm/ci-values/*.yaml)
[ "${#value_sets[@]}" -ge 3 ] || fail "expected at least 3 value sets in helm/ci-values"
for values in "${value_sets[@]}"; do
  name=$(basename "$values" .yaml)
  rendered="$OUT/$name.yaml"
  echo "--- $name"
  if ! helm lint --strict --quiet "$CHART" -f "$values" >"$OUT/$name.lint" 2>&1; then
    cat "$OUT/$name.lint"; fail "$name: helm lint --strict"; continue
  fi
  if ! helm template mailgate "$CHART" --namespace mailgate -f "$values" >"$rendered" 2>"$OUT/$name.err"; then
    cat "$OUT/$name.err"; fail "$name: helm template"; continue
  fi
  kube_min=$(sed -n 's/^# kube-min: *\([0-9.]*\).*/\1/p' "$values" | head -1)
  kube_min=${kube_min:-$KUBE_OLDEST}
  for kube in "$kube_min" "$KUBE_NEWEST"; do
    # Options before file names. An unknown kind only warns; only the ServiceMonitor (a CRD)
    # may be unknown.
    if ! kubernetes-validate --strict -k "$kube" "$rendered" >"$OUT/$name.kv" 2>&1; then
      grep -v '^INFO' "$OUT/$name.kv"; fail "$name: kubernetes-validate --strict -k $kube"
    fi
    if grep "Couldn't find schema" "$OUT/$name.kv" | grep -v "kind ServiceMonitor " | grep -q .; then
      grep "Couldn't find schema" "$OUT/$name.kv"; fail "$name: a kind without a schema"
    fi
  done
  echo "ok   lint, template, kubernetes-validate --strict (Kubernetes $kube_min and $KUBE_NEWEST)"
  tools-python .ci/check_rendered.py "$rendered" "$values" || fail "$name: assertions"
done

# ---------------------------------------------------------------------------------------------
step "what the chart must refuse"
expect_failure() {  # expect_failure DESCRIPTION MESSAGE-PART helm-template-args...
  local what=$1 want=$2; shift 2
  if helm template mailgate "$CHART" "$@" >"$OUT/refuse.out" 2>&1; then
    fail "the chart rendered $what"
  elif ! grep -qF "$want" "$OUT/refuse.out"; then
    cat "$OUT/refuse.out"; fail "$what: the error does not say '$want'"
  else
    echo "ok   refuses $what: $(grep -F "$want" "$OUT/refuse.out" | head -1 | cut -c1-110)"
  fi
}
expect_failure "no database (neither existingSecret nor secrets.databaseUrl)" \
  "mailgate needs a database"
expect_failure "no encryption key" "mailgate needs an encryption key" \
  --set secrets.databaseUrl=postgres://u@db/mailgate
expect_failure "a chart-created Secret without API keys" "mailgate requires API keys" \
  --set secrets.databaseUrl=postgres://u@db/mailgate \
  --set secrets.encryptionKey=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
expect_failure "a token instead of a keys file in secrets.apiKeys" "never a token itself" \
  -f helm/ci-values/default.yaml --set secrets.apiKeys=not-a-keys-file
expect_failure "extraEnv that overrides the authentication" "always runs mailgate with API keys" \
  -f helm/ci-values/default.yaml --set 'extraEnv[0].name=MAILGATE_AUTH__MODE' --set 'extraEnv[0].value=auto'
expect_failure "a termination grace not above the shutdown grace" "must be larger than config.shutdownGrace" \
  -f helm/ci-values/default.yaml --set config.shutdownGrace=30s
expect_failure "a misspelt setting (schema)" "additional properties" \
  -f helm/ci-values/default.yaml --set config.delivery.concurency=8
expect_failure "no worker threads (schema)" "/config/workerThreads" \
  -f helm/ci-values/default.yaml --set config.workerThreads=0
expect_failure "a bad duration (schema)" "/config/delivery/lease" \
  -f helm/ci-values/default.yaml --set config.delivery.lease=soon
expect_failure "preStop sleep before Kubernetes 1.30" "needs Kubernetes 1.30" \
  -f helm/ci-values/default.yaml --set lifecycle.preStopSleepSeconds=5 --kube-version 1.29.0

# ---------------------------------------------------------------------------------------------
step "Dockerfile and Containerfile.local"
for f in Dockerfile Containerfile.local; do
  if hadolint --no-color "$f"; then echo "ok   hadolint $f"; else fail "hadolint $f"; fi
done
runtime_block() { sed -n '/^# --- runtime instructions/,/^# --- end of runtime instructions/p' "$1"; }
if [ -z "$(runtime_block Dockerfile)" ]; then
  fail "Dockerfile has no runtime instructions block"
elif ! diff <(runtime_block Dockerfile) <(runtime_block Containerfile.local); then
  fail "the runtime instructions of Dockerfile and Containerfile.local differ"
else
  echo "ok   Dockerfile and Containerfile.local share their runtime instructions"
fi
for want in 'USER 65532:65532' 'EXPOSE 50051' 'ENTRYPOINT \["/mailgate"\]' 'CMD \["serve"\]' \
            'MAILGATE_LISTEN_ADDR=0.0.0.0:50051' 'MAILGATE_DATA_DIR=/data' 'HEALTHCHECK' \
            'CMD \["/mailgate", "healthcheck"' 'target-feature=\+crt-static' '--locked' \
            'FROM gcr.io/distroless/static-debian12:nonroot'; do
  grep -Eq -- "$want" Dockerfile || fail "Dockerfile lacks $want"
done
for want in target/ .tools/ .git/; do
  grep -qxF "$want" .dockerignore || fail ".dockerignore lacks $want"
done

step "done"
if [ "$failed" != 0 ]; then
  echo "deploy checks FAILED" >&2
  exit 1
fi
echo "deploy checks passed"

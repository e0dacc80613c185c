#!/usr/bin/env bash
# Provision the real test ground on a fresh machine (Debian, root): redis-server, promtool,
# kube-apiserver + etcd + kubectl built from the Go module proxy, and helm.
# Idempotent and cached by version under ~/.cache/wa-gateway, so a warm re-run takes seconds.
# Prints `export ...` lines for the environment the tests read (source them or use scripts/env.sh).
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
# The CRDs of the add-ons the chart targets (ServiceMonitor, PrometheusRule; KEDA's ScaledObject),
# so the tests validate the rendered objects against their real schemas.
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
KEDA_VERSION="${KEDA_VERSION:-v2.21.0}"
CACHE="${WA_CACHE:-$HOME/.cache/wa-gateway}"
K8S_BIN="$CACHE/k8s/$K8S_VERSION/bin"
ETCD_BIN="$CACHE/etcd/$ETCD_VERSION/bin"
HELM_BIN="$CACHE/helm/$HELM_VERSION/bin"
export GOFLAGS="-buildvcs=false -mod=mod"
export GOTOOLCHAIN=local
export CGO_ENABLED=0

log() { echo "[provision $(date +%H:%M:%S)] $*" >&2; }

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
# redis-cli forms the Redis Cluster of the cluster test (Debian ships it in redis-tools).
command -v redis-cli >/dev/null || need_apt+=(redis-tools)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian's packages start services; the tests start their own instances on random ports.
  systemctl disable --now redis-server prometheus >/dev/null 2>&1 || true
  service redis-server stop >/dev/null 2>&1 || true
  service prometheus stop >/dev/null 2>&1 || true
fi

command -v go >/dev/null || { log "go is required (it ships with this machine kind)"; exit 1; }

build_k8s() {
  if [ -x "$K8S_BIN/kube-apiserver" ] && [ -x "$K8S_BIN/kubectl" ] &&
    "$K8S_BIN/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $K8S_VERSION"; then
    return 0
  fi
  log "building kube-apiserver and kubectl $K8S_VERSION from the Go module proxy (first run only)"
  local mod="$CACHE/k8s/$K8S_VERSION/module"
  mkdir -p "$mod" "$K8S_BIN"
  go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >"$mod/download.json"
  local gomod
  gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' "$mod/download.json" | head -1)
  local staging_ver="v0.${K8S_VERSION#v1.}"
  {
    echo "module wa-gateway/k8s-build"
    echo
    echo "go 1.25"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    # The staging modules are replaced by local folders in kubernetes' go.mod, which does not
    # apply to a dependent module: point each at its published version instead.
    grep -oE '^[[:space:]]*k8s.io/[a-z0-9-]+ => ./staging' "$gomod" | awk '{print $1}' | sort -u |
      while read -r m; do echo "replace $m => $m $staging_ver"; done
  } >"$mod/go.mod"
  cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  # The version is stamped at link time in Kubernetes' own build; without it the binaries call
  # themselves v0.0.0-master and /version has no major/minor.
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local x=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    x+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    x+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$mod" && go mod tidy >/dev/null 2>&1 || true
   cd "$mod" && go build -trimpath -ldflags="-s -w$x" -o "$K8S_BIN/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
   cd "$mod" && go build -trimpath -ldflags="-s -w$x" -o "$K8S_BIN/kubectl" k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  [ -x "$ETCD_BIN/etcd" ] && return 0
  log "building etcd $ETCD_VERSION from the Go module proxy (first run only)"
  local mod="$CACHE/etcd/$ETCD_VERSION/module"
  mkdir -p "$mod" "$ETCD_BIN"
  cat >"$mod/go.mod" <<GOMOD
module wa-gateway/etcd-build

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat >"$mod/main.go" <<'GO'
// The etcd server's own command line (etcdmain), compiled from the published module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$mod" && go mod tidy && go build -trimpath -ldflags='-s -w' -o "$ETCD_BIN/etcd" .)
}

build_helm() {
  [ -x "$HELM_BIN/helm" ] && return 0
  log "building helm $HELM_VERSION from the Go module proxy (first run only)"
  mkdir -p "$HELM_BIN"
  GOBIN="$HELM_BIN" go install -trimpath -ldflags='-s -w' "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

fetch_addon_crds() {
  local dir="$CACHE/addon-crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION-keda-$KEDA_VERSION"
  if [ -s "$dir/keda.sh_scaledobjects.yaml" ]; then
    echo "$dir"
    return 0
  fi
  log "fetching the Prometheus Operator $PROMETHEUS_OPERATOR_VERSION and KEDA $KEDA_VERSION CRDs from the Go module proxy (first run only)"
  mkdir -p "$dir"
  local gopath="$CACHE/addon-crds/gopath"
  local po keda
  po=$(GOMODCACHE="$gopath/pkg/mod" go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  keda=$(GOMODCACHE="$gopath/pkg/mod" go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  cp "$po/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
    "$po/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml" \
    "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" "$dir/"
  # The module cache is read-only by design; it is only needed for the copy.
  if [ -d "$gopath" ]; then chmod -R u+w "$gopath" && rm -rf "$gopath"; fi
  echo "$dir"
}

build_etcd
build_helm
build_k8s
ADDON_CRDS=$(fetch_addon_crds)

log "ready: $("$K8S_BIN/kube-apiserver" --version), etcd $ETCD_VERSION, $("$HELM_BIN/helm" version --short), $(redis-server --version | awk '{print $3}')"
cat <<ENV
export WA_KUBE_APISERVER="$K8S_BIN/kube-apiserver"
export WA_ETCD="$ETCD_BIN/etcd"
export WA_ADDON_CRDS="$ADDON_CRDS"
export PATH="$K8S_BIN:$HELM_BIN:$ETCD_BIN:\$PATH"
ENV

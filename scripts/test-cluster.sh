#!/usr/bin/env bash
# A real one-node Kubernetes v1.20.2 for the tests, built offline from Debian's own packages:
# kube-apiserver, kube-controller-manager, kube-scheduler and kubelet from bookworm's `kubernetes`
# source package (the full upstream tree, vendor/ included) with Debian's Go 1.19 and etcd, and
# Debian's containerd, runc and CNI plugins as the node's runtime.
#
#   scripts/test-cluster.sh up      build what is missing (cold: ~7 min on 2 cores), start the
#                                   cluster, wait for the node to be Ready; the last line printed
#                                   is the path of an admin kubeconfig
#   scripts/test-cluster.sh down    stop it (pods, kubelet, containerd, shims, control plane)
#   scripts/test-cluster.sh build   only build
#   scripts/test-cluster.sh status  exit 0 when the apiserver answers
#   scripts/test-cluster.sh import IMAGE.tar   load a docker-archive into the node's containerd
#
# Everything lives under CML_TEST_CLUSTER_DIR (default /var/tmp/cml-test-cluster, which survives
# between runs on one machine); nothing under /etc is written. Why each odd setting is here
# (oom_score_adj, the TaintNodesByCondition plugin, the private mount namespace) is written down
# in docs/test-cluster.md.
set -euo pipefail
K=${CML_TEST_CLUSTER_DIR:-/var/tmp/cml-test-cluster}
R=$K/run
P=$K/pki
ETCD_PORT=${ETCD_PORT:-23795}
API_PORT=${API_PORT:-16443}
KCM_PORT=${KCM_PORT:-10357}
SCHED_PORT=${SCHED_PORT:-10359}
KUBELET_PORT=${KUBELET_PORT:-10350}
KUBELET_HEALTHZ_PORT=${KUBELET_HEALTHZ_PORT:-10348}
BRIDGE=${BRIDGE:-cmltest0}
POD_CIDR=${POD_CIDR:-10.88.93.0/24}
K8S_SOURCE_VERSION=1.20.5+really1.20.2-1.1+deb12u1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive

log() { printf '[test-cluster] %s\n' "$*" >&2; }
alive() { [ -f "$R/$1.pid" ] && kill -0 "$(cat "$R/$1.pid")" 2>/dev/null; }

# ---------------------------------------------------------------------------------------- build
install_debs() {
  local need=()
  for p in containerd runc containernetworking-plugins busybox-static gcc libc6-dev openssl curl iproute2 util-linux; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return
  [ "$(id -u)" = 0 ] || { log "missing Debian packages (need root to install): ${need[*]}"; exit 1; }
  log "installing Debian packages: ${need[*]}"
  apt-get -q update >/dev/null && apt-get -q install -y --no-install-recommends "${need[@]}" >/dev/null
}

# Go, etcd and the kubernetes source through a private apt configuration (deb-src included).
fetch_sources() {
  [ -f "$K/env.sh" ] && [ -d "$K/src/kubernetes-1.20.2" ] && return
  log "fetching Go 1.19, etcd and the kubernetes $K8S_SOURCE_VERSION source from Debian"
  mkdir -p "$K/apt/lists/partial" "$K/apt/cache/archives/partial" "$K/debs" "$K/root" "$K/src" "$K/bin" "$K/gopath/src/k8s.io"
  local mirror
  mirror=$(grep -hoE '^URIs: *[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=$(grep -hoE '^deb +(\[[^]]*\] +)?[a-z]+://[^ ]+' /etc/apt/sources.list 2>/dev/null | awk '{print $NF}' | head -1)
  printf 'deb %s bookworm main\ndeb-src %s bookworm main\n' "$mirror" "$mirror" > "$K/apt/sources.list"
  cat > "$K/apt/apt.conf" <<EOF
Dir::Etc::sourcelist "$K/apt/sources.list";
Dir::Etc::sourceparts "-";
Dir::State::Lists "$K/apt/lists";
Dir::Cache "$K/apt/cache";
Dir::Cache::archives "$K/apt/cache/archives";
EOF
  export APT_CONFIG=$K/apt/apt.conf
  apt-get -q update >/dev/null
  (cd "$K/debs" && apt-get -q download golang-1.19-go golang-1.19-src etcd-server etcd-client >/dev/null)
  for f in "$K"/debs/*.deb; do dpkg-deb -x "$f" "$K/root"; done
  (cd "$K/src" && apt-get -q source --download-only "kubernetes=$K8S_SOURCE_VERSION" >/dev/null \
     && tar xzf kubernetes_1.20.5+really1.20.2.orig.tar.gz)
  unset APT_CONFIG
  ln -sfn "$K/src/kubernetes-1.20.2" "$K/gopath/src/k8s.io/kubernetes"
  # GOPATH mode, as upstream built 1.20: module+vendor mode fails with go1.19
  cat > "$K/env.sh.new" <<EOF
export PATH=$K/root/usr/lib/go-1.19/bin:$K/root/usr/bin:$K/bin:\$PATH
export GOPATH=$K/gopath GOCACHE=$K/gocache GO111MODULE=off GOFLAGS= GOPROXY=off GOSUMDB=off GOTOOLCHAIN=local CGO_ENABLED=0
EOF
  mv "$K/env.sh.new" "$K/env.sh"
}

# Kubernetes 1.20 vendors modern-go/reflect2 1.0.1, whose map iteration calls Go's runtime with
# the pre-1.18 signature: with Debian's Go 1.19 the apiserver dies with SIGSEGV ("fatal error:
# fault" in aeshashbody) as soon as it encodes a map field such as a ResourceQuota's. This is
# reflect2 1.0.2's fix (the full hiter layout, and mapiterinit filling one the caller owns).
patch_reflect2() {
  local d=$K/src/kubernetes-1.20.2/vendor/github.com/modern-go/reflect2
  grep -q 'checkBucket' "$d/unsafe_link.go" && return
  log "patching the vendored reflect2 for Go 1.19 (reflect2 1.0.2's fix)"
  python3 - "$d" <<'PY'
import sys
from pathlib import Path
d = Path(sys.argv[1])
link = d / "unsafe_link.go"
s = link.read_text()
s = s.replace("func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter",
              "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)")
s = s.replace("""type hiter struct {
	key   unsafe.Pointer // Must be in first position.  Write nil to indicate iteration end (see cmd/internal/gc/range.go).
	value unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).
	// rest fields are ignored
}""", """type hiter struct {
	key         unsafe.Pointer
	value       unsafe.Pointer
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}""")
assert "checkBucket" in s and "it *hiter)" in s
link.write_text(s)
m = d / "unsafe_map.go"
s = m.read_text()
old = """	return &UnsafeMapIterator{
		hiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),"""
assert old in s
s = s.replace(old, """	var it hiter
	mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)
	return &UnsafeMapIterator{
		hiter:      &it,""")
m.write_text(s)
PY
  rm -f "$K/bin/.reflect2-patched"
}

build_binaries() {
  local missing=0 c
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet pause .reflect2-patched; do
    [ -e "$K/bin/$c" ] || missing=1
  done
  [ $missing = 0 ] && return
  fetch_sources
  patch_reflect2
  if [ ! -e "$K/bin/.reflect2-patched" ]; then  # binaries built before the patch: build them again
    rm -f "$K/bin/kube-apiserver" "$K/bin/kube-controller-manager" "$K/bin/kube-scheduler" "$K/bin/kubelet"
  fi
  # shellcheck disable=SC1091
  . "$K/env.sh"
  cd "$K/gopath/src/k8s.io/kubernetes"
  if [ ! -f pkg/generated/openapi/zz_generated.openapi.go ]; then
    # upstream generates this at build time; it is not in the tarball (same inputs as Makefile.generated_files)
    log "generating the OpenAPI definitions"
    go build -o "$K/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
    find -H . -not \( \( -path ./_\* -o -path ./.\* -o -path ./vendor \) -prune \) -type f -name '*.go' \
      | sed 's|^./staging/src|vendor|; s|/[^/]*$||; s|^./||' | LC_ALL=C sort -u > "$K/all_go_dirs.txt"
    while read -r d; do find "$d/" -maxdepth 1 -type f -name '*.go'; done < "$K/all_go_dirs.txt" \
      | xargs grep -l '^// *+k8s:' | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
      | xargs grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' > "$K/openapi_pkgs.txt"
    "$K/bin/openapi-gen" --logtostderr -i "$(paste -sd, "$K/openapi_pkgs.txt")" -p k8s.io/kubernetes/pkg/generated/openapi \
      -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$K/kube_violations.report" 2>"$K/openapi-gen.log"
  fi
  local ldf="-s -w" p
  for p in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldf="$ldf -X $p.gitVersion=v1.20.2 -X $p.gitMajor=1 -X $p.gitMinor=20 -X $p.gitTreeState=clean -X $p.buildDate=2021-01-13T00:00:00Z"
  done
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    [ -x "$K/bin/$c" ] && continue
    log "building $c (the first one takes minutes)"
    nice -n 10 go build -tags=selinux,notest -ldflags "$ldf" -o "$K/bin/$c.new" "./cmd/$c"
    mv "$K/bin/$c.new" "$K/bin/$c"
  done
  gcc -Os -Wall -Werror -static -DVERSION=v3.4-local -o "$K/bin/pause" build/pause/linux/pause.c && strip "$K/bin/pause"
  touch "$K/bin/.reflect2-patched"
  rm -rf "$K/gocache"    # 1.3 GB the cluster does not need once built
  cd - >/dev/null
}

make_pki() {
  [ -f "$P/tokens.csv" ] && return
  log "making the cluster's PKI"
  mkdir -p "$P.new" && cd "$P.new"
  openssl genrsa -out ca.key 2048 2>/dev/null
  openssl req -x509 -new -nodes -key ca.key -subj "/CN=cml-test-cluster-ca" -days 3650 -out ca.crt
  serving() {  # name, subject, SANs
    openssl genrsa -out "$1.key" 2048 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$3" > "$1.ext"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  }
  client() {  # name, subject
    openssl genrsa -out "$1.key" 2048 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > client.ext
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile client.ext -out "$1.crt" 2>/dev/null
  }
  serving apiserver /CN=kube-apiserver \
    IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
  serving kubelet /CN=localhost DNS:localhost,IP:127.0.0.1
  client admin "/O=system:masters/CN=admin"
  client kcm /CN=system:kube-controller-manager
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  printf '%s\n' 'admin-token-0123456789,admin,admin,"system:masters"' 'limited-token-0123456789,limited,limited' > tokens.csv
  rm -f ./*.csr
  cd - >/dev/null
  mv "$P.new" "$P"
}

# Write a file only when its content changes: containerd watches its CNI folder and would read a
# file half-written while the cluster runs.
put() {  # path (content on stdin)
  cat > "$1.new"
  if cmp -s "$1.new" "$1"; then rm -f "$1.new"; else mv "$1.new" "$1"; fi
}

write_configs() {
  mkdir -p "$K/cni" "$R" "$K/containerd" "$K/kubelet" "$K/certs.d"
  put "$K/containerd.toml" <<EOF
version = 2
root = "$K/containerd/root"
state = "$K/containerd/state"
[grpc]
  address = "$R/containerd.sock"
[ttrpc]
  address = "$R/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$K/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.4"
  # these machines drop CAP_SYS_RESOURCE: nobody may lower oom_score_adj (the kubelet asks -998)
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    # per-registry hosts.toml files (tests add the appliance's registry here)
    config_path = "$K/certs.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$K/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$K/cni"
    max_conf_num = 1
EOF
  put "$K/cni/10-cml.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "cml-test", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$K/cni-ipam"}},
  {"type": "loopback"}]}
EOF
  put "$K/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $P/kubelet.crt
tlsPrivateKeyFile: $P/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $P/ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
oomScoreAdj: 0
makeIPTablesUtilChains: false
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
syncFrequency: 10s
fileCheckFrequency: 20s
nodeStatusUpdateFrequency: 2s
serializeImagePulls: false
volumePluginDir: $K/kubelet/volume-plugins
EOF
  local token=admin-token-0123456789 u
  for u in admin kcm; do
    put "$K/kubeconfig$([ $u = kcm ] && echo -kcm || true)" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: $P/ca.crt}
users:
- name: $u
  user: {client-certificate: $P/$u.crt, client-key: $P/$u.key}
- name: admin-token
  user: {token: $token}
contexts:
- name: local
  context: {cluster: local, user: $u}
- name: local-token
  context: {cluster: local, user: admin-token}
current-context: local
EOF
  done
}

# The node's images, as docker-archive tarballs (nothing can be pulled here): pause and busybox.
make_images() {
  [ -f "$K/images/busybox.tar" ] && [ -f "$K/images/pause.tar" ] && return
  mkdir -p "$K/images"
  python3 "$(dirname "$0")/make-image-archive.py" "$K/images/pause.tar" k8s.gcr.io/pause:3.4 \
    --entrypoint '["/pause"]' "$K/bin/pause=/pause"
  python3 "$(dirname "$0")/make-image-archive.py" "$K/images/busybox.tar" docker.io/local/busybox:1.35 \
    --cmd '["/bin/sh"]' --busybox-applets /bin/busybox
}

build() {
  mkdir -p "$K" "$R"
  exec 9>"$K/.build.lock"
  flock 9
  install_debs
  build_binaries
  make_pki
  write_configs
  make_images
  flock -u 9
}

# ---------------------------------------------------------------------------------------- up
start_etcd() {
  "$K/root/usr/bin/etcd" --name local --data-dir "$R/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT+10))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT+10))" \
    --initial-cluster "local=http://127.0.0.1:$((ETCD_PORT+10))" --logger zap --log-level warn >> "$R/etcd.log" 2>&1 8>&- 9>&- &
  echo $! > "$R/etcd.pid"
  local healthy=""
  for _ in $(seq 1 100); do
    "$K/root/usr/bin/etcdctl" --endpoints="127.0.0.1:$ETCD_PORT" endpoint health >/dev/null 2>&1 && { healthy=1; break; }
    sleep 0.2
  done
  [ -n "$healthy" ] || { log "etcd did not become healthy; see $R/etcd.log"; exit 1; }
  # Some history before the apiserver starts, as any real cluster's store has: the apiserver's
  # watch caches then begin past resourceVersion 1, so a watch from an old resourceVersion gets
  # 410 Gone as on a real cluster (on an empty store the pods' cache would serve it from rv 1).
  for i in $(seq 1 20); do
    "$K/root/usr/bin/etcdctl" --endpoints="127.0.0.1:$ETCD_PORT" put /cml-test-cluster/history "$i" >/dev/null
  done
}

start_apiserver() {
  # TaintNodesByCondition taints a new node not-ready and only the nodelifecycle controller (off here)
  # would lift it. The advertise address is any non-loopback address that nobody dials.
  "$K/bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=203.0.113.1 --secure-port="$API_PORT" --insecure-port=0 \
    --cert-dir="$R/certs" --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" --token-auth-file="$P/tokens.csv" \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=RBAC --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
    --kubelet-client-certificate="$P/admin.crt" --kubelet-client-key="$P/admin.key" \
    --kubelet-certificate-authority="$P/ca.crt" --kubelet-preferred-address-types=Hostname,InternalIP,ExternalIP \
    --etcd-compaction-interval="${COMPACT:-5m}" --watch-cache="${WATCH_CACHE:-true}" \
    --disable-admission-plugins=TaintNodesByCondition --profiling=false --v=1 >> "$R/kube-apiserver.log" 2>&1 8>&- 9>&- &
  echo $! > "$R/kube-apiserver.pid"
  for _ in $(seq 1 240); do
    [ "$(curl -s --cacert "$P/ca.crt" -H "Authorization: Bearer admin-token-0123456789" "https://127.0.0.1:$API_PORT/readyz" 2>/dev/null)" = ok ] && return
    alive kube-apiserver || break
    sleep 0.5
  done
  log "kube-apiserver did not become ready; see $R/kube-apiserver.log"; exit 1
}

start_kcm() {
  "$K/bin/kube-controller-manager" --kubeconfig="$K/kubeconfig-kcm" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --port=0 --leader-elect=false \
    --use-service-account-credentials=true --service-account-private-key-file="$P/sa.key" \
    --root-ca-file="$P/ca.crt" --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key" \
    --controllers='*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-pvc-protection,-pv-protection,-ttl,-bootstrapsigner,-tokencleaner' \
    --v=1 >> "$R/kube-controller-manager.log" 2>&1 8>&- 9>&- &
  echo $! > "$R/kube-controller-manager.pid"
}

start_scheduler() {
  "$K/bin/kube-scheduler" --kubeconfig="$K/kubeconfig" --authentication-kubeconfig="$K/kubeconfig" \
    --authorization-kubeconfig="$K/kubeconfig" --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --port=0 \
    --leader-elect=false --v=1 >> "$R/kube-scheduler.log" 2>&1 8>&- 9>&- &
  echo $! > "$R/kube-scheduler.pid"
}

# containerd and the kubelet share one private mount namespace, held by a `sleep infinity`: kubelet
# 1.20 writes /var/log/pods, /var/log/containers and /var/lib/kubelet/device-plugins whatever its
# root dir, and its garbage collector deletes /var/log/pods entries it does not own.
start_mount_namespace() {
  mkdir -p "$K/hostfs/var-log" "$K/hostfs/var-lib"
  unshare --mount --propagation private -- /bin/sh -c \
    "mount --bind $K/hostfs/var-log /var/log && mount --bind $K/hostfs/var-lib /var/lib && exec sleep infinity" >> "$R/mntns.log" 2>&1 8>&- 9>&- &
  echo $! > "$R/mntns.pid"
  for _ in $(seq 1 50); do grep -q ' /var/lib ' "/proc/$(cat "$R/mntns.pid")/mountinfo" 2>/dev/null && return; sleep 0.1; done
  log "mount namespace setup failed; see $R/mntns.log"; exit 1
}

# Run in the node's mount namespace, in place of the calling (background) shell, so that the
# recorded $! is the program's own pid.
exec_in_node() { exec nsenter --mount="/proc/$(cat "$R/mntns.pid")/ns/mnt" -- "$@" 8>&- 9>&-; }

start_containerd() {
  ulimit -n 20000 2>/dev/null || true
  exec_in_node containerd --config "$K/containerd.toml" >> "$R/containerd.log" 2>&1 &
  echo $! > "$R/containerd.pid"
  for _ in $(seq 1 100); do ctr --address "$R/containerd.sock" version >/dev/null 2>&1 && return; sleep 0.1; done
  log "containerd did not start; see $R/containerd.log"; exit 1
}

import_image() {
  ctr --address "$R/containerd.sock" -n k8s.io images import "$1" >/dev/null
}

start_kubelet() {
  mkdir -p "$K/kubelet/root" "$K/kubelet/pki" "$K/kubelet/volume-plugins" "$K/cni-ipam"
  exec_in_node "$K/bin/kubelet" --config="$K/kubelet-config.yaml" --kubeconfig="$K/kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint="unix://$R/containerd.sock" \
    --root-dir="$K/kubelet/root" --cert-dir="$K/kubelet/pki" \
    --hostname-override=localhost --pod-infra-container-image=k8s.gcr.io/pause:3.4 --v=1 >> "$R/kubelet.log" 2>&1 &
  echo $! > "$R/kubelet.pid"
}

node_ready_since() {  # a Ready condition left over from an earlier kubelet does not count
  local since=$1 out st hb
  out=$(curl -s --cacert "$P/ca.crt" -H "Authorization: Bearer admin-token-0123456789" \
        "https://127.0.0.1:$API_PORT/api/v1/nodes/localhost" 2>/dev/null) || return 1
  read -r st hb < <(printf '%s' "$out" | python3 -c '
import json, sys
try:
    node = json.load(sys.stdin)
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"][0]
    print(ready["status"], ready["lastHeartbeatTime"])
except Exception:
    print("Unknown", "-")')
  [ "$st" = True ] && [[ ! "$hb" < "$since" ]]
}

up() {
  build
  mkdir -p "$R"
  exec 8>"$K/.up.lock"
  flock 8
  local t0=$SECONDS since
  alive etcd || start_etcd
  alive kube-apiserver || start_apiserver
  alive kube-controller-manager || start_kcm
  alive kube-scheduler || start_scheduler
  alive mntns || start_mount_namespace
  alive containerd || start_containerd
  for img in "$K"/images/*.tar; do import_image "$img"; done
  since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  if alive kubelet; then since=1970-01-01T00:00:00Z; else start_kubelet; fi
  for _ in $(seq 1 240); do
    node_ready_since "$since" && break
    alive kubelet || { log "the kubelet exited; see $R/kubelet.log"; exit 1; }
    sleep 0.5
  done
  node_ready_since "$since" || { log "the node did not turn Ready; see $R/kubelet.log"; exit 1; }
  log "cluster up in $((SECONDS - t0)) s (node localhost Ready)"
  echo "$K/kubeconfig"
}

# ---------------------------------------------------------------------------------------- down
stop_pid() {
  local n=$1 p
  [ -f "$R/$n.pid" ] || return 0
  p=$(cat "$R/$n.pid")
  kill "$p" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$p" 2>/dev/null || true
  rm -f "$R/$n.pid"
}

down() {
  local ctr="ctr --address $R/containerd.sock -n k8s.io" t c d
  stop_pid kubelet
  if alive containerd; then
    for t in $($ctr tasks ls -q 2>/dev/null); do $ctr tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    sleep 0.5
    for t in $($ctr tasks ls -q 2>/dev/null); do $ctr tasks rm -f "$t" >/dev/null 2>&1 || true; done
    for c in $($ctr containers ls -q 2>/dev/null); do $ctr containers rm "$c" >/dev/null 2>&1 || true; done
  fi
  stop_pid containerd
  # one shim per pod outlives containerd; only those naming this containerd's socket are ours
  for d in /proc/[0-9]*; do
    tr '\0' ' ' < "$d/cmdline" 2>/dev/null | grep -qE "containerd-shim[^ ]* .*-address $R/containerd.sock( |$)" || continue
    kill "${d#/proc/}" 2>/dev/null || true
  done
  stop_pid mntns
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE" || true
  rm -rf "$K/cni-ipam"
  for d in /sys/fs/cgroup/*/k8s.io; do rmdir "$d" 2>/dev/null || true; done
  for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_pid "$c"; done
  rm -rf "$R/etcd"
  log "cluster stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  build) build ;;
  status) curl -sf --cacert "$P/ca.crt" -H "Authorization: Bearer admin-token-0123456789" "https://127.0.0.1:$API_PORT/readyz" >/dev/null ;;
  import) import_image "$2" ;;
  *) echo "usage: $0 up|down|build|status|import IMAGE.tar" >&2; exit 2 ;;
esac

#!/bin/sh
# Sets up a fresh Debian 12 machine for husk: installs the packages the build and the tests
# need, builds the guest image (kernel + initramfs, cached under /var/cache/husk) and the husk
# binary, boots the guest image once under QEMU as a smoke test, makes the default VM template
# and runs a first container in a VM.
#
#   ./scripts/setup.sh            everything
#   ./scripts/setup.sh --deps     only the apt packages
set -eu
cd "$(dirname "$0")/.."

# protobuf-compiler: the build of the e2e tests' CRI client (the k8s-cri crate runs protoc);
# containernetworking-plugins: the CNI plugins of the CRI tests' pod network.
PACKAGES="
  build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils patch perl
  linux-source-6.1
  qemu-system-x86 strace
  busybox-static
  iproute2
  podman conmon crun runc uidmap slirp4netns netavark aardvark-dns iptables
  containerd docker.io
  containernetworking-plugins protobuf-compiler
"

install_deps() {
    missing=""
    for p in $PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        echo "== installing:$missing"
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -q
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing
    else
        echo "== apt packages: all present"
    fi
}

# crun 1.8 refuses a hybrid cgroup v1 host whose hugetlb controller is not mounted (it looks
# for /sys/fs/cgroup/hugetlb); mount that hierarchy where the kernel has it and nobody did.
mount_hugetlb_v1() {
    [ -d /sys/fs/cgroup/memory ] || return 0
    grep -q '^hugetlb' /proc/cgroups || return 0
    mountpoint -q /sys/fs/cgroup/hugetlb && return 0
    echo "== mounting the cgroup v1 hugetlb hierarchy (for crun)"
    mkdir -p /sys/fs/cgroup/hugetlb
    mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
}

install_deps
[ "$(id -u)" -eq 0 ] && mount_hugetlb_v1
[ "${1:-}" = "--deps" ] && exit 0

echo "== building the guest image"
cargo xtask build-image
echo "== building husk"
cargo build --release --workspace
echo "== smoke test: boot the guest image under QEMU (TCG, then KVM if available)"
cargo test --release -p husk-e2e --test guest_image_qemu -- --nocapture
echo "== the default VM template (one cold boot, saved; every later container restores it)"
target/release/husk template build
echo "== main job: a first container (husk run of busybox, printing its guest kernel)"
./scripts/first-container.sh target/release/husk

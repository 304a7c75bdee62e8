#!/bin/sh
# A user's first container: `husk run` of a busybox-static bundle that prints the kernel it
# runs on (the VM's own, not the host's), with the time it took.
#
#   ./scripts/first-container.sh [HUSK_BINARY]
set -eu
husk=${1:-husk}
work=$(mktemp -d /tmp/husk-first-XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs/bin" "$work/rootfs/proc" "$work/rootfs/dev" "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/busybox"
ln -s busybox "$work/rootfs/bin/sh"
ln -s busybox "$work/rootfs/bin/uname"
cat > "$work/config.json" <<'JSON'
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": {"uid": 0, "gid": 0},
    "args": ["sh", "-c", "echo \"hello from $(uname -s) $(uname -r) in a husk VM (host: $HOST_KERNEL)\""],
    "env": ["PATH=/bin"],
    "cwd": "/"
  },
  "root": {"path": "rootfs"},
  "hostname": "first",
  "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
  "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]}
}
JSON
sed -i "s|\$HOST_KERNEL|$(uname -r)|" "$work/config.json"
start=$(date +%s%N)
"$husk" --root "$work/state" run --bundle "$work" "first-$$"
end=$(date +%s%N)
echo "husk run took $(( (end - start) / 1000000 )) ms"

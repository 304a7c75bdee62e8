//! Where the runtime spec defines runc's behaviour, a container in a husk VM behaves the same,
//! checked from inside the container on bundles made as spec tools make them: `husk spec`'s
//! read-only root on an image without mount points, a cpuset naming host CPUs, and
//! `rootfsPropagation` on the container's root. One VM boot each (~15 s on nested kvm_pvm).
//! docs/conformance.md lists the rest and where husk differs.

use std::path::Path;
use std::process::{Command, Stdio};

use husk_e2e::{
    ContainerRoot, TempDir, busybox_bundle, busybox_rootfs, guest_image, husk, husk_binary,
    is_root, kvm_available, skip,
};
use serde_json::{Value, json};

fn requirements() -> bool {
    if guest_image().is_none() {
        return false;
    }
    if !kvm_available() || !is_root() {
        skip::<()>("needs /dev/kvm and root");
        return false;
    }
    true
}

/// `husk run` of the bundle; (exit code, stdout, stderr).
fn run(root: &Path, id: &str, bundle: &Path) -> (i32, String, String) {
    let out = Command::new(husk_binary())
        .arg("--root")
        .arg(root)
        .args(["run", id, "--bundle"])
        .arg(bundle)
        .stdin(Stdio::null())
        .output()
        .expect("running husk run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn edit_config(bundle: &Path, edit: impl FnOnce(&mut Value)) {
    let path = bundle.join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// `husk spec`'s bundle (as `runc spec`'s: root.readonly, /proc, /dev, /dev/pts, /dev/shm,
/// /dev/mqueue, /sys, /sys/fs/cgroup) on a busybox rootfs with none of those directories:
/// husk-init creates the mount points, as runc does, and makes the root read-only last.
#[test]
fn a_spec_bundle_with_a_readonly_root_runs_on_a_rootfs_without_mount_points() {
    if !requirements() {
        return;
    }
    let tmp = TempDir::new("conf-ro");
    let root = tmp.path().join("state");
    let _cleanup = ContainerRoot(root.clone());
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let Some(rootfs) = busybox_rootfs(&bundle.join("rootfs")) else {
        return;
    };
    for d in ["proc", "sys", "dev", "tmp"] {
        std::fs::remove_dir(rootfs.join(d)).unwrap();
    }
    let (code, _, err) = husk(&root, &["spec", "--bundle", bundle.to_str().unwrap()]);
    assert_eq!(code, 0, "husk spec: {err}");
    let script = "if touch /new 2>/dev/null; then echo ROOT-WRITABLE; fi; \
                  grep -q '^Name:' /proc/self/status && echo proc; \
                  test -c /dev/null && echo dev; \
                  grep -c ' /sys/fs/cgroup ' /proc/self/mountinfo";
    edit_config(&bundle, |v| {
        assert_eq!(v["root"]["readonly"], json!(true));
        v["process"]["args"] = json!(["sh", "-c", script]);
        v["process"]["terminal"] = json!(false);
    });
    let (code, out, err) = run(&root, "ro1", &bundle);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "proc\ndev\n1\n", "{err}");
    // The mount points are in the image now, as runc leaves them; nothing else was written.
    for d in ["proc", "sys", "dev"] {
        assert!(rootfs.join(d).is_dir(), "{d} was not created");
    }
    assert!(!rootfs.join("new").exists());
}

/// A cpuset of host CPUs ("2-3") with a quota of half a CPU: the VM gets two vCPUs, and the
/// container's cgroup in the guest has the guest's CPUs 0-1 and the quota.
#[test]
fn a_cpuset_of_host_cpus_sizes_the_vm_and_is_renumbered_in_it() {
    if !requirements() {
        return;
    }
    let tmp = TempDir::new("conf-cpuset");
    let root = tmp.path().join("state");
    let _cleanup = ContainerRoot(root.clone());
    let dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&dir).unwrap();
    let script = "nproc; cat /sys/fs/cgroup/cpuset.cpus /sys/fs/cgroup/cpu.max";
    let Some(bundle) = busybox_bundle(&dir, &["sh", "-c", script]) else {
        return;
    };
    edit_config(&bundle, |v| {
        v["linux"]["resources"] =
            json!({"cpu": {"cpus": "2-3", "mems": "0", "quota": 50000, "period": 100000}});
        v["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "cgroup"}));
        v["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}));
    });
    let (code, out, err) = run(&root, "cpus1", &bundle);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "2\n0-1\n50000 100000\n", "{err}");
}

/// `rootfsPropagation: shared` makes the container's root mount shared (its mountinfo line
/// says `shared:N`), in the VM's layout (the rootfs under the virtio-fs share).
#[test]
fn root_propagation_reaches_the_container_root_in_the_vm() {
    if !requirements() {
        return;
    }
    let tmp = TempDir::new("conf-prop");
    let root = tmp.path().join("state");
    let _cleanup = ContainerRoot(root.clone());
    let dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&dir).unwrap();
    let Some(bundle) = busybox_bundle(&dir, &["cat", "/proc/self/mountinfo"]) else {
        return;
    };
    edit_config(&bundle, |v| {
        v["linux"]["rootfsPropagation"] = json!("shared");
    });
    let (code, out, err) = run(&root, "prop1", &bundle);
    assert_eq!(code, 0, "{out}{err}");
    // id parent dev root mountpoint options [optional fields...] - type source options
    let line = out
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no root in the mountinfo: {out}"));
    let optional: Vec<&str> = line
        .split_whitespace()
        .skip(6)
        .take_while(|f| *f != "-")
        .collect();
    assert!(
        optional.iter().any(|f| f.starts_with("shared:")),
        "the container's root is not shared: {line}"
    );
}

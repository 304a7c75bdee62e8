//! The container's file systems in the VM, served by the VMM's virtio-fs device: writes land
//! in the bundle on the host, bind-mounted volumes are shared both ways, read-only binds and a
//! read-only root refuse writes, and a symlink to a host path resolves inside the rootfs.
//! Two VM boots (~50 s each on nested kvm_pvm).

use std::process::{Command, Stdio};

use husk_e2e::{TempDir, busybox_bundle, guest_image, husk_binary, is_root, kvm_available, skip};

fn run(root: &std::path::Path, id: &str, bundle: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(husk_binary())
        .arg("--root")
        .arg(root)
        .args(["run", id, "--bundle"])
        .arg(bundle)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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

/// Adds bind mounts to a bundle's config.json.
fn add_mounts(bundle: &std::path::Path, mounts: &[serde_json::Value], readonly_root: bool) {
    let path = bundle.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let list = v["mounts"].as_array_mut().unwrap();
    list.extend(mounts.iter().cloned());
    if readonly_root {
        v["root"]["readonly"] = serde_json::Value::Bool(true);
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn rootfs_and_volumes_are_shared_with_the_host() {
    if !requirements() {
        return;
    }
    let tmp = TempDir::new("fs-share");
    let bundle_dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    let script = "echo from-the-vm > /written-in-vm && \
        ln -s data /hardlink-target-sym && \
        cat /vol/hostfile && echo appended >> /vol/hostfile && \
        mkdir /vol/newdir && echo deep > /vol/newdir/f && \
        if echo x > /rovol/f 2>/dev/null; then echo RO-WRITE-WORKED; fi; \
        cat /rovol/f; \
        echo shadow: $(cat /escape); \
        ls -l /written-in-vm";
    let Some(bundle) = busybox_bundle(&bundle_dir, &["sh", "-c", script]) else {
        return;
    };
    let rootfs = bundle.join("rootfs");
    // A decoy /etc/shadow in the rootfs, and a symlink to the absolute path /etc/shadow: in
    // the container it must resolve to the decoy, never to the host's file.
    std::fs::write(rootfs.join("etc/shadow"), "decoy-shadow\n").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", rootfs.join("escape")).unwrap();
    let vol = tmp.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("hostfile"), "from-the-host\n").unwrap();
    let rovol = tmp.path().join("rovol");
    std::fs::create_dir_all(&rovol).unwrap();
    std::fs::write(rovol.join("f"), "read-only-content\n").unwrap();
    add_mounts(
        &bundle,
        &[
            serde_json::json!({"destination": "/vol", "type": "bind", "source": vol, "options": ["rbind", "rw"]}),
            serde_json::json!({"destination": "/rovol", "type": "bind", "source": rovol, "options": ["bind", "ro"]}),
        ],
        false,
    );
    let (code, out, err) = run(&tmp.path().join("state"), "fs1", &bundle);
    println!("{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("from-the-host"), "{out}");
    assert!(out.contains("read-only-content"), "{out}");
    assert!(
        !out.contains("RO-WRITE-WORKED"),
        "a read-only bind accepted a write: {out}"
    );
    assert!(
        out.contains("shadow: decoy-shadow"),
        "symlink escaped the rootfs: {out}"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("written-in-vm")).unwrap(),
        "from-the-vm\n"
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("hostfile")).unwrap(),
        "from-the-host\nappended\n"
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("newdir/f")).unwrap(),
        "deep\n"
    );
    assert_eq!(
        std::fs::read_to_string(rovol.join("f")).unwrap(),
        "read-only-content\n"
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("hardlink-target-sym")).unwrap(),
        std::path::Path::new("data")
    );
}

#[test]
fn a_readonly_root_refuses_writes() {
    if !requirements() {
        return;
    }
    let tmp = TempDir::new("fs-ro");
    let bundle_dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    let script = "if touch /newfile 2>/dev/null; then echo WROTE; exit 1; fi; echo refused; touch /tmp/ok && echo tmp-ok";
    let Some(bundle) = busybox_bundle(&bundle_dir, &["sh", "-c", script]) else {
        return;
    };
    add_mounts(&bundle, &[], true);
    let (code, out, err) = run(&tmp.path().join("state"), "fs2", &bundle);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("refused") && out.contains("tmp-ok"), "{out}");
    assert!(!bundle.join("rootfs/newfile").exists());
}

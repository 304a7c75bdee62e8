//! The `bundle_config` target: the input is a bundle's `config.json`, loaded and validated the
//! way `husk create` does (`Bundle::load`: JSON and spec parsing, version, root, process, VM
//! sizing from resources and the `io.husk.vm.*` annotations).

use std::path::Path;

use super::scratch::ScratchDir;
use crate::oci::bundle::Bundle;
use crate::vmm::MAX_VCPUS;

thread_local! {
    /// A bundle directory (with a `rootfs` directory) whose config.json each input replaces.
    /// One per thread, so that tests running the target in parallel do not race on the file;
    /// removed when the thread ends (the fuzzer's main thread never does: it stays in the
    /// temporary directory).
    static BUNDLE_DIR: ScratchDir = {
        let dir = ScratchDir::new("bundle");
        std::fs::create_dir(dir.0.join("rootfs")).expect("create the bundle's rootfs");
        dir
    };
}

pub(super) fn run(data: &[u8]) {
    BUNDLE_DIR.with(|dir| load(&dir.0, data));
}

fn load(dir: &Path, data: &[u8]) {
    std::fs::write(dir.join("config.json"), data).expect("write config.json");
    match Bundle::load(dir) {
        Ok(bundle) => {
            // What the rest of husk relies on from a loaded bundle.
            assert_eq!(
                bundle.config_json, data,
                "config.json is sent byte for byte"
            );
            assert!(
                (64..=64 * 1024).contains(&bundle.vm.memory_mib),
                "{:?}",
                bundle.vm
            );
            assert!(
                (1..=MAX_VCPUS).contains(&bundle.vm.vcpus),
                "{:?}",
                bundle.vm
            );
            assert!(bundle.rootfs.is_absolute() && bundle.dir.is_absolute());
            assert!(bundle.spec.process().is_some());
            let _ = bundle.terminal();
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
        }
    }
}

pub(super) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let process = r#""process":{"terminal":false,"user":{"uid":0,"gid":0},"args":["sh"],"env":["PATH=/bin"],"cwd":"/"}"#;
    let spec = |extra: &str| {
        format!(r#"{{"ociVersion":"1.0.2",{process},"root":{{"path":"rootfs"}}{extra}}}"#)
            .into_bytes()
    };
    vec![
        ("minimal", spec("")),
        (
            "limits",
            spec(
                r#","linux":{"resources":{"memory":{"limit":536870912},"cpu":{"quota":150000,"period":100000}}}"#,
            ),
        ),
        (
            "cpuset",
            spec(r#","linux":{"resources":{"cpu":{"cpus":"0-2,7"}}}"#),
        ),
        (
            "annotations",
            spec(r#","annotations":{"io.husk.vm.memory_mib":"128","io.husk.vm.vcpus":"3"}"#),
        ),
        (
            "bad_annotations",
            spec(r#","annotations":{"io.husk.vm.memory_mib":"-1","io.husk.vm.vcpus":"300"}"#),
        ),
        (
            "mounts",
            spec(
                r#","mounts":[{"destination":"/data","type":"bind","source":"../etc","options":["rbind","ro"]}],"hostname":"x""#,
            ),
        ),
        ("no_root", br#"{"ociVersion":"1.0.2"}"#.to_vec()),
        (
            "bad_version",
            br#"{"ociVersion":"2.0","root":{"path":"/"}}"#.to_vec(),
        ),
        (
            "not_json",
            b"{\"ociVersion\": \"1.0.2\",\n \"root\": 7".to_vec(),
        ),
    ]
}

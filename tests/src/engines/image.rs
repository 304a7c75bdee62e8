//! The test image, built here from busybox-static since no registry is reachable: a rootfs
//! tar for `podman import` / `docker import`, and an OCI image archive (layout, index,
//! manifest, config, one layer; made by hand) for `ctr images import`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::command::expect_ok;

/// The name the test image has in every engine.
pub const IMAGE: &str = "localhost/husk-busybox:test";

/// A busybox rootfs and its tar (`rootfs.tar`) in `dir`, or a skip.
pub fn image_tar(dir: &Path) -> Option<PathBuf> {
    let rootfs = crate::busybox_rootfs(&dir.join("image-rootfs"))?;
    let tar = dir.join("rootfs.tar");
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".");
    expect_ok(cmd);
    Some(tar)
}

fn sha256_file(path: &Path) -> String {
    let mut cmd = Command::new("sha256sum");
    cmd.arg(path);
    let out = expect_ok(cmd);
    out.split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// An OCI image archive (the layout `ctr images import` reads) of one uncompressed layer,
/// `layer_tar`, named [`IMAGE`], for linux/amd64.
pub fn oci_archive(layer_tar: &Path, out: &Path) {
    let config = serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh"]});
    oci_image_archive(layer_tar, out, IMAGE, config);
}

/// As [`oci_archive`], for the image `name` with the image configuration's `config` object
/// (`Entrypoint`, `Cmd`, `Env`, ...).
pub fn oci_image_archive(layer_tar: &Path, out: &Path, name: &str, config: serde_json::Value) {
    let dir = out.with_extension("layout");
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let tmp = blobs.join("incoming");
        std::fs::write(&tmp, bytes).unwrap();
        let digest = sha256_file(&tmp);
        std::fs::rename(&tmp, blobs.join(&digest)).unwrap();
        (digest, bytes.len())
    };
    let layer = std::fs::read(layer_tar).unwrap();
    let (layer_digest, layer_size) = put(&layer);
    // Uncompressed: the diff id is the layer's own digest.
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": "test"}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(&dir).arg("-cf").arg(out).arg(".");
    expect_ok(cmd);
}

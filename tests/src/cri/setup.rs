//! What the harness sets up before containerd's CRI plugin can run a pod: the CRI plugin's
//! configuration, the pause image ([`PAUSE_C`], [`PAUSE_IMAGE`]), and the gRPC channel. The
//! harness (`cri.rs`) uses it; it uses nothing of the harness's.

use std::path::{Path, PathBuf};
use std::process::Command;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::cni;
use crate::engines::{self, expect_ok};

/// The pause program the sandbox image runs.
pub const PAUSE_C: &str = include_str!("pause.c");

/// The sandbox image's name (`sandbox_image`).
pub const PAUSE_IMAGE: &str = "localhost/husk-pause:test";

/// Where the paths a [`Cri`] configures are.
pub(super) struct CriConfig<'a> {
    /// The system runc (the `runc` handler's binary).
    pub runc: &'a Path,
    /// The `runc` handler's state root.
    pub runc_root: &'a Path,
    /// husk (or a wrapper) and the shim's root for it, when husk is a handler.
    pub husk: Option<(&'a Path, &'a Path)>,
    /// The CNI configuration's directory.
    pub conf_dir: &'a Path,
}

/// The CRI plugin's section of containerd's configuration (version 2).
pub(super) fn cri_config(c: &CriConfig) -> String {
    const CRI: &str = r#"plugins."io.containerd.grpc.v1.cri""#;
    let runtime = |name: &str, binary: &Path, root: &Path| {
        format!(
            r#"
    [{CRI}.containerd.runtimes.{name}]
      runtime_type = "io.containerd.runc.v2"
      [{CRI}.containerd.runtimes.{name}.options]
        BinaryName = "{}"
        Root = "{}"
"#,
            binary.display(),
            root.display()
        )
    };
    let mut runtimes = runtime("runc", c.runc, c.runc_root);
    if let Some((husk, root)) = c.husk {
        runtimes.push_str(&runtime("husk", husk, root));
    }
    // restrict_oom_score_adj: the sandbox's -998 needs CAP_SYS_RESOURCE, which this host's
    // root lacks; disable_apparmor: no profile to load where AppArmor is on.
    format!(
        r#"
[{CRI}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  [{CRI}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
{runtimes}
  [{CRI}.cni]
    bin_dir = "{bin_dir}"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
"#,
        bin_dir = cni::CNI_BIN_DIR,
        conf_dir = c.conf_dir.display(),
    )
}

/// Builds the pause program static and its image archive (entrypoint `/pause`) in `dir`.
pub(super) fn pause_archive(dir: &Path) -> PathBuf {
    let src = dir.join("pause.c");
    std::fs::write(&src, PAUSE_C).unwrap();
    let rootfs = dir.join("pause-rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let mut gcc = Command::new("gcc");
    gcc.args(["-static", "-Os", "-s", "-o"])
        .arg(rootfs.join("pause"))
        .arg(&src);
    expect_ok(gcc);
    let layer = dir.join("pause.tar");
    let mut tar = Command::new("tar");
    tar.arg("-C").arg(&rootfs).arg("-cf").arg(&layer).arg(".");
    expect_ok(tar);
    let archive = dir.join("pause.oci.tar");
    let config = serde_json::json!({"Entrypoint": ["/pause"], "Env": ["PATH=/"]});
    engines::oci_image_archive(&layer, &archive, PAUSE_IMAGE, config);
    archive
}

/// A tonic channel to the gRPC server on the Unix socket `socket` (the URI is not used).
pub(super) fn connect(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    rt.block_on(
        Endpoint::from_static("http://localhost").connect_with_connector(tower::service_fn(
            move |_: Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            },
        )),
    )
}

//! Real container engines driven against husk: podman, containerd (`ctr`) and Docker, each
//! started by the test with its own state and data directories (nothing of the machine's own
//! engine configuration or storage is used or touched), and torn down on drop: containers
//! removed, daemons stopped, husk containers the engine left behind force-deleted, mounts
//! under the test's directory undone, the directory removed.
//!
//! No registry is reachable from CI, so the test image is built here from busybox-static
//! ([`crate::busybox_rootfs`]): a rootfs tar for `podman import` / `docker import`, and an OCI
//! image archive (made by hand: layout, index, manifest, config, one layer) for
//! `ctr images import`.
//!
//! One file per engine (`podman`, `containerd`, `docker`), what they share beside them
//! (`require`: what the host must have; `command`: running an engine's commands under
//! [`ENGINE_LIMIT`]; `image`: the test image; `daemon`: a daemon the test started;
//! `teardown`: mounts and processes left behind), and what the tests check through them
//! (`http`: a server on the host and a client; `monitor_uid`: the writes of a container whose
//! monitor runs as a uid of its own).

mod command;
mod containerd;
mod daemon;
mod docker;
mod http;
mod image;
mod monitor_uid;
mod podman;
mod require;
mod teardown;

pub use self::command::{ENGINE_LIMIT, expect_code, expect_ok, run};
pub use self::containerd::{Containerd, ContainerdSetup};
pub use self::docker::Dockerd;
pub use self::http::{HttpServer, http_get, http_get_local};
pub use self::image::{IMAGE, image_tar, oci_archive, oci_image_archive};
pub use self::monitor_uid::{MONITOR_UID_POOL_FIRST, UID_WRITES, check_uid_writes};
pub use self::podman::Podman;
pub use self::require::{prerequisites, require_programs, which};
pub use self::teardown::{processes_naming, unmount_under};

//! Making a template: boot the guest cold, wait until husk-init has exchanged `Hello` with
//! us, save the VM, and move the snapshot into the cache under its key, all under the key's
//! lock.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_proto::marker::Marker;
use husk_proto::{GuestMessage, Hello, HostMessage, SHARE_TAG};

use super::cache::{Cache, DIR_ENV, INFO_FILE, Info, KEEP, write_private};
use super::error::{TemplateError, io};
use super::key::Key;
use super::shape::{NET_SLOTS, TemplateShape};
use crate::assets::GuestImage;
use crate::oci::sockets::SocketDir;
use crate::vmm::{self, NetConfig, SeccompMode, VmConfig};

/// How long the cold boot may take (nested kvm_pvm hosts take tens of seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The configuration of a VM of a template's shape: the one a template is made with, and the
/// one each container's VM is restored into (same devices in the same order), on that VM's
/// own socket, share and NICs (at most [`NET_SLOTS`]; the rest stay spare).
pub fn vm_config(
    image: &GuestImage,
    shape: TemplateShape,
    vsock: PathBuf,
    share: PathBuf,
    nets: Vec<NetConfig>,
    kvm: Option<Arc<OwnedFd>>,
) -> VmConfig {
    let used = u8::try_from(nets.len()).unwrap_or(u8::MAX);
    VmConfig {
        kernel: image.vmlinux.clone(),
        initrd: Some(image.initramfs.clone()),
        cmdline_extra: String::new(),
        mem_mib: shape.mem_mib,
        vcpus: shape.vcpus,
        console: false,
        seccomp: SeccompMode::Enforce,
        vsock: Some(vsock),
        shares: vec![(SHARE_TAG.to_owned(), share)],
        nets,
        spare_nets: NET_SLOTS.saturating_sub(used),
        kvm,
    }
}

/// What [`build`] did.
#[derive(Debug)]
pub struct Built {
    /// The template's key.
    pub key: Key,
    /// Whether it was made now (false: another build had made it).
    pub made: bool,
}

/// Makes the template of `shape` with `image` in `cache`, unless it is there.
pub fn build(
    image: &GuestImage,
    shape: TemplateShape,
    cache: &Cache,
) -> Result<Built, TemplateError> {
    let key = Key::new(image, shape)?;
    let lock_path = cache.dir().join(format!("{key}.lock"));
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io("opening", &lock_path))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, e)| TemplateError::Io {
            what: "locking",
            path: lock_path.clone(),
            source: e.into(),
        },
    )?;
    // Whoever held the lock before may have made it.
    if let Ok(Some(_)) = cache.open_template(&key) {
        return Ok(Built { key, made: false });
    }
    let scratch = cache
        .dir()
        .join(format!(".build-{key}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&scratch)
        .map_err(io("creating", &scratch))?;
    let result = make(image, shape, &key, cache, &scratch);
    let _ = fs::remove_dir_all(&scratch);
    result?;
    if let Err(e) = cache.prune(KEEP, &key) {
        eprintln!(
            "husk: could not remove old templates: {}",
            crate::error_chain(&e)
        );
    }
    Ok(Built { key, made: true })
}

/// Boots, greets, saves into `scratch`, and moves the snapshot to its place in the cache.
fn make(
    image: &GuestImage,
    shape: TemplateShape,
    key: &Key,
    cache: &Cache,
    scratch: &Path,
) -> Result<(), TemplateError> {
    let share = scratch.join("share");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&share)
        .map_err(io("creating", &share))?;
    // By paths that fit in `sockaddr_un` wherever the cache is (see `SocketDir`); it stays
    // open, and the paths valid, until the VM is gone.
    let sockets = SocketDir::open(scratch).map_err(io("opening", scratch))?;
    let control_path = sockets.vsock_port(husk_proto::CONTROL_PORT.0);
    let control = UnixListener::bind(&control_path).map_err(io("listening on", &control_path))?;
    let config = vm_config(image, shape, sockets.vsock(), share, Vec::new(), None);
    let started = Instant::now();
    let vm = vmm::start(&config, started)
        .map_err(|e| TemplateError::Build(format!("starting the VM: {e}")))?;
    let greeted = greet(&vm, &control);
    let boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let saved = scratch.join("snapshot");
    let result = greeted.and_then(|_conn| {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&saved)
            .map_err(io("creating", &saved))?;
        vm.snapshot(&saved).map_err(TemplateError::from)
    });
    vm.stop();
    let _ = vm.wait(Some(Duration::from_secs(10)));
    result?;
    let info = Info {
        shape,
        kernel: image.vmlinux.clone(),
        initramfs: image.initramfs.clone(),
        created: crate::oci::state::now_rfc3339(),
        boot_ms,
    };
    let info = serde_json::to_vec_pretty(&info)
        .map_err(|e| TemplateError::Build(format!("describing the template: {e}")))?;
    write_private(&saved.join(INFO_FILE), &info)?;
    let target = cache.dir().join(key.as_str());
    fs::rename(&saved, &target).map_err(io("moving the template to", &target))
}

/// Waits for husk-init to connect and exchanges `Hello` with it, then for its
/// `HostConnected` marker (written once it has read our `Hello`): from then on it only waits
/// for its next request, which is where a template is saved. Returns the connection, which
/// must stay open until the VM is saved.
pub fn greet(vm: &vmm::RunningVm, control: &UnixListener) -> Result<UnixStream, TemplateError> {
    let failed = |what: String| TemplateError::Build(what);
    control
        .set_nonblocking(true)
        .map_err(|e| failed(format!("control socket: {e}")))?;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut conn = loop {
        match control.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if vm.has_ended() {
                    return Err(failed("the VM ended before husk-init connected".into()));
                }
                if Instant::now() > deadline {
                    return Err(failed(format!(
                        "husk-init did not connect within {} s",
                        BOOT_TIMEOUT.as_secs()
                    )));
                }
                let mut fds = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(control),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            }
            Err(e) => return Err(failed(format!("accepting husk-init's connection: {e}"))),
        }
    };
    conn.set_nonblocking(false)
        .and_then(|()| conn.set_read_timeout(Some(Duration::from_secs(60))))
        .map_err(|e| failed(format!("control connection: {e}")))?;
    let hello: Option<GuestMessage> =
        husk_proto::read_message(&mut conn).map_err(|e| failed(format!("husk-init: {e}")))?;
    match hello {
        Some(GuestMessage::Hello(h)) => h.check().map_err(|e| failed(format!("husk-init: {e}")))?,
        other => return Err(failed(format!("husk-init sent {other:?} instead of Hello"))),
    }
    husk_proto::write_message(&mut conn, &HostMessage::Hello(Hello::current()))
        .map_err(|e| failed(format!("husk-init: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !vm.marker_seen(Marker::HostConnected) {
        if vm.has_ended() || Instant::now() > deadline {
            return Err(failed("husk-init did not take the host's Hello".into()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(conn)
}

/// Runs `husk template build` for `shape` as a child process (so that the caller, a monitor
/// about to confine itself, stays single-threaded and keeps nothing of the template VM) and
/// waits for it.
pub fn build_in_child(
    image: &GuestImage,
    shape: TemplateShape,
    dir: &Path,
) -> Result<(), TemplateError> {
    let status = std::process::Command::new("/proc/self/exe")
        .arg("template")
        .arg("build")
        .arg("--vcpus")
        .arg(shape.vcpus.to_string())
        .arg("--mem-mib")
        .arg(shape.mem_mib.to_string())
        .arg("--kernel")
        .arg(&image.vmlinux)
        .arg("--initrd")
        .arg(&image.initramfs)
        .arg("--quiet")
        .env(DIR_ENV, dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| TemplateError::Build(format!("running husk template build: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(TemplateError::Build(format!(
            "husk template build failed ({status})"
        )))
    }
}

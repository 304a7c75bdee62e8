//! A host for husk-init in tests: the monitor's side of the protocol over Unix sockets.
//!
//! [`Host::spawn`] starts the real `husk-init` binary with `--connect unix:PREFIX`, in its own
//! mount, UTS, IPC and network namespaces (so that an engine bug cannot reach the test
//! machine's hostname, mounts or network), listens on `PREFIX_<port>` for its control
//! connection and for the stdio connections each process makes, and builds a busybox root
//! filesystem in a private temp dir. With [`Options::cgroup`] it mounts a cgroup v2 hierarchy
//! in that dir and gives husk-init a cgroup of its own in it as `--cgroup-root`. On drop it
//! closes the control connection (husk-init then kills the container), reaps husk-init and
//! removes the cgroup, the mount and the files. Every wait has a deadline: a broken engine
//! fails a test with husk-init's log instead of hanging it.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the driver"
)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use husk_proto::{
    CONTROL_PORT, ContainerId, ContainerRef, CreateRequest, ErrorReply, Event, ExecId, ExecRequest,
    FIRST_STDIO_PORT, FsSource, GuestMessage, Hello, HostMessage, MountSource, ProcessRef,
    ProtoError, Request, RequestId, Response, Stdio, VsockPort, WaitStatus,
};
use serde_json::{Value, json};

/// How long any single wait may take (generous: the machine running the tests may be busy).
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The busybox applets the tests' commands use.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "env", "id", "pwd", "hostname", "ls", "mkdir", "touch", "grep", "ps",
    "readlink", "sleep", "stty", "test", "true", "false", "kill", "head", "tr", "wc", "stat",
    "mount", "sort", "printf", "ip", "tty",
];

/// Whether the tests can run (husk-init needs root to build containers). Prints the skip
/// notice when they cannot.
pub fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        false
    } else {
        eprintln!("SKIPPED: needs root");
        true
    }
}

/// A base config.json: busybox `args`, root user, PATH=/bin, /proc, /dev and /tmp mounted,
/// new pid, ipc, uts and mount namespaces (as `runc spec` makes, less the network).
pub fn config(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.2.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/"
        },
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        }
    })
}

/// [`config`] running `sh -c script`.
pub fn sh(script: &str) -> Value {
    config(&["sh", "-c", script])
}

/// Removes namespace `typ` from a config.
pub fn without_namespace(cfg: &mut Value, typ: &str) {
    cfg["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .retain(|n| n["type"] != typ);
}

/// Bytes read from one of a process's output streams, filled by a reader thread.
#[derive(Debug, Clone, Default)]
pub struct Output {
    inner: Arc<(Mutex<OutState>, Condvar)>,
}

#[derive(Debug, Default)]
struct OutState {
    data: Vec<u8>,
    eof: bool,
    /// The reader does not read (a host that stalls): set before it starts.
    held: bool,
}

impl Output {
    /// An output that never had a connection (already at EOF, empty).
    fn closed() -> Self {
        let o = Output::default();
        o.inner.0.lock().expect("lock").eof = true;
        o
    }

    fn spawn_reader(mut stream: impl Read + Send + 'static, held: bool) -> Self {
        let out = Output::default();
        out.inner.0.lock().expect("lock").held = held;
        let inner = Arc::clone(&out.inner);
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            {
                let (lock, cv) = &*inner;
                let mut st = lock.lock().expect("lock");
                while st.held {
                    st = cv.wait(st).expect("lock");
                }
            }
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                let (lock, cv) = &*inner;
                let mut st = lock.lock().expect("lock");
                if n == 0 {
                    st.eof = true;
                } else {
                    st.data.extend_from_slice(&buf[..n]);
                }
                cv.notify_all();
                if st.eof {
                    return;
                }
            }
        });
        out
    }

    /// Waits until `done` holds for the state, or the deadline passes; returns whether it
    /// held and a copy of the data.
    fn wait_until(&self, done: impl Fn(&OutState) -> bool) -> (bool, Vec<u8>) {
        let (lock, cv) = &*self.inner;
        let deadline = Instant::now() + TIMEOUT;
        let mut st = lock.lock().expect("lock");
        loop {
            if done(&st) {
                return (true, st.data.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return (false, st.data.clone());
            }
            st = cv.wait_timeout(st, deadline - now).expect("lock").0;
        }
    }

    /// Lets a held reader start reading.
    pub fn release(&self) {
        let (lock, cv) = &*self.inner;
        lock.lock().expect("lock").held = false;
        cv.notify_all();
    }

    /// Waits until the output contains `needle`; panics (with what arrived) on timeout.
    pub fn wait_for(&self, needle: &str) -> String {
        let (ok, data) =
            self.wait_until(|s| String::from_utf8_lossy(&s.data).contains(needle) || s.eof);
        let text = String::from_utf8_lossy(&data).into_owned();
        assert!(
            ok && text.contains(needle),
            "waited for {needle:?} in the output, got {text:?}"
        );
        text
    }

    /// Everything, once the stream is at EOF; panics on timeout.
    pub fn bytes(&self) -> Vec<u8> {
        let (ok, data) = self.wait_until(|s| s.eof);
        assert!(
            ok,
            "no EOF on the stream after {TIMEOUT:?}; got so far: {:?}",
            String::from_utf8_lossy(&data)
        );
        data
    }

    /// [`Output::bytes`] as text.
    pub fn text(&self) -> String {
        String::from_utf8(self.bytes()).expect("output is UTF-8")
    }
}

/// What stdio a test wants for a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// stdout and stderr pipes; stdin a pipe too when `stdin` is true, else /dev/null.
    Pipes {
        /// Whether stdin gets a connection.
        stdin: bool,
    },
    /// A pseudo-terminal.
    Terminal,
}

impl Want {
    /// stdout and stderr only.
    pub const OUTPUT: Want = Want::Pipes { stdin: false };
}

/// The host's end of one process's stdio.
#[derive(Debug)]
pub struct Io {
    /// stdin (or the terminal, for writing), when there is one.
    pub stdin: Option<UnixStream>,
    /// stdout (or the terminal's output).
    pub stdout: Output,
    /// stderr (empty for a terminal).
    pub stderr: Output,
}

/// Listeners bound for a request's stdio before it is sent.
struct PendingIo {
    want: Want,
    stdio: Stdio,
    listeners: Vec<(UnixListener, PathBuf)>,
}

/// How a process ended, with its output.
#[derive(Debug)]
pub struct Run {
    /// Its wait status.
    pub status: WaitStatus,
    /// stdout as text.
    pub stdout: String,
    /// stderr as text.
    pub stderr: String,
}

/// A cgroup v2 hierarchy mounted for one test, with a directory of its own as husk-init's
/// root. The test machine's hierarchy is shared by all tests: each gets its own child.
#[derive(Debug)]
struct CgroupDir {
    mount: PathBuf,
    root: PathBuf,
}

impl CgroupDir {
    fn new(dir: &Path) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let mount = dir.join("cgroup2");
        std::fs::create_dir(&mount).expect("mkdir cgroup2");
        nix::mount::mount(
            Some("cgroup2"),
            &mount,
            Some("cgroup2"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting a cgroup2 hierarchy");
        let root = mount.join(format!(
            "husk-init-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&root).expect("creating the test's cgroup");
        Self { mount, root }
    }

    fn remove(&self) {
        // The engine removes its `container` child; anything left is removed here (after a
        // failure), leaves first. A cgroup with processes cannot go: retry while they die.
        for _ in 0..200 {
            if remove_cgroup_tree(&self.root).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn remove_cgroup_tree(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // Whatever a failed test left running in it (kills the whole subtree).
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Options of [`Host::spawn`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Give husk-init a cgroup v2 root (else it runs without cgroups).
    pub cgroup: bool,
    /// Run husk-init under `strace -f -ttt`, writing its trace (and its processes') to this
    /// file: what the counting benchmark reads.
    pub trace: Option<PathBuf>,
}

/// The host side of one husk-init.
#[derive(Debug)]
pub struct Host {
    dir: tempfile::TempDir,
    prefix: PathBuf,
    child: Child,
    /// husk-init's own stderr (its log).
    log: Output,
    /// husk-init's control port, for its reconnections.
    control: UnixListener,
    conn: UnixStream,
    next_id: u64,
    next_port: u32,
    events: VecDeque<Event>,
    cgroup: Option<CgroupDir>,
    exited: Option<ExitStatus>,
    hold_output: bool,
}

fn accept_by(listener: &UnixListener, deadline: Instant) -> io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "nobody connected"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Builds a busybox root filesystem in `rootfs`.
fn build_rootfs(rootfs: &Path) {
    for d in ["bin", "etc", "proc", "dev", "tmp", "root", "home/alice"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir in rootfs");
    }
    std::fs::set_permissions(rootfs, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod");
    // A copy, not a link: a container that writes its /bin/busybox must not reach /bin's.
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copying /bin/busybox");
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).expect("symlink");
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\nwheel:x:10:alice\ngames:x:20:\nalice:x:1000:\n",
    )
    .expect("group");
}

impl Host {
    /// Spawns husk-init and accepts its control connection; no handshake yet.
    pub fn spawn(opts: Options) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("husk-init-test-")
            .tempdir()
            .expect("tempdir");
        build_rootfs(&dir.path().join("rootfs"));
        let prefix = dir.path().join("h");
        let control = UnixListener::bind(port_path(&prefix, CONTROL_PORT)).expect("bind");
        let cgroup = opts.cgroup.then(|| CgroupDir::new(dir.path()));
        // Never the default /sys/fs/cgroup: on a cgroup v2 machine that is the machine's own.
        let cgroup_root = cgroup
            .as_ref()
            .map(|c| c.root.clone())
            .unwrap_or_else(|| dir.path().join("no-cgroup"));

        let mut cmd = match &opts.trace {
            None => Command::new(env!("CARGO_BIN_EXE_husk-init")),
            Some(file) => {
                let mut strace = Command::new("strace");
                strace
                    .args(["-f", "-ttt", "-qq", "-o"])
                    .arg(file)
                    .arg(env!("CARGO_BIN_EXE_husk-init"));
                strace
            }
        };
        cmd.arg("--connect")
            .arg(format!("unix:{}", prefix.display()))
            .arg("--cgroup-root")
            .arg(&cgroup_root)
            .env_clear()
            .env("HUSK_TEST_HOST_ONLY", "must-not-leak")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe system calls (unshare, mount) on static arguments; it allocates
        // nothing and touches no lock.
        unsafe {
            cmd.pre_exec(|| {
                let ns = libc::CLONE_NEWNS
                    | libc::CLONE_NEWUTS
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWNET;
                if libc::unshare(ns) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Nothing mounted under this husk-init may propagate back to the machine.
                if libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // A sysfs of the new network namespace, where husk-init looks up interfaces
                // (as it does in the VM, where it mounts /sys itself).
                if libc::mount(
                    c"sysfs".as_ptr(),
                    c"/sys".as_ptr(),
                    c"sysfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = cmd.spawn().expect("spawning husk-init");
        let log = Output::spawn_reader(child.stderr.take().expect("stderr"), false);
        let conn = match accept_by(&control, Instant::now() + TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "husk-init did not connect: {e}; its log: {:?}",
                    String::from_utf8_lossy(&log.bytes())
                );
            }
        };
        conn.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        conn.set_write_timeout(Some(TIMEOUT)).expect("timeout");
        Host {
            dir,
            prefix,
            child,
            log,
            control,
            conn,
            next_id: 1,
            next_port: FIRST_STDIO_PORT.0,
            events: VecDeque::new(),
            cgroup,
            exited: None,
            hold_output: false,
        }
    }

    /// A husk-init past the handshake, without cgroups.
    pub fn start() -> Host {
        Self::start_with(Options::default())
    }

    /// A husk-init past the handshake.
    pub fn start_with(opts: Options) -> Host {
        let mut h = Self::spawn(opts);
        h.handshake();
        h
    }

    /// The test's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The container's root filesystem (busybox, /etc/passwd, /etc/group).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// husk-init's cgroup root, when it has one.
    pub fn cgroup_root(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(|c| c.root.as_path())
    }

    /// Makes the stdout/stderr of processes started from now on unread until
    /// [`Output::release`], like a host that stalls.
    pub fn hold_output(&mut self) {
        self.hold_output = true;
    }

    /// husk-init's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Receives husk-init's hello and answers with ours.
    pub fn handshake(&mut self) {
        match self.recv() {
            Some(GuestMessage::Hello(h)) => {
                assert_eq!(h, Hello::current(), "husk-init speaks another version")
            }
            other => panic!("expected Hello, got {other:?}; log: {}", self.log_text()),
        }
        self.send(&HostMessage::Hello(Hello::current()));
    }

    /// Writes raw bytes on the control connection.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.conn.write_all(bytes).expect("writing to husk-init");
    }

    /// Closes the control connection and takes husk-init's next one (it reconnects while it
    /// has been asked for nothing), with the handshake: what a VM restored from a template
    /// does with the monitor that restored it.
    pub fn reconnect(&mut self) {
        let _ = self.conn.shutdown(Shutdown::Both);
        let conn = accept_by(&self.control, Instant::now() + TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "husk-init did not connect again: {e}; its log: {:?}",
                self.log_text()
            )
        });
        conn.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        conn.set_write_timeout(Some(TIMEOUT)).expect("timeout");
        self.conn = conn;
        self.handshake();
    }

    /// Half-closes the control connection (husk-init sees EOF).
    pub fn close_control(&mut self) {
        let _ = self.conn.shutdown(Shutdown::Write);
    }

    /// Sends one framed message.
    pub fn send(&mut self, msg: &HostMessage) {
        husk_proto::write_message(&mut self.conn, msg).expect("writing to husk-init");
    }

    /// Receives one message; `None` at a clean EOF. Panics on a timeout or bad frame.
    pub fn recv(&mut self) -> Option<GuestMessage> {
        match husk_proto::read_message(&mut self.conn) {
            Ok(m) => m,
            Err(ProtoError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "no message from husk-init within {TIMEOUT:?}; its log: {}",
                    self.log_text()
                )
            }
            Err(e) => panic!(
                "bad message from husk-init: {e}; its log: {}",
                self.log_text()
            ),
        }
    }

    /// Sends a request and waits for its response (queuing events that arrive first).
    pub fn request(&mut self, request: Request) -> Result<Response, ErrorReply> {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let what = format!("{request:?}").chars().take(80).collect::<String>();
        self.send(&HostMessage::Request { id, request });
        loop {
            match self.recv() {
                Some(GuestMessage::Response { id: got, result }) => {
                    assert_eq!(got, id, "response to the wrong request");
                    return result;
                }
                Some(GuestMessage::Event(e)) => self.events.push_back(e),
                Some(GuestMessage::Hello(_)) => panic!("a second Hello from husk-init"),
                None => panic!(
                    "husk-init closed the connection instead of answering {what}; log: {}",
                    self.log_text()
                ),
            }
        }
    }

    /// [`Host::request`] that must succeed.
    pub fn ok(&mut self, request: Request) -> Response {
        let what = format!("{request:?}").chars().take(80).collect::<String>();
        self.request(request)
            .unwrap_or_else(|e| panic!("{what} failed: {e}"))
    }

    fn bind_stdio(&mut self, want: Want) -> PendingIo {
        let mut listeners = Vec::new();
        let mut port = |listeners: &mut Vec<(UnixListener, PathBuf)>| {
            let p = VsockPort(self.next_port);
            self.next_port += 1;
            let path = port_path(&self.prefix, p);
            listeners.push((UnixListener::bind(&path).expect("bind stdio"), path));
            p
        };
        let stdio = match want {
            Want::Terminal => Stdio::Terminal {
                port: port(&mut listeners),
            },
            Want::Pipes { stdin } => {
                let stdin = stdin.then(|| port(&mut listeners));
                let stdout = Some(port(&mut listeners));
                let stderr = Some(port(&mut listeners));
                Stdio::Pipes {
                    stdin,
                    stdout,
                    stderr,
                }
            }
        };
        PendingIo {
            want,
            stdio,
            listeners,
        }
    }

    /// Accepts the connections husk-init made (before it answered) for a process.
    fn accept_stdio(&self, pending: PendingIo) -> Io {
        let deadline = Instant::now() + TIMEOUT;
        let mut streams = pending.listeners.iter().map(|(l, path)| {
            let s = accept_by(l, deadline)
                .unwrap_or_else(|e| panic!("no stdio connection on {}: {e}", path.display()));
            let _ = std::fs::remove_file(path);
            s
        });
        match pending.want {
            Want::Terminal => {
                let s = streams.next().expect("terminal stream");
                let r = s.try_clone().expect("clone");
                Io {
                    stdin: Some(s),
                    stdout: Output::spawn_reader(r, self.hold_output),
                    stderr: Output::closed(),
                }
            }
            Want::Pipes { stdin } => {
                let stdin = stdin.then(|| streams.next().expect("stdin stream"));
                let held = self.hold_output;
                let stdout = Output::spawn_reader(streams.next().expect("stdout stream"), held);
                let stderr = Output::spawn_reader(streams.next().expect("stderr stream"), held);
                Io {
                    stdin,
                    stdout,
                    stderr,
                }
            }
        }
    }

    /// Sends `Create` for `config` with the busybox rootfs and bind sources `mounts`.
    /// Returns the container process's pid and its stdio.
    pub fn create_with(
        &mut self,
        config: &Value,
        want: Want,
        mounts: Vec<MountSource>,
    ) -> Result<(u32, Io), ErrorReply> {
        let rootfs = self.rootfs().to_path_buf();
        self.create_container(ContainerRef::FIRST, None, &rootfs, config, want, mounts)
    }

    /// Creates container `container` of the VM (a pod's later one: joining `join`'s
    /// namespaces where its config names them by path) on `rootfs`.
    pub fn create_container(
        &mut self,
        container: ContainerRef,
        join: Option<ContainerRef>,
        rootfs: &Path,
        config: &Value,
        want: Want,
        mounts: Vec<MountSource>,
    ) -> Result<(u32, Io), ErrorReply> {
        let pending = self.bind_stdio(want);
        let req = CreateRequest {
            container,
            join,
            container_id: ContainerId::new(format!("test-{}", container.0)).expect("id"),
            config_json: serde_json::to_vec(config).expect("json"),
            rootfs: FsSource::Guest(rootfs.to_string_lossy().into_owned()),
            mounts,
            stdio: pending.stdio,
        };
        match self.request(Request::Create(Box::new(req)))? {
            Response::Created { pid } => Ok((pid, self.accept_stdio(pending))),
            other => panic!("Create answered {other:?}"),
        }
    }

    /// [`Host::create_with`] without bind mounts.
    pub fn create(&mut self, config: &Value, want: Want) -> Result<(u32, Io), ErrorReply> {
        self.create_with(config, want, Vec::new())
    }

    /// Starts a further process from an OCI process object.
    pub fn exec(
        &mut self,
        exec_id: u32,
        process: &Value,
        want: Want,
    ) -> Result<(u32, Io), ErrorReply> {
        self.exec_in(ContainerRef::FIRST, exec_id, process, want)
    }

    /// Starts a further process in container `container`.
    pub fn exec_in(
        &mut self,
        container: ContainerRef,
        exec_id: u32,
        process: &Value,
        want: Want,
    ) -> Result<(u32, Io), ErrorReply> {
        let pending = self.bind_stdio(want);
        let req = ExecRequest {
            container,
            exec_id: ExecId(exec_id),
            process_json: serde_json::to_vec(process).expect("json"),
            stdio: pending.stdio,
        };
        match self.request(Request::Exec(Box::new(req)))? {
            Response::ExecStarted { pid } => Ok((pid, self.accept_stdio(pending))),
            other => panic!("Exec answered {other:?}"),
        }
    }

    /// Waits for the `Exited` event of `process`.
    pub fn wait_exit(&mut self, process: ProcessRef) -> WaitStatus {
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|Event::Exited { process: p, .. }| *p == process)
            {
                let Some(Event::Exited { status, .. }) = self.events.remove(i) else {
                    unreachable!()
                };
                return status;
            }
            match self.recv() {
                Some(GuestMessage::Event(e)) => self.events.push_back(e),
                other => panic!(
                    "waiting for {process} to exit, got {other:?}; log: {}",
                    self.log_text()
                ),
            }
        }
    }

    /// Creates, starts and waits for a container with stdout/stderr collected.
    pub fn run(&mut self, config: &Value) -> Run {
        let (_, io) = self
            .create(config, Want::OUTPUT)
            .unwrap_or_else(|e| panic!("Create failed: {e}"));
        self.ok(Request::Start {
            container: ContainerRef::FIRST,
        });
        let status = self.wait_exit(ProcessRef::Init(ContainerRef::FIRST));
        // The protocol promises the output is complete once Exited arrives.
        Run {
            status,
            stdout: io.stdout.text(),
            stderr: io.stderr.text(),
        }
    }

    /// Waits for husk-init itself to exit; returns its status and log.
    pub fn wait_husk_exit(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(st);
                return (st, self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "husk-init still runs after {TIMEOUT:?}; log so far: {:?}",
                String::from_utf8_lossy(&self.log.wait_until(|_| true).1)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// husk-init's log (its stderr), complete once it has exited.
    pub fn log_text(&self) -> String {
        let complete = self.exited.is_some();
        let data = if complete {
            self.log.bytes()
        } else {
            self.log.wait_until(|_| true).1
        };
        String::from_utf8_lossy(&data).into_owned()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A closed control connection makes husk-init kill the container and exit.
        let _ = self.conn.shutdown(Shutdown::Both);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.exited.is_none() {
            match self.child.try_wait() {
                Ok(Some(st)) => self.exited = Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => {
                    let _ = self.child.kill();
                    self.exited = self.child.wait().ok();
                }
            }
        }
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
    }
}

/// The socket path of `port`: `PREFIX_<port>`, as husk-init's Unix transport names it.
pub fn port_path(prefix: &Path, port: VsockPort) -> PathBuf {
    let mut p = prefix.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z")
        })
        .unwrap_or(false)
}

/// Waits until process `pid` runs `args`: its command line is `args` and its name is
/// `args[0]`'s. A shell prints its last words before it execs the command after them, and
/// busybox runs an applet by re-executing itself (`/proc/self/exe`, so named `exe`) and renames
/// itself only then: a test that looks at the process must wait for all of it. Panics with
/// what the process was after [`TIMEOUT`].
pub fn wait_until_running(pid: u32, args: &[&str]) {
    let want_cmdline: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let want_comm = format!("{}\n", args[0].rsplit('/').next().unwrap_or(args[0]));
    let read = || {
        (
            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
            std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default(),
        )
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (cmdline, comm) = read();
        if cmdline == want_cmdline && comm == want_comm {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} does not run {args:?} after {TIMEOUT:?}: cmdline {:?}, comm {comm:?}",
            String::from_utf8_lossy(&cmdline)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `pid` has been reaped (not even a zombie is left). husk-init reaps before it
/// reports an exit and before it exits itself, so no waiting is needed.
pub fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

//! containerd runs husk through its runc v2 shim (`ctr run --runc-binary PATH`), started by
//! the test with its own configuration, root, state and socket (see
//! `husk_e2e::engines::Containerd`). One VM: `ctr run --rm` holds the container while the test
//! execs into it and kills it; its exit code is the container's.

use std::process::Command;

use husk_e2e::engines::{self, Containerd, IMAGE, expect_code, expect_ok};
use husk_e2e::husk_binary;

fn prerequisites() -> Option<()> {
    engines::prerequisites("containerd")
}

/// Polls `ctr tasks ls` until `id`'s task shows `status` (true), or until `gone` says the
/// `ctr run` holding it ended (false). Panics after the engine time limit.
fn wait_for_task(ctr: &Containerd, id: &str, status: &str, gone: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + engines::ENGINE_LIMIT;
    loop {
        let out = engines::run(ctr.ctr(&["tasks", "ls"]));
        if out
            .output
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id) && l.contains(status))
        {
            return true;
        }
        if gone() {
            return false;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task {id} never became {status}:\n{}",
            out.output
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[test]
fn containerd_runs_husk_through_the_runc_shim() {
    let Some(()) = prerequisites() else { return };
    let husk = husk_binary();
    let Some(ctr) = Containerd::start() else {
        return;
    };
    let husk_arg = husk.to_string_lossy().into_owned();
    let run: Command = ctr.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runc-binary",
        &husk_arg,
        IMAGE,
        "c1",
        "sh",
        "-c",
        "echo started; trap 'echo got-term; exit 7' TERM; while true; do sleep 1000 & wait $!; done",
    ]);
    std::thread::scope(|s| {
        let main = s.spawn(move || engines::run(run));
        if !wait_for_task(&ctr, "c1", "RUNNING", || main.is_finished()) {
            let out = main.join().unwrap();
            panic!(
                "ctr run ended ({:?}) before c1 ran:\n{}",
                out.code, out.output
            );
        }

        // exec: a second process in the same VM; its output and exit code come back.
        let out = expect_code(
            ctr.ctr(&[
                "tasks",
                "exec",
                "--exec-id",
                "e1",
                "c1",
                "sh",
                "-c",
                "echo in-exec; cat /proc/1/cmdline; echo; exit 4",
            ]),
            4,
        );
        assert!(out.contains("in-exec"), "{out}");
        assert!(
            out.contains("trap"),
            "exec did not see the container's pid 1: {out}"
        );

        // kill: SIGTERM to the container's process, which the trap turns into exit 7.
        expect_ok(ctr.ctr(&["tasks", "kill", "-s", "SIGTERM", "c1"]));
        let main = main.join().unwrap();
        assert_eq!(main.code, Some(7), "ctr run:\n{}", main.output);
        assert!(main.output.contains("started"), "{}", main.output);
        assert!(main.output.contains("got-term"), "{}", main.output);
    });
    // --rm: the container and husk's state are gone.
    let left = expect_ok(ctr.ctr(&["containers", "list", "-q"]));
    assert_eq!(left.trim(), "", "containers left: {left}");
    let root = ctr.husk_root();
    let husk_left: Vec<_> = std::fs::read_dir(&root)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        husk_left.is_empty(),
        "husk state left in {}: {husk_left:?}",
        root.display()
    );
}

#[test]
fn containerd_overlayfs_with_a_monitor_of_its_own_uid() {
    use std::os::unix::fs::MetadataExt;
    let Some(()) = prerequisites() else { return };
    let Some(ctr) = Containerd::start() else {
        return;
    };
    // The shim runs husk as it is: its monitor gets a uid of its own by default.
    let husk_arg = husk_binary().to_string_lossy().into_owned();
    // The overlayfs snapshotter: the rootfs is an overlay mount, which the monitor mounts
    // anew on idmapped layers.
    let run: Command = ctr.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "overlayfs",
        "--runc-binary",
        &husk_arg,
        IMAGE,
        "u1",
        "sh",
        "-c",
        "echo x > /made && chown 1000:1000 /made && echo started; \
         trap 'exit 7' TERM; while true; do sleep 1000 & wait $!; done",
    ]);
    let snapshots = ctr
        .root()
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    std::thread::scope(|s| {
        let main = s.spawn(move || engines::run(run));
        if !wait_for_task(&ctr, "u1", "RUNNING", || main.is_finished()) {
            let out = main.join().unwrap();
            panic!(
                "ctr run ended ({:?}) before u1 ran:\n{}",
                out.code, out.output
            );
        }
        let out = expect_ok(ctr.ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            "u1",
            "sh",
            "-c",
            "cat /made; id -u",
        ]));
        assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["x", "0"]);
        // The container's file in the container's snapshot, with the container's ids, and
        // husk's work directory beside the snapshot's.
        let made: Vec<_> = std::fs::read_dir(&snapshots)
            .unwrap()
            .flatten()
            .map(|e| e.path().join("fs/made"))
            .filter(|p| p.exists())
            .collect();
        assert_eq!(made.len(), 1, "{made:?}");
        let m = std::fs::metadata(&made[0]).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000));
        let snapshot = made[0].parent().unwrap().parent().unwrap();
        assert!(snapshot.join("work/husk-u1").is_dir());
        expect_ok(ctr.ctr(&["tasks", "kill", "-s", "SIGTERM", "u1"]));
        let main = main.join().unwrap();
        assert_eq!(main.code, Some(7), "ctr run:\n{}", main.output);
    });
    let left = expect_ok(ctr.ctr(&["containers", "list", "-q"]));
    assert_eq!(left.trim(), "", "containers left: {left}");
    let husk_left: Vec<_> = std::fs::read_dir(ctr.husk_root())
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(husk_left.is_empty(), "husk state left: {husk_left:?}");
}

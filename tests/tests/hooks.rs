//! OCI hooks through the real `husk` binary, with one VM boot.
//!
//! The hooks are shell scripts on the host that write the state JSON from their stdin to files.
//! The container asks for a new network namespace (an entry without a path, as Docker does)
//! and its `createRuntime` hook fills it the way Docker's `libnetwork-setkey` has dockerd fill
//! it: one end of a veth moved into `/proc/<state pid>/ns/net`, addressed and routed there; the
//! container must then see that address on its `eth0` in the VM. Before that, with no VM boot:
//! a `createContainer` hook is refused and a failing `createRuntime` hook fails `create`, each
//! with a clear error and nothing left behind.
//!
//! Needs root, /dev/kvm, the guest image, busybox-static, iproute2 and nsenter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use husk_e2e::{
    ContainerRoot, TempDir, busybox_bundle, guest_image, husk, husk_binary, is_root, kvm_available,
    run_with_timeout, skip,
};

/// A hook running `script` with `sh -c`, with `OUT` (where it writes) in its environment.
fn hook(script: &str, out: &Path) -> serde_json::Value {
    serde_json::json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", script],
        "env": [format!("OUT={}", out.display()), "PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
    })
}

/// A hook that records its stdin as `OUT/<kind>.json` and its turn in `OUT/order`.
fn recorder(kind: &str, out: &Path) -> serde_json::Value {
    hook(
        &format!("cat > \"$OUT/{kind}.json\"; echo {kind} >> \"$OUT/order\""),
        out,
    )
}

/// A busybox bundle running `script`, with `hooks` and a new network namespace.
fn bundle(dir: &Path, script: &str, hooks: serde_json::Value) -> Option<PathBuf> {
    let bundle = busybox_bundle(dir, &["sh", "-c", script])?;
    let path = bundle.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "network"}));
    v["hooks"] = hooks;
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    Some(bundle)
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (the hook did not run?)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn hooks_run_in_order_with_the_state_and_fill_a_new_network_namespace() {
    if guest_image().is_none() {
        return;
    }
    let tools = ["ip", "nsenter"]
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok());
    if !kvm_available() || !is_root() || !tools {
        skip::<()>("needs /dev/kvm, root, iproute2 and nsenter");
        return;
    }
    let tmp = TempDir::new("hooks");
    let root = tmp.path().join("state");
    let _cleanup = ContainerRoot(root.clone());
    let host_netns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let host_pidns = std::fs::read_link("/proc/self/ns/pid").unwrap();

    // 1. A createContainer hook is refused before anything runs or is made.
    let out = tmp.path().join("refused-out");
    std::fs::create_dir_all(&out).unwrap();
    let dir = tmp.path().join("refused");
    std::fs::create_dir_all(&dir).unwrap();
    let hooks = serde_json::json!({
        "createContainer": [{"path": "/usr/local/bin/in-container-hook"}],
        "poststop": [recorder("poststop", &out)],
    });
    let Some(refused) = bundle(&dir, "true", hooks) else {
        return;
    };
    let (code, _, stderr) = husk(
        &root,
        &["create", "refused", "--bundle", refused.to_str().unwrap()],
    );
    assert_ne!(code, 0, "create with a createContainer hook succeeded");
    assert!(
        stderr.contains("hooks.createContainer")
            && stderr.contains("/usr/local/bin/in-container-hook"),
        "the error names the hook: {stderr}"
    );
    assert!(
        entries(&root).is_empty(),
        "state left: {:?}",
        entries(&root)
    );
    assert!(entries(&out).is_empty(), "hooks ran: {:?}", entries(&out));

    // 2. A failing createRuntime hook fails create (no VM is booted), names the hook, its
    //    status and its stderr; poststop still runs (the spec's lifecycle), nothing is left.
    //    The child it leaves behind holds nothing `create` waits for.
    let out = tmp.path().join("failing-out");
    std::fs::create_dir_all(&out).unwrap();
    let dir = tmp.path().join("failing");
    std::fs::create_dir_all(&dir).unwrap();
    let hooks = serde_json::json!({
        "createRuntime": [hook("sleep 20 & echo the-hook-broke >&2; exit 3", &out)],
        "poststop": [recorder("poststop", &out)],
    });
    let failing = bundle(&dir, "true", hooks).unwrap();
    let started = std::time::Instant::now();
    let (code, _, stderr) = husk(
        &root,
        &["create", "failing", "--bundle", failing.to_str().unwrap()],
    );
    assert_ne!(code, 0, "create with a failing hook succeeded");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "create waited {:?} for the hook's child",
        started.elapsed()
    );
    assert!(
        stderr.contains("createRuntime hook /bin/sh failed (exit status 3)")
            && stderr.contains("the-hook-broke"),
        "{stderr}"
    );
    assert!(
        entries(&root).is_empty(),
        "state left: {:?}",
        entries(&root)
    );
    assert_eq!(read_json(&out.join("poststop.json"))["status"], "stopped");

    // 3. The real thing, one VM: every kind of hook, and a network from a hook.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let pid = std::process::id();
    let subnet = format!("10.{}.{}", 180 + pid % 20, pid / 20 % 250);
    let host_end = format!("hkh{}", pid % 100_000);
    // What Docker's prestart hook has dockerd do, done by createRuntime here (`netns $pid`
    // names the state's pid to the kernel: the hook must run in the engine's pid namespace,
    // not the monitor's); it also says which namespaces it ran in and which network namespace
    // the state's pid is in.
    let fill = format!(
        "cat > \"$OUT/createRuntime.json\"; echo createRuntime >> \"$OUT/order\"; \
         readlink /proc/self/ns/net > \"$OUT/hook-netns\"; \
         readlink /proc/self/ns/pid > \"$OUT/hook-pidns\"; \
         pid=$(grep -o '\"pid\":[0-9]*' \"$OUT/createRuntime.json\" | cut -d: -f2); \
         readlink /proc/$pid/ns/net > \"$OUT/container-netns\"; \
         ip link add {host_end} type veth peer name eth0 netns $pid && \
         ip addr add {subnet}.1/24 dev {host_end} && ip link set {host_end} up && \
         nsenter --net=/proc/$pid/ns/net sh -c \
           'ip addr add {subnet}.2/24 dev eth0 && ip link set eth0 up && \
            ip route add default via {subnet}.1'"
    );
    let hooks = serde_json::json!({
        "prestart": [recorder("prestart", &out)],
        "createRuntime": [hook(&fill, &out)],
        "poststart": [recorder("poststart", &out)],
        "poststop": [recorder("poststop", &out)],
    });
    let dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&dir).unwrap();
    // Alive for a while after start, so poststart sees it running.
    let script = "ip -o addr show dev eth0; ip route; sleep 3; echo done";
    let bundle = bundle(&dir, script, hooks).unwrap();
    let pid_file = tmp.path().join("pid");
    let mut cmd = Command::new(husk_binary());
    cmd.arg("--root")
        .arg(&root)
        .args(["run", "hooked", "--bundle"])
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file);
    let run = run_with_timeout(cmd, Duration::from_secs(400)).unwrap();
    assert_eq!(run.code, Some(0), "husk run: {run:?}");
    assert!(run.output.contains("done"), "{}", run.output);
    eprintln!("hooks: husk run took {:?}", run.wall);

    let order = std::fs::read_to_string(out.join("order")).unwrap();
    assert_eq!(order, "prestart\ncreateRuntime\npoststart\npoststop\n");
    let monitor: i64 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for (kind, status) in [
        ("prestart", "creating"),
        ("createRuntime", "creating"),
        ("poststart", "running"),
        ("poststop", "stopped"),
    ] {
        let st = read_json(&out.join(format!("{kind}.json")));
        assert_eq!(st["status"], status, "{kind}: {st}");
        assert_eq!(st["id"], "hooked", "{kind}: {st}");
        assert_eq!(st["pid"], monitor, "{kind}: the monitor's pid: {st}");
        assert_eq!(st["bundle"], bundle.to_str().unwrap(), "{kind}: {st}");
        assert!(st["ociVersion"].is_string(), "{kind}: {st}");
    }
    // The hook ran in the host's namespaces (husk create's, not the monitor's pid namespace);
    // the state's pid is in a new network namespace.
    let hook_ns = std::fs::read_to_string(out.join("hook-netns")).unwrap();
    let hook_pidns = std::fs::read_to_string(out.join("hook-pidns")).unwrap();
    let container_ns = std::fs::read_to_string(out.join("container-netns")).unwrap();
    assert_eq!(hook_ns.trim(), host_netns.to_str().unwrap());
    assert_eq!(
        hook_pidns.trim(),
        host_pidns.to_str().unwrap(),
        "the hook ran in another pid namespace (the monitor's?)"
    );
    assert_ne!(container_ns.trim(), host_netns.to_str().unwrap());
    // What the hook put in the namespace reached the VM.
    assert!(
        run.output.contains(&format!("inet {subnet}.2/24")),
        "eth0 in the VM has the hook's address: {}",
        run.output
    );
    assert!(
        run.output.contains(&format!("default via {subnet}.1")),
        "{}",
        run.output
    );
    // Nothing left: no state, and the namespace went with the monitor (taking the veth).
    assert!(
        entries(&root).is_empty(),
        "state left: {:?}",
        entries(&root)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Command::new("ip")
        .args(["link", "show", &host_end])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{host_end} is left: the monitor's namespace outlived it"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

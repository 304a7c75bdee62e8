//! Tests of the hooks: running them (state on stdin, order, timeout, output), the check of a
//! bundle's hooks (`spec`), and their copy in the state directory.

use oci_spec::runtime::Spec;

use super::spec::check;
use super::*;
use crate::oci::state::Status;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("husk-hooks-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn state(bundle: &Path) -> State {
    State {
        oci_version: "1.2.0".into(),
        id: "c1".into(),
        status: Status::Creating,
        pid: Some(4242),
        bundle: bundle.to_owned(),
        annotations: [("a.b".to_string(), "v".to_string())].into(),
        created: "2026-01-01T00:00:00Z".into(),
        monitor_start_time: 7,
        exit_status: None,
    }
}

/// A hook running the shell script `script` (inline, `sh -c`: a script file written and
/// executed at once can fail with ETXTBSY while another test thread forks).
fn sh(script: &str) -> serde_json::Value {
    serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", script]})
}

fn hooks(kind: &str, list: Vec<serde_json::Value>) -> Hooks {
    serde_json::from_value(serde_json::json!({ kind: list })).unwrap()
}

#[test]
fn a_hook_gets_the_state_on_stdin_its_args_env_and_the_bundle_as_cwd() {
    let d = Dir::new("stdin");
    let out = d.0.join("out");
    let script = format!(
        "cat > {out}.state; tr '\\0' ' ' < /proc/$$/cmdline > {out}.cmdline; \
         echo \"$0|$1|$FOO|$PATH|$(pwd)\" > {out}.args",
        out = out.display()
    );
    let hook = serde_json::json!({
        "path": "/bin/sh",
        "args": ["my-hook", "-c", script, "zero", "one"],
        "env": ["FOO=bar=baz", "PATH=/bin:/usr/bin"],
    });
    let h = hooks("createRuntime", vec![hook]);
    run(HookKind::CreateRuntime, Some(&h), &state(&d.0)).unwrap();
    let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", out.display())).unwrap();
    let got: serde_json::Value = serde_json::from_str(&read("state")).unwrap();
    assert_eq!(got["ociVersion"], "1.2.0");
    assert_eq!(got["id"], "c1");
    assert_eq!(got["status"], "creating");
    assert_eq!(got["pid"], 4242);
    assert_eq!(got["bundle"], d.0.to_str().unwrap());
    assert_eq!(got["annotations"]["a.b"], "v");
    // Only the spec's fields.
    assert!(got.get("created").is_none() && got.get("monitorStartTime").is_none());
    // args[0] is argv[0], not the path.
    assert!(
        read("cmdline").starts_with("my-hook -c "),
        "{}",
        read("cmdline")
    );
    assert_eq!(
        read("args").trim(),
        format!("zero|one|bar=baz|/bin:/usr/bin|{}", d.0.display())
    );
}

#[test]
fn hooks_run_in_order_and_the_first_failure_stops_the_rest() {
    let d = Dir::new("order");
    let log = d.0.join("log");
    let list = || {
        [("a", 0), ("b", 3), ("c", 0)]
            .iter()
            .map(|(name, code)| {
                sh(&format!(
                    "echo {name} >> {}; echo out-of-{name}; echo err-of-{name} >&2; exit {code}",
                    log.display()
                ))
            })
            .collect::<Vec<_>>()
    };
    let h = hooks("prestart", list());
    let err = run(HookKind::Prestart, Some(&h), &state(&d.0)).unwrap_err();
    let text = error_chain(&err);
    assert!(text.contains("prestart hook /bin/sh failed"), "{text}");
    assert!(text.contains("exit status 3"), "{text}");
    assert!(
        text.contains("err-of-b") && text.contains("out-of-b"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\n");

    // poststart/poststop: a failure is a warning; the rest still run.
    std::fs::remove_file(&log).unwrap();
    let h = hooks("poststop", list());
    run_warning(HookKind::Poststop, Some(&h), &state(&d.0));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\nc\n");
}

#[test]
fn a_hook_past_its_timeout_is_killed() {
    let d = Dir::new("timeout");
    let pidfile = d.0.join("pid");
    let mut hook = sh(&format!("echo $$ > {}; exec sleep 30", pidfile.display()));
    hook["timeout"] = 1.into();
    let h = hooks("createRuntime", vec![hook]);
    let t = Instant::now();
    let err = run(HookKind::CreateRuntime, Some(&h), &state(&d.0)).unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(err, HookError::Timeout { timeout: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("timeout of 1 s"), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The hook is gone (killed and reaped), not left sleeping.
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "hook {pid} still runs"
    );
}

#[test]
fn a_hook_that_cannot_run_names_its_path() {
    let d = Dir::new("missing");
    let h = hooks(
        "poststart",
        vec![serde_json::json!({"path": "/nonexistent/hook"})],
    );
    let err = run(HookKind::Poststart, Some(&h), &state(&d.0)).unwrap_err();
    let text = error_chain(&err);
    assert!(
        text.contains("poststart hook /nonexistent/hook: cannot run it"),
        "{text}"
    );
}

#[test]
fn a_long_output_is_quoted_by_its_end() {
    let d = Dir::new("long");
    let h = hooks(
        "prestart",
        vec![sh(
            "i=0; while [ $i -lt 2000 ]; do echo line-$i >&2; i=$((i+1)); done; exit 1",
        )],
    );
    let err = run(HookKind::Prestart, Some(&h), &state(&d.0)).unwrap_err();
    let HookError::Failed { output, .. } = &err else {
        panic!("{err}");
    };
    assert!(output.starts_with("..."), "{output}");
    assert!(output.ends_with("line-1999"), "{output}");
    assert!(output.len() < OUTPUT_EXCERPT + 10);
}

#[test]
fn hooks_husk_cannot_honour_are_refused_by_name() {
    let spec = |hooks: &str| -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion": "1.0.2", "root": {{"path": "rootfs"}}, "hooks": {hooks}}}"#
        ))
        .unwrap()
    };
    let (field, why) = check(&spec(
        r#"{"createContainer": [{"path": "/usr/bin/nvidia-hook"}]}"#,
    ))
    .unwrap_err();
    assert_eq!(field, "hooks.createContainer");
    assert!(
        why.contains("/usr/bin/nvidia-hook") && why.contains("VM"),
        "{why}"
    );
    let (field, _) = check(&spec(r#"{"startContainer": [{"path": "/x"}]}"#)).unwrap_err();
    assert_eq!(field, "hooks.startContainer");
    let (field, _) =
        check(&spec(r#"{"poststart": [{"path": "/a"}, {"path": "rel"}]}"#)).unwrap_err();
    assert_eq!(field, "hooks.poststart[1].path");
    let (field, _) = check(&spec(r#"{"prestart": [{"path": "/a", "timeout": 0}]}"#)).unwrap_err();
    assert_eq!(field, "hooks.prestart[0].timeout");
    let (field, _) = check(&spec(
        r#"{"poststop": [{"path": "/a", "env": ["NOEQUALS"]}]}"#,
    ))
    .unwrap_err();
    assert_eq!(field, "hooks.poststop[0].env");
    // Empty lists are no hooks.
    check(&spec(
        r#"{"createContainer": [], "prestart": [{"path": "/a"}]}"#,
    ))
    .unwrap();
}

#[test]
fn hooks_are_kept_in_the_state_directory() {
    let d = Dir::new("store");
    assert!(load(&d.0).unwrap().is_none());
    let h = hooks("poststop", vec![sh("true")]);
    save(&d.0, Some(&h)).unwrap();
    assert_eq!(load(&d.0).unwrap(), Some(h));
}

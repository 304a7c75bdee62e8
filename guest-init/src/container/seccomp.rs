//! The spec's seccomp profile, compiled to classic BPF with seccompiler.
//!
//! seccompiler rather than libseccomp: it is pure Rust (husk-init is a static binary and
//! libseccomp would be a C dependency to cross-build and ship in the initramfs) and rust-vmm
//! maintained. Its filters have one match action each, while an OCI profile mixes actions per
//! syscall, so a profile becomes a *stack* of filters, which the kernel evaluates all of,
//! taking the most restrictive verdict:
//!
//! * a base filter: every syscall the profile lists (with its argument conditions) → allow,
//!   anything else → the default action (left out when the default is allow);
//! * one filter per other action: the syscalls with that action → that action, else allow.
//!
//! Where one syscall carries both a permissive and a restrictive rule whose argument
//! conditions overlap, the restrictive one wins (libseccomp would pick by its own priority);
//! real profiles do not do this. Syscall names this kernel's table does not know are ignored,
//! as runc does; the profile's `architectures` are ignored because the guest is always
//! x86_64; `flags` and `listenerPath` (user notification) are refused.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// A compiled profile: filters to install in order.
#[derive(Debug, Clone, Default)]
pub struct SeccompPlan {
    /// BPF programs, each installed with its own seccomp() call.
    pub filters: Vec<Vec<libc::sock_filter>>,
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Adds one entry's rule for `nr` to `rules`: an entry without conditions matches the
/// syscall unconditionally (an empty rule list in seccompiler), which absorbs other rules.
fn add_rule(rules: &mut Rules, nr: i64, rule: Option<SeccompRule>) {
    match (rules.get_mut(&nr), rule) {
        (Some(existing), _) if existing.is_empty() => {}
        (Some(existing), Some(r)) => existing.push(r),
        (Some(existing), None) => existing.clear(),
        (None, r) => {
            rules.insert(nr, r.into_iter().collect());
        }
    }
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, String> {
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno.unwrap_or(libc::EPERM.unsigned_abs()))
        }
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(0)),
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(
                "seccomp action SCMP_ACT_NOTIFY (no notification listener in the VM)".into(),
            );
        }
    })
}

fn condition(arg: &oci_spec::runtime::LinuxSeccompArg) -> Result<SeccompCondition, String> {
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // OCI: (arg & value) == valueTwo; seccompiler: (arg & mask) == value.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    let index = u8::try_from(arg.index())
        .ok()
        .filter(|i| *i < 6)
        .ok_or_else(|| format!("seccomp argument index {} (must be 0-5)", arg.index()))?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| format!("seccomp condition on argument {index}: {e}"))
}

/// Compiles a profile. Errors name the part of the profile that cannot be applied.
pub fn compile(profile: &LinuxSeccomp) -> Result<SeccompPlan, String> {
    if profile.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        return Err("linux.seccomp.flags are not supported".into());
    }
    if profile.listener_path().is_some() {
        return Err("linux.seccomp.listenerPath is not supported".into());
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut listed = Rules::new();
    // Rules per restrictive action, in first-seen order (for reproducible output).
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();

    for (i, entry) in profile.syscalls().iter().flatten().enumerate() {
        let act = action(entry.action(), entry.errno_ret())
            .map_err(|e| format!("linux.seccomp.syscalls[{i}]: {e}"))?;
        let rule = match entry.args() {
            Some(args) if !args.is_empty() => {
                let conds = args
                    .iter()
                    .map(condition)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("linux.seccomp.syscalls[{i}]: {e}"))?;
                Some(SeccompRule::new(conds).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        for name in entry.names() {
            let Ok(sysno) = syscalls::Sysno::from_str(name) else {
                continue; // unknown to this kernel's table: ignored, as runc does
            };
            let nr = i64::from(sysno.id());
            add_rule(&mut listed, nr, rule.clone());
            if act != SeccompAction::Allow {
                let slot = match by_action.iter_mut().position(|(a, _)| *a == act) {
                    Some(p) => &mut by_action[p].1,
                    None => {
                        by_action.push((act.clone(), Rules::new()));
                        &mut by_action.last_mut().expect("just pushed").1
                    }
                };
                add_rule(slot, nr, rule.clone());
            }
        }
    }

    let mut filters = Vec::new();
    let arch = TargetArch::x86_64;
    if default != SeccompAction::Allow {
        let f = SeccompFilter::new(listed, default, SeccompAction::Allow, arch)
            .map_err(|e| format!("seccomp profile: {e}"))?;
        filters.push(to_libc(f)?);
    }
    for (act, rules) in by_action {
        let f = SeccompFilter::new(rules, SeccompAction::Allow, act, arch)
            .map_err(|e| format!("seccomp profile: {e}"))?;
        filters.push(to_libc(f)?);
    }
    Ok(SeccompPlan { filters })
}

fn to_libc(f: SeccompFilter) -> Result<Vec<libc::sock_filter>, String> {
    let prog = BpfProgram::try_from(f).map_err(|e| format!("seccomp profile: {e}"))?;
    Ok(prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect())
}

impl SeccompPlan {
    /// Installs every filter on the calling thread.
    pub fn install(&self) -> std::io::Result<()> {
        for f in &self.filters {
            crate::sys::install_seccomp_filter(f.as_slice())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn allow_list_profile_compiles_to_one_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write","exit_group","no_such_syscall_42"],"action":"SCMP_ACT_ALLOW"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().filters.len(), 1);
    }

    #[test]
    fn mixed_actions_stack_filters() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                {"names":["chmod"],"action":"SCMP_ACT_KILL"},
                {"names":["personality"],"action":"SCMP_ACT_ERRNO",
                 "args":[{"index":0,"value":255,"valueTwo":8,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        );
        // Default allow: no base filter; EPERM(1) and KILL each get one.
        assert_eq!(compile(&p).unwrap().filters.len(), 2);
    }

    #[test]
    fn notify_and_bad_indexes_are_refused_with_their_place() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        );
        assert!(compile(&p).unwrap_err().contains("syscalls[0]"));
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO",
                "args":[{"index":7,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        assert!(compile(&p).unwrap_err().contains("index 7"));
    }
}

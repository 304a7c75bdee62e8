//! What the spec's hooks are to husk: the kinds it runs ([`HookKind`]) and the check of a
//! bundle's hooks when it is loaded ([`check`]). Loading a bundle needs only this, not the
//! running of hooks (`mod.rs`), which reads the container's state: so the bundle, the state
//! store and the hooks do not depend on one another in a circle.

use oci_spec::runtime::{Hook, Hooks, Spec};

/// The points of the lifecycle at which hooks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    /// `hooks.prestart` (deprecated by the spec; Docker 20.10 uses it).
    Prestart,
    /// `hooks.createRuntime`.
    CreateRuntime,
    /// `hooks.poststart`.
    Poststart,
    /// `hooks.poststop`.
    Poststop,
}

impl HookKind {
    /// The spec's name for it.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Prestart => "prestart",
            HookKind::CreateRuntime => "createRuntime",
            HookKind::Poststart => "poststart",
            HookKind::Poststop => "poststop",
        }
    }

    /// This kind's hooks of `hooks`.
    pub(crate) fn hooks(self, hooks: &Hooks) -> &[Hook] {
        let list = match self {
            HookKind::Prestart => hooks.prestart(),
            HookKind::CreateRuntime => hooks.create_runtime(),
            HookKind::Poststart => hooks.poststart(),
            HookKind::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }
}

impl std::fmt::Display for HookKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with the spec's hooks for husk, as (JSON path of the field, why); checked
/// when a bundle is loaded, so nothing has run or been made yet.
pub fn check(spec: &Spec) -> Result<(), (String, String)> {
    let Some(hooks) = spec.hooks() else {
        return Ok(());
    };
    for (name, list) in [
        ("createContainer", hooks.create_container()),
        ("startContainer", hooks.start_container()),
    ] {
        if let Some(first) = list.as_deref().and_then(<[Hook]>::first) {
            return Err((
                format!("hooks.{name}"),
                format!(
                    "{} would have to run inside the container, which is a VM without the \
                     host's programs; husk does not run {name} hooks (use createRuntime or \
                     poststart, which run on the host)",
                    first.path().display()
                ),
            ));
        }
    }
    for kind in [
        HookKind::Prestart,
        HookKind::CreateRuntime,
        HookKind::Poststart,
        HookKind::Poststop,
    ] {
        for (i, hook) in kind.hooks(hooks).iter().enumerate() {
            let field = |f: &str| format!("hooks.{kind}[{i}]{f}");
            if !hook.path().is_absolute() {
                return Err((
                    field(".path"),
                    format!("{} is not an absolute path", hook.path().display()),
                ));
            }
            if let Some(t) = hook.timeout()
                && t <= 0
            {
                return Err((
                    field(".timeout"),
                    format!("{t}: must be more than 0 seconds"),
                ));
            }
            if let Some(bad) = hook.env().iter().flatten().find(|e| !e.contains('=')) {
                return Err((field(".env"), format!("{bad:?} is not KEY=VALUE")));
            }
        }
    }
    Ok(())
}

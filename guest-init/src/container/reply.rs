//! How the parent side's failures become the [`ErrorReply`] the host gets: a leaf that `mod.rs`
//! and its helpers (`namespaces`, `stdio`) share, so that those helpers need nothing from
//! the module that uses them.

use husk_proto::{ErrorCode, ErrorReply};

use super::sync::ChildError;

/// A reply of class `code`.
pub(super) fn err(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

/// A system failure: what husk-init was doing, and why it failed.
pub(super) fn sys_reply(what: &str, e: impl std::fmt::Display) -> ErrorReply {
    err(ErrorCode::System, format!("{what}: {e}"))
}

impl From<ChildError> for ErrorReply {
    fn from(e: ChildError) -> Self {
        err(e.code, e.message)
    }
}

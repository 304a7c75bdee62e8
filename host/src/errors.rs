//! How husk reports an error: with its causes, on one line ([`error_chain`]). A leaf that every
//! module uses; the crate root re-exports it as `crate::error_chain`.

/// An error and its causes on one line (`a: b: c`), for messages that must name the root cause.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

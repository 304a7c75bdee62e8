//! Newtypes for the identifiers that cross the wire.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A container id, validated the way runc validates it: 1 to 1024 characters from
/// `[A-Za-z0-9_+.-]`, not `.` or `..`. Ids name directories on the host, so this is also
/// what keeps them from escaping the state root.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerId(String);

/// Why a string is not a valid [`ContainerId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid container id {id:?}: {reason}")]
pub struct InvalidContainerId {
    /// The rejected id.
    pub id: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl ContainerId {
    /// The longest id accepted.
    pub const MAX_LEN: usize = 1024;

    /// Validates `id`.
    ///
    /// ```
    /// use husk_proto::ContainerId;
    /// assert!(ContainerId::new("web-1").is_ok());
    /// assert!(ContainerId::new("../etc").is_err());
    /// ```
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidContainerId> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("it is empty")
        } else if id.len() > Self::MAX_LEN {
            Some("it is longer than 1024 characters")
        } else if id == "." || id == ".." {
            Some("it is a relative directory name")
        } else if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'))
        {
            Some("only letters, digits and _ + - . are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidContainerId { id, reason }),
            None => Ok(Self(id)),
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ContainerId {
    type Error = InvalidContainerId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> String {
        id.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A vsock port number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VsockPort(pub u32);

impl fmt::Display for VsockPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Pairs a [`crate::GuestMessage::Response`] with the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// A container of the VM, as the host numbers them: 0 is the VM's first container (the only
/// one, or a pod's sandbox), later ones are a pod's other containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContainerRef(pub u32);

impl ContainerRef {
    /// The VM's first container.
    pub const FIRST: ContainerRef = ContainerRef(0);
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "container {}", self.0)
    }
}

/// Names one exec'd process of a container; chosen by the host, unique per container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExecId(pub u32);

impl fmt::Display for ExecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exec-{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_follow_runc_rules() {
        for good in ["a", "web-1", "A_b+c.d", &"x".repeat(1024)] {
            assert!(ContainerId::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            "../x",
            &"x".repeat(1025),
            "a\0",
        ] {
            assert!(ContainerId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deserialising_validates_ids() {
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec("../../etc", cfg).unwrap();
        let res: Result<(ContainerId, usize), _> = bincode::serde::decode_from_slice(&bytes, cfg);
        assert!(res.is_err());
    }
}

//! One error type for the library. Each variant is one thing a user can be told in one line; the
//! CLI maps the variant to an exit code and a JSON `kind`. An error crosses the control socket
//! as `{kind, message, exit_code, errno}` (docs/CONTROL.md) and comes back as the same variant,
//! so a command behaves the same with a server running and without.

use std::io;

use serde::{Deserialize, Serialize};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad arguments or input: nothing was touched.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    /// The whole message (see [`Error::not_a_store`]).
    #[error("{0}")]
    NotAStore(String),
    /// Another snapctl, or a mount, holds the store or the origin.
    #[error("{0}")]
    Busy(String),
    /// Metadata failed its checksums or is inconsistent.
    #[error("{0}")]
    Corrupt(String),
    /// The origin no longer matches what the store recorded.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    NoSpace(String),
    /// A snapshot that was invalidated when the store filled up.
    #[error("{0}")]
    InvalidSnapshot(String),
    /// A bug: a panic caught at the edge of a command or a request.
    #[error("{0}")]
    Internal(String),
    /// `message` is the whole line: what failed, then the system's words for it.
    #[error("{message}")]
    Io {
        message: String,
        #[source]
        source: io::Error,
    },
}

/// The form an error travels in (docs/CONTROL.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    pub kind: String,
    pub message: String,
    pub exit_code: i32,
    /// For `io`: the errno, so a client sees EPIPE as EPIPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

impl Error {
    pub fn io(ctx: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            message: format!("{}: {source}", ctx.into()),
            source,
        }
    }

    pub fn not_a_store(what: impl std::fmt::Display) -> Self {
        Error::NotAStore(format!(
            "{what}: not a snapctl store (run `snapctl init` to create one)"
        ))
    }

    pub fn to_wire(&self) -> WireError {
        WireError {
            kind: self.kind().to_string(),
            message: self.to_string(),
            exit_code: self.exit_code(),
            errno: match self {
                Error::Io { source, .. } => source.raw_os_error(),
                _ => None,
            },
        }
    }

    /// The error a [`WireError`] stands for: the same variant, message and exit code.
    pub fn from_wire(w: WireError) -> Self {
        let m = w.message;
        match w.kind.as_str() {
            "invalid-argument" => Error::Invalid(m),
            "not-found" => Error::NotFound(m),
            "already-exists" => Error::Exists(m),
            "not-a-store" => Error::NotAStore(m),
            "busy" => Error::Busy(m),
            "corrupt" => Error::Corrupt(m),
            "origin-mismatch" => Error::Mismatch(m),
            "no-space" => Error::NoSpace(m),
            "snapshot-invalid" => Error::InvalidSnapshot(m),
            "internal" => Error::Internal(m),
            _ => Error::Io {
                source: match w.errno {
                    Some(n) => io::Error::from_raw_os_error(n),
                    None => io::Error::other(m.clone()),
                },
                message: m,
            },
        }
    }

    /// Stable machine-readable kind, part of the JSON contract.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid-argument",
            Error::NotFound(_) => "not-found",
            Error::Exists(_) => "already-exists",
            Error::NotAStore(_) => "not-a-store",
            Error::Busy(_) => "busy",
            Error::Corrupt(_) => "corrupt",
            Error::Mismatch(_) => "origin-mismatch",
            Error::NoSpace(_) => "no-space",
            Error::InvalidSnapshot(_) => "snapshot-invalid",
            Error::Internal(_) => "internal",
            Error::Io { .. } => "io",
        }
    }

    /// Exit status, documented in snapctl(1).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Io { .. } => 1,
            Error::Invalid(_) => 2,
            Error::NotFound(_) | Error::NotAStore(_) => 3,
            Error::Exists(_) => 4,
            Error::Busy(_) => 5,
            Error::Corrupt(_) | Error::Mismatch(_) => 6,
            Error::NoSpace(_) => 7,
            Error::InvalidSnapshot(_) => 8,
            Error::Internal(_) => 70,
        }
    }

    /// The errno an NBD client (or a short write) should see.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Invalid(_) => libc::EINVAL,
            Error::InvalidSnapshot(_) => libc::EIO,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

/// A failed write: a device or file that refuses every write (a read-only loop device, a
/// write-protected disk) is named as read-only, with what to do; anything else as it is.
pub(crate) fn write_err(ctx: String, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) => Error::Io {
            message: format!(
                "{ctx}: the device or file is read-only ({e}); make it writable, or use another store"
            ),
            source: e,
        },
        _ => Error::io(ctx, e),
    }
}

/// redb errors inside the metadata region are either our region running out, I/O, or damage.
pub(crate) fn meta_err(store: &str, e: impl Into<redb::Error>) -> Error {
    let e: redb::Error = e.into();
    let msg = e.to_string();
    match e {
        redb::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => Error::NoSpace(format!(
            "{store}: the metadata region is full (re-create the store with a larger --metadata-size)"
        )),
        redb::Error::Io(io) => write_err(format!("{store}: metadata I/O"), io),
        redb::Error::Corrupted(_) => Error::Corrupt(format!(
            "{store}: metadata is damaged ({msg}); run `snapctl check`"
        )),
        _ => Error::Corrupt(format!("{store}: metadata error: {msg}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_wire() {
        let all = [
            Error::Invalid("a".into()),
            Error::NotFound("b".into()),
            Error::Exists("c".into()),
            Error::not_a_store("d"),
            Error::Busy("e".into()),
            Error::Corrupt("f".into()),
            Error::Mismatch("g".into()),
            Error::NoSpace("h".into()),
            Error::InvalidSnapshot("i".into()),
            Error::Internal("k".into()),
            Error::io("j", io::Error::from_raw_os_error(libc::EPIPE)),
        ];
        for e in all {
            let w = serde_json::to_string(&e.to_wire()).expect("encode");
            let back = Error::from_wire(serde_json::from_str(&w).expect("decode"));
            assert_eq!(back.kind(), e.kind());
            assert_eq!(back.exit_code(), e.exit_code());
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(back.errno(), e.errno());
        }
    }
}

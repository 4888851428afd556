//! One error type for the library. Each variant is one thing a user can be told in one line; the
//! CLI maps the variant to an exit code and a JSON `kind`.

use std::io;

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
    #[error("{0}: not a snapctl store (run `snapctl init` to create one)")]
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
    #[error("{ctx}: {source}")]
    Io {
        ctx: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub fn io(ctx: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            ctx: ctx.into(),
            source,
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

/// redb errors inside the metadata region are either our region running out, I/O, or damage.
pub(crate) fn meta_err(store: &str, e: impl Into<redb::Error>) -> Error {
    let e: redb::Error = e.into();
    let msg = e.to_string();
    match e {
        redb::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => Error::NoSpace(format!(
            "{store}: the metadata region is full (re-create the store with a larger --metadata-size)"
        )),
        redb::Error::Io(io) => Error::io(format!("{store}: metadata I/O"), io),
        redb::Error::Corrupted(_) => Error::Corrupt(format!(
            "{store}: metadata is damaged ({msg}); run `snapctl check`"
        )),
        _ => Error::Corrupt(format!("{store}: metadata error: {msg}")),
    }
}

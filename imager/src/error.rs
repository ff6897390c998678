//! The library's error type.

use std::path::PathBuf;

use crate::chunk::ChunkId;

/// Errors from the imaging engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed; `what` says which.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A manifest could not be parsed or is inconsistent.
    #[error("invalid manifest{}: {why}", .source_name.as_ref().map(|s| format!(" {s}")).unwrap_or_default())]
    BadManifest {
        /// Where the manifest came from.
        source_name: Option<String>,
        /// What is wrong.
        why: String,
    },
    /// The manifest's format version is not one this build understands.
    #[error(
        "image format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// Version found in the manifest.
        found: u32,
        /// Version this build supports.
        supported: u32,
    },
    /// No image of that name (or version) in the repository.
    #[error("image {0:?} not found in the repository")]
    ImageNotFound(String),
    /// Image names are restricted to a safe character set.
    #[error("invalid image name {0:?}: use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")]
    InvalidName(String),
    /// A chunk named by the manifest is not in the repository.
    #[error("chunk {0} is missing from the repository")]
    ChunkMissing(ChunkId),
    /// A chunk's content does not match its id (or does not decompress).
    #[error("chunk {id} is corrupt: {why}")]
    ChunkCorrupt {
        /// The chunk.
        id: ChunkId,
        /// What check failed.
        why: String,
    },
    /// The target cannot hold the image.
    #[error("target {target} is too small: the image needs {need} bytes, the target has {have}")]
    TargetTooSmall {
        /// Target path.
        target: PathBuf,
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// A multi-step disk operation failed half-way; `state` says what the
    /// disk looks like now.
    #[error("{source}; {state}")]
    Incomplete {
        /// The disk's state after the failure.
        state: String,
        /// What failed.
        source: Box<Error>,
    },
    /// The job was cancelled (Ctrl-C or an API cancel).
    #[error("cancelled")]
    Cancelled,
    /// A partition table problem.
    #[error(transparent)]
    Table(#[from] crate::table::TableError),
    /// A filesystem problem.
    #[error(transparent)]
    Fs(#[from] crate::fs::FsError),
    /// The request does not make sense (bad option combination, no such
    /// partition, …).
    #[error("{0}")]
    Invalid(String),
    /// A repository-level failure that is not plain I/O (HTTP status,
    /// protocol error, bad repository layout).
    #[error("repository: {0}")]
    Repo(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a description to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}

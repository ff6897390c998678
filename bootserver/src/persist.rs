//! Durable small-file writes: write a temporary file next to the target, fsync it,
//! rename it over the target and fsync the directory, so a crash leaves either the
//! old or the new content, never a torn file.
//!
//! Everything the server writes can hold secrets (agents' bearer tokens in
//! `state.json`, the TLS key, leases), so files are created mode 0600 — by
//! `open(2)` itself, never widened and narrowed afterwards — and the data
//! directory is 0700 ([`private_dir`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every file the server writes.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the data directory and its private subdirectories.
pub const DIR_MODE: u32 = 0o700;

/// Opens `path` for writing, creating it mode 0600 (truncating when `truncate`).
pub fn create_private(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(FILE_MODE)
        .open(path)
}

/// Creates `dir` (and missing parents) mode 0700; an existing directory
/// that others can read or enter is narrowed to 0700 (logged).
pub fn private_dir(dir: &Path) -> Result<(), PersistError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| PersistError::new("creating directory", dir, e))?;
    let meta = fs::metadata(dir).map_err(|e| PersistError::new("reading", dir, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| PersistError::new("restricting permissions of", dir, e))?;
        tracing::warn!(dir = %dir.display(), old = format!("{mode:o}"), "data directory was readable by others; now 0700");
    }
    Ok(())
}

/// An I/O failure on a named file.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct PersistError {
    /// What was being done.
    pub action: &'static str,
    /// The file it was done to.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: io::Error,
}

impl PersistError {
    pub(crate) fn new(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Atomically replaces `path` with `data` (temp + fsync + rename + fsync dir).
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<(), PersistError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".to_owned());
    let tmp = dir.join(format!(".{file_name}.{}.partial", std::process::id()));
    let write = || -> io::Result<()> {
        // A stale temporary file from a crash may exist with other modes:
        // remove it so the file is created anew with 0600.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut f = create_private(&tmp, true)?;
        f.write_all(data)?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(PersistError::new("writing", &tmp, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(PersistError::new("renaming into place", path, e));
    }
    sync_dir(dir)
}

/// Fsyncs a directory so a rename or create in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PersistError::new("syncing directory", dir, e))
}

/// Reads a file, mapping "not found" to `None`.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PersistError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PersistError::new("reading", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state.json");
        atomic_write(&p, b"one").expect("first write");
        atomic_write(&p, b"two").expect("second write");
        assert_eq!(fs::read(&p).expect("read back"), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "only the target remains: {names:?}");
        let mode = fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "state files are private");
    }

    #[test]
    fn private_dir_is_0700_and_narrows_an_open_one() {
        let base = tempfile::tempdir().expect("tempdir");
        let d = base.path().join("a/b");
        private_dir(&d).expect("create");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&d).expect("again");
        assert_eq!(mode(&d), 0o700);
    }
}

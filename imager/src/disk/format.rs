//! Making filesystems with the standard tools, on a kernel partition node
//! or, where the kernel has none (disk image files, kernels without
//! partition-table support), at a byte offset of the whole disk:
//!
//! * ext4: `mkfs.ext4 -E offset=BYTES,nodiscard FILE SIZEk`;
//! * FAT32: `mkfs.fat --offset SECTORS -h SECTORS -S SECTOR_SIZE FILE KiB`;
//! * NTFS and swap (their tools cannot write at an offset): the filesystem
//!   is made in a sparse temporary file of the partition's size, and its
//!   data ranges (`SEEK_DATA`/`SEEK_HOLE`) are copied into place.
//!
//! Before an offset-mode format the first and last MiB of the range are
//! zeroed (the whole range, cheaply by hole punching, on files) so that no
//! stale signature of an earlier filesystem survives.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::layout::{Filesystem, FormatJob, MIB};
use crate::device::{Device, DeviceKind};

/// Failure of one format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The tool could not be started.
    #[error("running {tool}")]
    Spawn {
        /// Program.
        tool: &'static str,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The tool failed.
    #[error("{tool} failed ({status}): {output}")]
    Tool {
        /// Program.
        tool: &'static str,
        /// Exit status.
        status: String,
        /// The end of its output.
        output: String,
    },
    /// Preparing or copying the filesystem failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

/// Where to make the filesystem.
pub(super) enum Target<'a> {
    /// A kernel partition node.
    Node(&'a Path),
    /// A byte range of the whole disk (file or block device), opened for
    /// writing.
    Offset(&'a Device),
}

/// Find a program in `PATH`, then in the sbin directories (which a
/// non-root `PATH` often lacks).
pub(super) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn run(tool: &'static str, args: &[OsString]) -> Result<(), FormatError> {
    let prog = find_tool(tool).ok_or_else(|| FormatError::Spawn {
        tool,
        source: io::Error::new(io::ErrorKind::NotFound, "not found in PATH"),
    })?;
    tracing::debug!(tool, ?args, "formatting");
    let out = Command::new(prog)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| FormatError::Spawn { tool, source })?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let text = text.trim();
    let tail: String = {
        let chars: Vec<char> = text.chars().collect();
        chars[chars.len().saturating_sub(1500)..].iter().collect()
    };
    Err(FormatError::Tool {
        tool,
        status: out.status.to_string(),
        output: tail.replace('\n', " / "),
    })
}

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

fn label_args(flag: &str, label: &Option<String>) -> Vec<OsString> {
    match label {
        Some(l) => vec![os(flag), os(l)],
        None => Vec::new(),
    }
}

/// Make `job`'s filesystem on `target`; `ss` is the disk's logical sector
/// size.
pub(super) fn format(job: &FormatJob, target: Target<'_>, ss: u32) -> Result<(), FormatError> {
    let ssu = u64::from(ss);
    let start_sectors = job.start / ssu;
    match target {
        Target::Node(node) => {
            let (tool, mut args): (&'static str, Vec<OsString>) = match job.filesystem {
                Filesystem::Ext4 => (
                    "mkfs.ext4",
                    [vec![os("-F"), os("-q")], label_args("-L", &job.label)].concat(),
                ),
                Filesystem::Fat32 => (
                    "mkfs.fat",
                    [fat32_args(job, ss), label_args("-n", &job.label)].concat(),
                ),
                Filesystem::Ntfs => (
                    "mkntfs",
                    [
                        vec![os("-Q"), os("-F"), os("-q")],
                        label_args("-L", &job.label),
                        ntfs_geometry(start_sectors, ss),
                    ]
                    .concat(),
                ),
                Filesystem::Swap => ("mkswap", label_args("-L", &job.label)),
            };
            args.push(node.as_os_str().to_owned());
            run(tool, &args)
        }
        Target::Offset(dev) => format_at_offset(job, dev, ss),
    }
}

/// `-F 32` and an explicit cluster size: mkfs.fat would otherwise size
/// clusters for the whole device when writing at an offset.
fn fat32_args(job: &FormatJob, ss: u32) -> Vec<OsString> {
    let spc = super::layout::fat32_cluster_size(job.size, ss) / ss.max(1);
    vec![os("-F"), os("32"), os("-s"), os(spc.max(1).to_string())]
}

fn ntfs_geometry(start_sectors: u64, ss: u32) -> Vec<OsString> {
    vec![
        os("-p"),
        os(start_sectors.to_string()),
        os("-H"),
        os("255"),
        os("-S"),
        os("63"),
        os("-s"),
        os(ss.to_string()),
    ]
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> FormatError {
    let what = what.into();
    move |source| FormatError::Io { what, source }
}

/// Clear old signatures in the target range.
fn clear_range(job: &FormatJob, dev: &Device) -> Result<(), FormatError> {
    let what = format!("clearing partition {} before formatting", job.number);
    if dev.kind() == DeviceKind::File {
        return dev.zero_range(job.start, job.size).map_err(io_err(what));
    }
    let head = job.size.min(MIB);
    dev.zero_range(job.start, head)
        .map_err(io_err(what.clone()))?;
    let tail_start = (job.start + job.size)
        .saturating_sub(MIB)
        .max(job.start + head);
    dev.zero_range(tail_start, job.start + job.size - tail_start)
        .map_err(io_err(what))
}

fn format_at_offset(job: &FormatJob, dev: &Device, ss: u32) -> Result<(), FormatError> {
    let ssu = u64::from(ss);
    let path = dev.path().as_os_str().to_owned();
    clear_range(job, dev)?;
    dev.sync().map_err(io_err(format!(
        "syncing {} before formatting",
        dev.path().display()
    )))?;
    match job.filesystem {
        Filesystem::Ext4 => {
            let mut args = [vec![os("-F"), os("-q")], label_args("-L", &job.label)].concat();
            args.extend([
                os("-E"),
                os(format!("offset={},nodiscard", job.start)),
                path,
                os(format!("{}k", job.size / 1024)),
            ]);
            run("mkfs.ext4", &args)
        }
        Filesystem::Fat32 => {
            let sectors = job.start / ssu;
            let mut args = [
                [fat32_args(job, ss), vec![os("-I")]].concat(),
                label_args("-n", &job.label),
            ]
            .concat();
            args.extend([
                os("-S"),
                os(ss.to_string()),
                os(format!("--offset={sectors}")),
                os("-h"),
                os(sectors.to_string()),
                path,
                os((job.size / 1024).to_string()),
            ]);
            run("mkfs.fat", &args)
        }
        Filesystem::Ntfs | Filesystem::Swap => via_temp_file(job, dev, ss),
    }
}

/// Make the filesystem in a sparse temporary file, then copy its data
/// ranges into the partition.
fn via_temp_file(job: &FormatJob, dev: &Device, ss: u32) -> Result<(), FormatError> {
    let dir = match dev.kind() {
        DeviceKind::File => dev
            .path()
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf),
        DeviceKind::Block => None,
    }
    .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix(".aula-mkfs-")
        .tempfile_in(&dir)
        .map_err(io_err(format!(
            "creating a temporary file in {}",
            dir.display()
        )))?;
    tmp.as_file()
        .set_len(job.size)
        .map_err(io_err("sizing the temporary file"))?;
    let tpath = tmp.path().as_os_str().to_owned();
    match job.filesystem {
        Filesystem::Ntfs => {
            let args = [
                vec![os("-Q"), os("-F"), os("-q")],
                label_args("-L", &job.label),
                ntfs_geometry(job.start / u64::from(ss), ss),
                vec![tpath],
            ]
            .concat();
            run("mkntfs", &args)?;
        }
        Filesystem::Swap => {
            let args = [vec![os("-q")], label_args("-L", &job.label), vec![tpath]].concat();
            run("mkswap", &args)?;
        }
        Filesystem::Ext4 | Filesystem::Fat32 => {}
    }
    copy_data(tmp.as_file(), job.size, dev, job.start).map_err(io_err(format!(
        "copying the new filesystem into partition {}",
        job.number
    )))
}

/// Copy the data ranges of `src` (`len` bytes) to `dst` at `offset`.
fn copy_data(src: &std::fs::File, len: u64, dst: &Device, offset: u64) -> io::Result<()> {
    let fd = src.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        use nix::unistd::{lseek, Whence};
        let data = match lseek(fd, pos as libc::off_t, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
        };
        let hole = lseek(fd, data as libc::off_t, Whence::SeekHole)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        let hole = (hole as u64).min(len);
        let mut at = data;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], offset + at)?;
            at += n as u64;
        }
        pos = hole;
    }
    dst.sync()
}

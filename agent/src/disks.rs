//! Disks as jobs see them: OpenGnsys `dsk` numbers resolved to devices or
//! (by configuration) image files, exclusive access to the partition a job
//! writes, temporary mounts (read-only inspection, the CACHE partition).
//!
//! # Exclusive access
//!
//! * Whole-disk writes open a block device with `O_EXCL`: the kernel refuses
//!   while any partition is mounted or held. For an image file, no loop
//!   device may be attached to it.
//! * Partition writes open the whole disk shared (the CACHE partition on the
//!   same disk may be mounted) and hold the partition's own node with
//!   `O_EXCL` for the whole job, so nothing can mount it meanwhile. For an
//!   image file, no loop device may cover the partition's byte range.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use aula_imager::disk::{DiskInfo, PartitionInfo};

/// Disk-access failures.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// No such disk number.
    #[error("{0}")]
    NoDisk(String),
    /// The disk cannot be inspected.
    #[error("reading {}: {message}", path.display())]
    Inspect {
        /// The disk.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// No such partition.
    #[error("{} has no partition {number} (it has: {have})", path.display())]
    NoPartition {
        /// The disk.
        path: PathBuf,
        /// Wanted.
        number: u32,
        /// Present numbers.
        have: String,
    },
    /// In use.
    #[error("{0}")]
    Busy(String),
    /// A mount or loop command failed.
    #[error("{what}: {message}")]
    Mount {
        /// What was being done.
        what: String,
        /// The tool's message.
        message: String,
    },
}

/// The path of disk `dsk`: the configured mapping when there is one (then
/// only mapped disks exist), else the machine's disk in `dsk` order.
pub fn resolve(map: &BTreeMap<u32, PathBuf>, dsk: u32) -> Result<PathBuf, DiskError> {
    if !map.is_empty() {
        return map.get(&dsk).cloned().ok_or_else(|| {
            let have: Vec<String> = map.keys().map(u32::to_string).collect();
            DiskError::NoDisk(format!(
                "there is no disk {dsk} (configured disks: {})",
                have.join(", ")
            ))
        });
    }
    aula_imager::disk::resolve_dsk(dsk).map_err(|e| DiskError::NoDisk(e.to_string()))
}

/// Table, partitions and filesystems of a disk (or image file).
pub fn inspect(path: &Path) -> Result<DiskInfo, DiskError> {
    aula_imager::disk::inspect(path, &aula_imager::disk::InspectOptions::default()).map_err(|e| {
        DiskError::Inspect {
            path: path.to_path_buf(),
            message: crate::tls::error_chain(&e),
        }
    })
}

/// Partition `n` of a disk.
pub fn partition(info: &DiskInfo, n: u32) -> Result<PartitionInfo, DiskError> {
    info.partition(n)
        .cloned()
        .ok_or_else(|| DiskError::NoPartition {
            path: info.path.clone(),
            number: n,
            have: {
                let v: Vec<String> = info
                    .partitions
                    .iter()
                    .map(|p| p.number.to_string())
                    .collect();
                if v.is_empty() {
                    "none".into()
                } else {
                    v.join(", ")
                }
            },
        })
}

/// True for a block device.
pub fn is_block(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

pub use aula_imager::disk::busy::file_range_busy;

/// Held while a job writes one partition: the partition node opened with
/// `O_EXCL` (block devices with partition nodes).
#[derive(Debug)]
pub struct PartitionGuard {
    node: Option<File>,
}

impl PartitionGuard {
    /// Drop the node's page cache, so readers through the partition node see
    /// what was written through the whole disk.
    pub fn drop_caches(&self) {
        if let Some(f) = &self.node {
            let _ = nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(f),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
    }
}

/// Make sure partition `p` of `disk` is not in use and keep it so.
pub fn claim_partition(disk: &Path, p: &PartitionInfo) -> Result<PartitionGuard, DiskError> {
    if is_block(disk) {
        if let Some(node) = &p.node {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(node)
                .map_err(|e| {
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        DiskError::Busy(format!(
                            "partition {} ({}) is in use (mounted or held)",
                            p.number,
                            node.display()
                        ))
                    } else {
                        DiskError::Busy(format!("opening {}: {e}", node.display()))
                    }
                })?;
            return Ok(PartitionGuard { node: Some(f) });
        }
        return Ok(PartitionGuard { node: None });
    }
    if let Some(why) = file_range_busy(disk, p.start, p.size) {
        return Err(DiskError::Busy(format!(
            "partition {} is in use: {why}",
            p.number
        )));
    }
    Ok(PartitionGuard { node: None })
}

/// Make sure nothing uses an image file at all (whole-disk writes).
pub fn check_file_unused(disk: &Path) -> Result<(), DiskError> {
    if !is_block(disk) {
        if let Some(why) = file_range_busy(disk, 0, u64::MAX / 2) {
            return Err(DiskError::Busy(format!(
                "{} is in use: {why}",
                disk.display()
            )));
        }
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> Result<String, DiskError> {
    let out = cmd.output().map_err(|e| DiskError::Mount {
        what: what.into(),
        message: format!("running {:?}: {e}", cmd.get_program()),
    })?;
    if !out.status.success() {
        return Err(DiskError::Mount {
            what: what.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A mounted partition; unmounted (and its loop device detached) on drop.
#[derive(Debug)]
pub struct Mounted {
    dir: PathBuf,
    loopdev: Option<String>,
    remove_dir: bool,
}

impl Mounted {
    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        nix::unistd::sync();
        if let Err(e) = run(Command::new("umount").arg(&self.dir), "unmounting") {
            tracing::warn!(dir = %self.dir.display(), error = %e, "unmount failed; retrying lazily");
            let _ = run(
                Command::new("umount").arg("-l").arg(&self.dir),
                "unmounting",
            );
        }
        if let Some(l) = &self.loopdev {
            let _ = run(Command::new("losetup").arg("-d").arg(l), "detaching");
        }
        if self.remove_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Run `program` (the live system's `aula-disklinks`) after a job changed
/// partitions or filesystems, when it exists: best effort, at most 60 s,
/// failures logged.
pub fn after_disk_change(program: &Path) {
    if !program.is_file() {
        return;
    }
    let mut child = match Command::new(program)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("running {}: {e}", program.display());
            return;
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return,
            Ok(Some(st)) => {
                tracing::warn!("{} ended with {st}", program.display());
                return;
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!("{} did not finish within 60 s", program.display());
                return;
            }
        }
    }
}

/// Mount options for a partition whose filesystem (`fs`, as probed) a
/// student may have written: never a device node, set-uid program or
/// executable from it (`nodev,nosuid,noexec`); read-only looks also skip
/// the ext journal replay, which would write.
pub fn mount_options(fs: &str, read_only: bool) -> Vec<&'static str> {
    let mut opts = vec!["nodev", "nosuid", "noexec"];
    if read_only {
        opts.push("ro");
        if fs.starts_with("ext") {
            opts.push("noload");
        }
    }
    opts
}

/// Mount partition `p` of `disk` at `dir` (created if missing), with
/// [`mount_options`]. Block
/// devices with a partition node mount the node; otherwise a loop device
/// is set up over the partition's byte range. `fstype` `None` lets mount
/// probe (ntfs goes through ntfs-3g).
pub fn mount(
    disk: &Path,
    p: &PartitionInfo,
    dir: &Path,
    read_only: bool,
    remove_dir: bool,
) -> Result<Mounted, DiskError> {
    std::fs::create_dir_all(dir).map_err(|e| DiskError::Mount {
        what: format!("creating {}", dir.display()),
        message: e.to_string(),
    })?;
    let (source, loopdev) = match (&p.node, is_block(disk)) {
        (Some(node), true) => (node.display().to_string(), None),
        _ => {
            let mut c = Command::new("losetup");
            c.arg("--find").arg("--show");
            if read_only {
                c.arg("--read-only");
            }
            c.arg("--offset")
                .arg(p.start.to_string())
                .arg("--sizelimit")
                .arg(p.size.to_string())
                .arg(disk);
            let dev = run(&mut c, "setting up a loop device")?;
            (dev.clone(), Some(dev))
        }
    };
    let fs = p.filesystem.as_deref().unwrap_or("");
    let opts = mount_options(fs, read_only).join(",");
    let mut c = if fs == "ntfs" {
        let mut c = Command::new("ntfs-3g");
        c.arg("-o").arg(&opts).arg(&source).arg(dir);
        c
    } else {
        let mut c = Command::new("mount");
        c.arg("-o").arg(&opts);
        match fs {
            "ext2" | "ext3" | "ext4" => {
                c.arg("-t").arg(fs);
            }
            "fat32" | "fat16" | "fat12" => {
                c.arg("-t").arg("vfat");
            }
            _ => {}
        }
        c.arg(&source).arg(dir);
        c
    };
    match run(&mut c, &format!("mounting partition {}", p.number)) {
        Ok(_) => Ok(Mounted {
            dir: dir.to_path_buf(),
            loopdev,
            remove_dir,
        }),
        Err(e) => {
            if let Some(l) = &loopdev {
                let _ = run(Command::new("losetup").arg("-d").arg(l), "detaching");
            }
            Err(e)
        }
    }
}

/// The CACHE partition, mounted while at least one job uses it.
pub struct Cache {
    state: Mutex<Option<(std::sync::Arc<Mounted>, usize)>>,
}

/// A use of the mounted cache; the last one to go unmounts it.
pub struct CacheUse<'a> {
    cache: &'a Cache,
    mounted: std::sync::Arc<Mounted>,
}

impl CacheUse<'_> {
    /// The directory holding the chunk cache (a repository layout).
    pub fn repo_dir(&self) -> PathBuf {
        self.mounted.dir().join("aula")
    }
}

impl Drop for CacheUse<'_> {
    fn drop(&mut self) {
        let mut st = self.cache.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, n)) = st.as_mut() {
            *n -= 1;
            if *n == 0 {
                *st = None;
            }
        }
    }
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    /// Nothing mounted yet.
    pub fn new() -> Cache {
        Cache {
            state: Mutex::new(None),
        }
    }

    /// Mount the CACHE partition of `disk` at `dir` (or reuse the mount).
    pub fn acquire(&self, disk: &Path, dir: &Path) -> Result<CacheUse<'_>, DiskError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((m, n)) = st.as_mut() {
            *n += 1;
            return Ok(CacheUse {
                cache: self,
                mounted: m.clone(),
            });
        }
        let info = inspect(disk)?;
        let p = info.cache_partition().cloned().ok_or_else(|| {
            DiskError::NoDisk(format!(
                "{} has no CACHE partition (label or GPT name CACHE, or MBR type ca); create one with Configurar",
                disk.display()
            ))
        })?;
        let m = std::sync::Arc::new(mount(disk, &p, dir, false, false)?);
        *st = Some((m.clone(), 1));
        Ok(CacheUse {
            cache: self,
            mounted: m,
        })
    }
}

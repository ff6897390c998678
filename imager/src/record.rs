//! Restore records: what a finished restore left on its target, and the
//! kernel's evidence that nothing has written to the target since.
//!
//! A delta restore normally reads and hashes every used window of the
//! target, the only way to learn what a disk holds. When Aula itself wrote
//! the target earlier in this boot, and the kernel's write accounting shows
//! no write since, the target's content is known without reading it: the
//! windows whose chunk and used ranges are the same in the recorded image
//! and the new one are skipped unread, and the others are fetched without a
//! read.
//!
//! Trust rules. Any doubt means the target is read and hashed as usual:
//! - A record is valid only in the boot that wrote it (`boot_id`). After a
//!   reboot an operating system may have written anything, and a write the
//!   crash lost the timestamp of may still have reached the disk.
//! - Regular files: the same device, inode, size, mtime and ctime. The
//!   record is taken only once the clock has passed the file's timestamps by
//!   more than a kernel tick, so a later write cannot carry the same ones.
//! - Block devices: the same device number and `diskseq` (another disk in
//!   the same slot gets another), and unchanged write and discard counters
//!   of the whole disk in `/sys/dev/block/M:m/stat`, read after a `sync()` so
//!   no dirty page is left waiting. Writes through a partition node are
//!   counted on the whole disk too. Stacked devices (device-mapper, md),
//!   loop, RAM and network block devices are never trusted: data can change
//!   under them without passing their counters.
//! - The counters are read before the restore writes anything ([`start`])
//!   as well as after it: the sectors written in between must all be the
//!   restore's own, whose upper bound the device keeps
//!   ([`Device::own_write_sectors`]: buffered writes rounded out to whole
//!   pages), and nothing may have been discarded. A script that writes to
//!   the disk while the restore runs therefore voids the record (exactly so
//!   when the restore's writes are page aligned, as they are for ext4 and
//!   NTFS with 4 KiB blocks; otherwise a foreign write smaller than the
//!   rounding slack could hide in it). Regular files have no such counters:
//!   a write by another process during the restore of an image file is not
//!   detected (files are test and build targets; lab disks are block
//!   devices).
//! - A record names the byte range (offset and length) it covers and says
//!   nothing about any other range.
//! - The record directory must belong to the user running Aula and be
//!   writable by nobody else, or it is not used.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::stat::{major, minor};
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::device::{Device, DeviceKind, Region};
use crate::error::{Error, IoContext, Result};
use crate::extent::ExtentMap;
use crate::manifest::{ChunkRef, Manifest};

const FORMAT: &str = "aula-restore-record";

/// The records directory of root (the agent, the imager run as root): on
/// `/run`, a RAM filesystem emptied at every boot.
pub const ROOT_DIR: &str = "/run/aula/records";
const VERSION: u32 = 1;

/// The kernel's evidence about a target's writes, compared for equality.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Mark {
    /// A regular file.
    File {
        /// `/proc/sys/kernel/random/boot_id` when the mark was taken.
        boot_id: String,
        /// st_dev.
        dev: u64,
        /// st_ino.
        ino: u64,
        /// st_size.
        size: u64,
        /// st_mtime, seconds and nanoseconds.
        mtime: (i64, i64),
        /// st_ctime, seconds and nanoseconds.
        ctime: (i64, i64),
    },
    /// A block device (its whole disk's counters).
    Block {
        /// `/proc/sys/kernel/random/boot_id` when the mark was taken.
        boot_id: String,
        /// st_rdev of the device opened.
        rdev: u64,
        /// The whole disk's `diskseq`.
        diskseq: u64,
        /// Completed write requests of the whole disk.
        writes: u64,
        /// Sectors written.
        write_sectors: u64,
        /// Completed discard requests.
        discards: u64,
        /// Sectors discarded.
        discard_sectors: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    format: String,
    version: u32,
    /// `name@version` of the image restored (for people reading the file).
    image: String,
    mark: Mark,
    offset: u64,
    len: u64,
    chunk_size: u64,
    source_size: u64,
    used: ExtentMap,
    /// (window index, chunk id; None = an all-zero window).
    chunks: Vec<(u64, Option<ChunkId>)>,
}

/// What a valid record says the target's region holds.
#[derive(Debug)]
pub struct Known {
    image: String,
    used: ExtentMap,
    chunks: HashMap<u64, Option<ChunkId>>,
}

impl Known {
    /// The image the record names (`name@version`).
    pub fn image(&self) -> &str {
        &self.image
    }

    /// True when the window at `start` (`len` bytes) holds exactly chunk
    /// `c` of an image with used map `used`: the recorded image had the
    /// same chunk there and the same used ranges (the target's bytes
    /// outside the recorded image's used ranges are unknown).
    pub fn holds(&self, used: &ExtentMap, c: &ChunkRef, start: u64, len: u64) -> bool {
        self.chunks.get(&c.index) == Some(&c.id)
            && self.used.window(start, len) == used.window(start, len)
    }
}

/// A target's mark taken before a restore writes anything to it, with the
/// device's own write count at that moment.
#[derive(Debug, Clone)]
pub struct Start {
    mark: Mark,
    own: u64,
}

/// Take the mark of `dev` before a restore starts writing (`None` when its
/// writes cannot be tracked: then no record is written afterwards).
pub fn start(dev: &Device) -> Option<Start> {
    let own = dev.own_write_sectors();
    Some(Start {
        mark: mark(dev)?,
        own,
    })
}

/// Whether every write the kernel counted between `start` and `now` can be
/// the restore's own: `own_now - start.own` is the upper bound of the
/// sectors this handle wrote since.
fn writes_are_own(start: &Start, now: &Mark, own_now: u64) -> std::result::Result<(), String> {
    match (&start.mark, now) {
        // No counters: see the module doc.
        (Mark::File { .. }, Mark::File { .. }) => Ok(()),
        (
            Mark::Block {
                boot_id: b0,
                rdev: r0,
                diskseq: q0,
                write_sectors: w0,
                discards: d0,
                discard_sectors: ds0,
                ..
            },
            Mark::Block {
                boot_id: b1,
                rdev: r1,
                diskseq: q1,
                write_sectors: w1,
                discards: d1,
                discard_sectors: ds1,
                ..
            },
        ) => {
            if (b0, r0, q0) != (b1, r1, q1) {
                return Err("the target is another disk than when the restore began".into());
            }
            if (d0, ds0) != (d1, ds1) {
                return Err("the disk was discarded during the restore".into());
            }
            let counted = w1
                .checked_sub(*w0)
                .ok_or("the disk's write counters went backwards")?;
            let own = own_now.saturating_sub(start.own);
            if counted > own {
                return Err(format!(
                    "{counted} sectors were written to the disk during the restore, at most {own} by the restore itself"
                ));
            }
            Ok(())
        }
        _ => Err("the target changed kind during the restore".into()),
    }
}

/// Where records are kept by default: `ROOT_DIR` for root,
/// `$XDG_RUNTIME_DIR/aula/records` for other users, none when neither
/// applies.
pub fn default_dir() -> Option<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Some(PathBuf::from(ROOT_DIR));
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| PathBuf::from(d).join("aula/records"))
}

fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn file_mark(dev: &Device, boot_id: String) -> Option<Mark> {
    let m = dev.file().metadata().ok()?;
    Some(Mark::File {
        boot_id,
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// The whole disk behind block device `rdev`, as seen under `sys`
/// (normally `/sys`), when its write counters can be trusted: (diskseq,
/// writes, write sectors, discards, discard sectors).
fn disk_counters(sys: &Path, rdev: u64) -> std::result::Result<(u64, [u64; 4]), String> {
    let node = sys.join(format!("dev/block/{}:{}", major(rdev), minor(rdev)));
    let node = fs::canonicalize(&node).map_err(|e| format!("{}: {e}", node.display()))?;
    let disk = if node.join("partition").exists() {
        node.parent()
            .ok_or("a partition without a parent disk")?
            .to_path_buf()
    } else {
        node
    };
    let name = disk
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    const UNTRUSTED: [&str; 9] = [
        "loop", "nbd", "dm-", "md", "zram", "ram", "drbd", "rbd", "ublk",
    ];
    if UNTRUSTED.iter().any(|p| name.starts_with(p)) || disk.join("loop").exists() {
        return Err(format!("{name} is a loop, stacked, RAM or network device"));
    }
    if fs::read_dir(disk.join("slaves")).is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!("{name} is stacked on other devices"));
    }
    let diskseq = fs::read_to_string(disk.join("diskseq"))
        .map_err(|e| format!("{name}: no diskseq ({e})"))?
        .trim()
        .parse::<u64>()
        .map_err(|e| format!("{name}: diskseq: {e}"))?;
    let stat = fs::read_to_string(disk.join("stat")).map_err(|e| format!("{name}: stat: {e}"))?;
    let f: Vec<u64> = stat
        .split_whitespace()
        .map(|x| x.parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("{name}: stat: {e}"))?;
    if f.len() < 15 {
        return Err(format!(
            "{name}: stat has {} fields, need the discard counters",
            f.len()
        ));
    }
    Ok((diskseq, [f[4], f[6], f[11], f[13]]))
}

fn block_mark(dev: &Device, boot_id: String) -> Option<Mark> {
    let rdev = dev.file().metadata().ok()?.rdev();
    // Push every dirty page of every writer to its device, so a write made
    // before this point is in the counters now rather than after them.
    nix::unistd::sync();
    match disk_counters(Path::new("/sys"), rdev) {
        Ok((diskseq, [writes, write_sectors, discards, discard_sectors])) => Some(Mark::Block {
            boot_id,
            rdev,
            diskseq,
            writes,
            write_sectors,
            discards,
            discard_sectors,
        }),
        Err(why) => {
            tracing::debug!("no restore record for {}: {why}", dev.path().display());
            None
        }
    }
}

/// The current mark of a device; None when it cannot be trusted.
pub fn mark(dev: &Device) -> Option<Mark> {
    let boot_id = boot_id()?;
    match dev.kind() {
        DeviceKind::File => file_mark(dev, boot_id),
        DeviceKind::Block => block_mark(dev, boot_id),
    }
}

/// A mark taken once the device has settled: for files, after the clock
/// has moved more than a kernel tick past the file's timestamps (so any
/// later write stamps a later time), and only if nothing changed meanwhile.
fn settled_mark(dev: &Device) -> Option<Mark> {
    let first = mark(dev)?;
    let Mark::File { mtime, ctime, .. } = &first else {
        return Some(first);
    };
    let newest = (*mtime).max(*ctime);
    let newest = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(newest.0).ok()?)
        + Duration::from_nanos(u64::try_from(newest.1).ok()?);
    // Linux stamps file times from a clock that lags by at most one tick
    // (10 ms at HZ=100); 25 ms is a safe margin.
    let settle = newest + Duration::from_millis(25);
    let deadline = SystemTime::now() + Duration::from_millis(500);
    while SystemTime::now() < settle {
        if SystemTime::now() > deadline {
            // A timestamp in the future (clock stepped back): no record.
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let again = mark(dev)?;
    (again == first).then_some(again)
}

fn key(dev: &Device, region: &Region) -> Option<String> {
    let m = dev.file().metadata().ok()?;
    Some(match dev.kind() {
        DeviceKind::File => format!(
            "file-{}-{}-{}-{}.json",
            m.dev(),
            m.ino(),
            region.offset(),
            region.len()
        ),
        DeviceKind::Block => format!(
            "block-{}-{}-{}-{}.json",
            major(m.rdev()),
            minor(m.rdev()),
            region.offset(),
            region.len()
        ),
    })
}

/// Refuse a record directory someone else could write to.
fn check_dir(dir: &Path) -> std::result::Result<(), String> {
    let md = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !md.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if md.uid() != nix::unistd::geteuid().as_raw() || md.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by other users than this one; not using it",
            dir.display()
        ));
    }
    Ok(())
}

/// What a valid record for `region` says it holds, if the record exists,
/// covers an image of the same geometry, and the device's mark has not
/// changed since it was written. Every reason for not trusting a record is
/// logged at debug level.
pub fn load(dir: &Path, region: &Region, chunk_size: u64, source_size: u64) -> Option<Known> {
    let dev = region.device();
    let why_not = |why: String| {
        tracing::debug!(
            "not using a restore record for {}: {why}",
            dev.path().display()
        );
        None
    };
    if let Err(e) = check_dir(dir) {
        return why_not(e);
    }
    let path = dir.join(key(dev, region)?);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) => return why_not(format!("{}: {e}", path.display())),
    };
    let rec: Record = match serde_json::from_slice(&text) {
        Ok(r) => r,
        Err(e) => return why_not(format!("{}: {e}", path.display())),
    };
    if rec.format != FORMAT || rec.version != VERSION {
        return why_not(format!("{}: unknown record format", path.display()));
    }
    if (rec.offset, rec.len) != (region.offset(), region.len()) {
        return why_not("it covers another byte range".into());
    }
    if (rec.chunk_size, rec.source_size) != (chunk_size, source_size) {
        return why_not(format!(
            "{} has another chunk size or source size",
            rec.image
        ));
    }
    match mark(dev) {
        Some(now) if now == rec.mark => {}
        Some(_) => return why_not("the target was written to since".into()),
        None => return why_not("the target's writes cannot be tracked".into()),
    }
    Some(Known {
        image: rec.image,
        used: rec.used,
        chunks: rec.chunks.into_iter().collect(),
    })
}

/// Record that `region` now holds image `m` exactly. Call after the data
/// has been flushed, with the mark taken before the restore's first write
/// ([`start`]). A device whose writes cannot be tracked, or that someone
/// else wrote to since `start`, gets no record (and an older one is
/// removed).
pub fn save(dir: &Path, region: &Region, m: &Manifest, start: Option<&Start>) -> Result<()> {
    let dev = region.device();
    let Some(name) = key(dev, region) else {
        return Ok(());
    };
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(|| format!("creating {}", dir.display()))?;
    }
    check_dir(dir).map_err(Error::Invalid)?;
    let path = dir.join(&name);
    let own_now = dev.own_write_sectors();
    let mark = settled_mark(dev).filter(|now| match start {
        Some(s) => match writes_are_own(s, now, own_now) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(
                    "no restore record for {}: {why}; the next restore reads the target",
                    dev.path().display()
                );
                false
            }
        },
        None => false,
    });
    let Some(mark) = mark else {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).ctx(|| format!("removing {}", path.display()))
            }
            _ => return Ok(()),
        }
    };
    let rec = Record {
        format: FORMAT.into(),
        version: VERSION,
        image: format!("{}@{}", m.name, m.image_version),
        mark,
        offset: region.offset(),
        len: region.len(),
        chunk_size: m.chunk_size,
        source_size: m.source_size,
        used: m.used.clone(),
        chunks: m.chunks.iter().map(|c| (c.index, c.id)).collect(),
    };
    let body = serde_json::to_vec(&rec)
        .map_err(|e| Error::Invalid(format!("encoding a restore record: {e}")))?;
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .ctx(|| format!("creating {}", tmp.display()))?;
    f.write_all(&body)
        .ctx(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).ctx(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysfs(root: &Path, disk: &str, stat: &str, diskseq: Option<&str>) -> PathBuf {
        let d = root.join("devices/virtual/block").join(disk);
        fs::create_dir_all(d.join("slaves")).expect("mkdir");
        fs::create_dir_all(d.join(format!("{disk}2"))).expect("mkdir part");
        fs::write(d.join(format!("{disk}2/partition")), "2\n").expect("partition");
        fs::write(d.join("stat"), stat).expect("stat");
        if let Some(s) = diskseq {
            fs::write(d.join("diskseq"), s).expect("diskseq");
        }
        fs::create_dir_all(root.join("dev/block")).expect("dev/block");
        std::os::unix::fs::symlink(&d, root.join("dev/block/254:0")).expect("link disk");
        std::os::unix::fs::symlink(d.join(format!("{disk}2")), root.join("dev/block/254:2"))
            .expect("link part");
        d
    }

    const STAT: &str = "  100 0 800 5   7 1 56 3   0 10 20   2 0 16 1   4 2\n";

    fn block(write_sectors: u64, discards: u64) -> Mark {
        Mark::Block {
            boot_id: "b".into(),
            rdev: 1,
            diskseq: 9,
            writes: 3,
            write_sectors,
            discards,
            discard_sectors: 0,
        }
    }

    #[test]
    fn a_write_by_someone_else_during_the_restore_voids_the_record() {
        let start = Start {
            mark: block(1000, 0),
            own: 50,
        };
        // The restore wrote (at most) 800 sectors and the disk counted 800.
        assert_eq!(writes_are_own(&start, &block(1800, 0), 850), Ok(()));
        // A script wrote 8 more sectors meanwhile.
        let e = writes_are_own(&start, &block(1808, 0), 850).expect_err("foreign write");
        assert!(e.contains("808 sectors"), "{e}");
        // A discard, another disk, a reboot: void too.
        assert!(writes_are_own(&start, &block(1800, 1), 850).is_err());
        let mut other = block(1800, 0);
        if let Mark::Block { diskseq, .. } = &mut other {
            *diskseq = 10;
        }
        assert!(writes_are_own(&start, &other, 850).is_err());
    }

    #[test]
    fn the_counters_of_a_real_sysfs_layout_feed_the_check() {
        // Counters read through the same code path as on a machine: before
        // the restore, after it, and after a foreign write of 8 sectors.
        let t = tempfile::tempdir().expect("tempdir");
        let d = sysfs(t.path(), "vde", STAT, Some("9\n"));
        let rdev = 254 << 8 | 2;
        let read = || -> Mark {
            let (diskseq, [writes, write_sectors, discards, discard_sectors]) =
                disk_counters(t.path(), rdev).expect("counters");
            Mark::Block {
                boot_id: "b".into(),
                rdev,
                diskseq,
                writes,
                write_sectors,
                discards,
                discard_sectors,
            }
        };
        let start = Start {
            mark: read(),
            own: 0,
        };
        fs::write(
            d.join("stat"),
            "100 0 800 5  9 1 64 3  0 10 20  2 0 16 1  4 2\n",
        )
        .expect("stat");
        assert_eq!(writes_are_own(&start, &read(), 8), Ok(()));
        fs::write(
            d.join("stat"),
            "100 0 800 5 10 1 72 3  0 10 20  2 0 16 1  4 2\n",
        )
        .expect("stat");
        assert!(writes_are_own(&start, &read(), 8).is_err());
    }

    #[test]
    fn a_partition_is_tracked_by_its_whole_disks_write_and_discard_counters() {
        let t = tempfile::tempdir().expect("tempdir");
        sysfs(t.path(), "vda", STAT, Some("9\n"));
        let rdev = 254 << 8 | 2;
        assert_eq!(disk_counters(t.path(), rdev), Ok((9, [7, 56, 2, 16])));
        assert_eq!(disk_counters(t.path(), 254 << 8), Ok((9, [7, 56, 2, 16])));
    }

    #[test]
    fn stacked_loop_and_unsequenced_disks_are_not_trusted() {
        let t = tempfile::tempdir().expect("tempdir");
        sysfs(t.path(), "loop0", STAT, Some("3"));
        assert!(disk_counters(t.path(), 254 << 8).is_err());

        let t = tempfile::tempdir().expect("tempdir");
        let d = sysfs(t.path(), "vdb", STAT, Some("3"));
        fs::write(d.join("slaves/sda"), "").expect("slave");
        assert!(disk_counters(t.path(), 254 << 8).is_err());

        let t = tempfile::tempdir().expect("tempdir");
        sysfs(t.path(), "vdc", STAT, None);
        assert!(disk_counters(t.path(), 254 << 8).is_err());

        let t = tempfile::tempdir().expect("tempdir");
        sysfs(t.path(), "vdd", "1 2 3 4 5 6 7 8 9 10 11\n", Some("3"));
        assert!(disk_counters(t.path(), 254 << 8).is_err());
    }
}

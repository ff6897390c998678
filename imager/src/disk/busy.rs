//! Is a disk in use? Mounted partitions (`/proc/self/mountinfo`), active
//! swap (`/proc/swaps`), holders in sysfs (device-mapper, MD, bcache), and
//! for disk image files, loop devices backed by them.
//!
//! These checks give a clear message naming what is in use; opening the
//! block device with `O_EXCL` afterwards closes the remaining window (the
//! kernel refuses while any partition is mounted or claimed).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// `major:minor` of a block device node.
fn dev_numbers(path: &Path) -> Option<(u64, u64)> {
    let meta = fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    Some((libc::major(rdev) as u64, libc::minor(rdev) as u64))
}

/// Kernel name (`sda`, `loop3`) of a block device node.
pub(crate) fn kernel_name(path: &Path) -> Option<String> {
    let (maj, min) = dev_numbers(path)?;
    let link = fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// True when the block device node `path` is a partition, not a whole disk.
pub(crate) fn is_partition(path: &Path) -> bool {
    dev_numbers(path)
        .map(|(maj, min)| Path::new(&format!("/sys/dev/block/{maj}:{min}/partition")).exists())
        .unwrap_or(false)
}

/// `major:minor` strings of a disk and all its partitions, with their names.
fn disk_and_partitions(name: &str) -> Vec<(String, String)> {
    let dir = PathBuf::from("/sys/block").join(name);
    let mut out = Vec::new();
    if let Ok(d) = fs::read_to_string(dir.join("dev")) {
        out.push((d.trim().to_string(), name.to_string()));
    }
    if let Ok(rd) = fs::read_dir(&dir) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.path().join("partition").exists() {
                if let (Ok(d), Some(n)) = (
                    fs::read_to_string(e.path().join("dev")),
                    e.file_name().to_str(),
                ) {
                    out.push((d.trim().to_string(), n.to_string()));
                }
            }
        }
    }
    out
}

/// Unescape the octal escapes (`\040`) of /proc mount tables.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why the block device `path` (a whole disk) is busy, or `None`.
pub fn block_device_busy(path: &Path) -> Option<String> {
    let name = kernel_name(path)?;
    let devs = disk_and_partitions(&name);
    let by_num = |mm: &str| devs.iter().find(|(d, _)| d == mm).map(|(_, n)| n.clone());
    let mut reasons = Vec::new();
    if let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") {
        for line in mi.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 5 {
                continue;
            }
            let source = line
                .split(" - ")
                .nth(1)
                .and_then(|r| r.split(' ').nth(1))
                .map(unescape);
            let hit = by_num(f[2]).or_else(|| {
                source
                    .as_deref()
                    .and_then(|s| dev_numbers(Path::new(s)))
                    .and_then(|(a, b)| by_num(&format!("{a}:{b}")))
            });
            if let Some(n) = hit {
                reasons.push(format!("{n} is mounted on {}", unescape(f[4])));
            }
        }
    }
    if let Ok(sw) = fs::read_to_string("/proc/swaps") {
        for line in sw.lines().skip(1) {
            if let Some(p) = line.split_whitespace().next() {
                if let Some((a, b)) = dev_numbers(Path::new(&unescape(p))) {
                    if let Some(n) = by_num(&format!("{a}:{b}")) {
                        reasons.push(format!("{n} is in use as swap"));
                    }
                }
            }
        }
    }
    for (_, n) in &devs {
        let holders = if *n == name {
            PathBuf::from("/sys/block").join(&name).join("holders")
        } else {
            PathBuf::from("/sys/block")
                .join(&name)
                .join(n)
                .join("holders")
        };
        if let Ok(rd) = fs::read_dir(holders) {
            let hs: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !hs.is_empty() {
                reasons.push(format!("{n} is held by {}", hs.join(", ")));
            }
        }
    }
    reasons.dedup();
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// Loop devices backed by `file` (same inode, or same path), with the byte
/// range each covers: `(name, offset, sizelimit)`.
fn loops_over(file: &Path) -> Vec<(String, u64, Option<u64>)> {
    let Ok(me) = fs::canonicalize(file) else {
        return Vec::new();
    };
    let Ok(meta) = fs::metadata(&me) else {
        return Vec::new();
    };
    let Ok(rd) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let l = e.path().join("loop");
        let Ok(b) = fs::read_to_string(l.join("backing_file")) else {
            continue;
        };
        let b = b.trim().trim_end_matches(" (deleted)");
        let same = fs::metadata(b)
            .map(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
            .unwrap_or(false);
        if !(same || Path::new(b) == me) {
            continue;
        }
        let num = |f: &str| {
            fs::read_to_string(l.join(f))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        out.push((
            name,
            num("offset").unwrap_or(0),
            num("sizelimit").filter(|s| *s > 0),
        ));
    }
    out.sort();
    out
}

/// Why the byte range `[start, start+len)` of the image file `file` is in
/// use (a loop device covers part of it), or `None`.
pub fn file_range_busy(file: &Path, start: u64, len: u64) -> Option<String> {
    let hits: Vec<String> = loops_over(file)
        .into_iter()
        .filter(|(_, off, limit)| {
            let end = limit.map_or(u64::MAX, |l| off.saturating_add(l));
            *off < start.saturating_add(len) && start < end
        })
        .map(|(name, off, limit)| match limit {
            Some(l) => format!("/dev/{name} (bytes {off}..{})", off + l),
            None if off > 0 => format!("/dev/{name} (from byte {off})"),
            None => format!("/dev/{name}"),
        })
        .collect();
    (!hits.is_empty()).then(|| format!("it is attached to {}", hits.join(", ")))
}

/// Why the regular file `path` is busy (a loop device reads it), or `None`.
pub fn file_busy(path: &Path) -> Option<String> {
    file_range_busy(path, 0, u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_escapes() {
        assert_eq!(unescape("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }
}

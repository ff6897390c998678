//! Software inventory (`InventarioSoftware`): which operating system a
//! mounted partition holds, with its name and version.
//!
//! * Linux: `etc/os-release` (or `usr/lib/os-release`), symlinks resolved
//!   inside the partition, plus the kernels in `boot/`.
//! * Windows: the registry hive `Windows/System32/config/SOFTWARE`, key
//!   `Microsoft\Windows NT\CurrentVersion` (`ProductName`, `DisplayVersion`,
//!   `CurrentBuild`, `UBR`, `EditionID`), read with a small read-only
//!   parser of the `regf` format. Windows 11 still calls itself
//!   "Windows 10" in `ProductName`; builds from 22000 on are reported as
//!   Windows 11. Paths are matched case-insensitively, as Windows does.
//!
//! The partition is untrusted (a student controls it): it is mounted
//! read-only with `nodev,nosuid,noexec` (`disks::mount`), and here
//!
//! | read | bound |
//! |---|---|
//! | `os-release` | a regular file (not a device node, FIFO or socket; opened non-blocking), at most [`MAX_OS_RELEASE`] (64 KiB) |
//! | symlinks | resolved inside the partition, at most 8; none on the Windows path |
//! | the `SOFTWARE` hive | a regular file of any size, never read whole: the few cells on the path to `CurrentVersion` are read where they lie, each at most [`regf::MAX_CELL`] (1 MiB), at most [`regf::MAX_SUBKEYS`] subkey entries examined per key |
//! | kernels in `boot/` | at most [`MAX_KERNELS`] names |

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// An operating system found on a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Os {
    /// `linux` or `windows`.
    pub family: String,
    /// Name (`Ubuntu`, `Windows 11 Pro`).
    pub name: String,
    /// Version (`24.04`, `23H2`).
    pub version: Option<String>,
    /// Display string (`Ubuntu 24.04.1 LTS`).
    pub pretty_name: Option<String>,
    /// Distribution id (`ubuntu`) or edition (`Professional`).
    pub id: Option<String>,
    /// Windows build (`22631.2861`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// Linux kernels found in `/boot`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<String>,
}

/// Largest `os-release` read.
pub const MAX_OS_RELEASE: u64 = 64 << 10;
/// Most kernels listed.
pub const MAX_KERNELS: usize = 64;

/// Open `p` for reading only if it is a regular file (opening does not
/// block on a FIFO; a device node is refused before it is read).
fn open_regular(p: &Path) -> Option<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(p)
        .ok()?;
    f.metadata().ok()?.is_file().then_some(f)
}

/// The text of a regular file of at most `max` bytes.
fn read_small(p: &Path, max: u64) -> Option<String> {
    let f = open_regular(p)?;
    let mut v = Vec::new();
    f.take(max + 1).read_to_end(&mut v).ok()?;
    if v.len() as u64 > max {
        tracing::warn!("{} is larger than {max} bytes: ignored", p.display());
        return None;
    }
    String::from_utf8(v).ok()
}

/// Look at a mounted root.
pub fn detect(root: &Path) -> Option<Os> {
    linux(root).or_else(|| windows(root))
}

/// Resolve `rel` inside `root`, following symlinks without leaving it.
fn resolve_inside(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut p = root.join(rel.trim_start_matches('/'));
    for _ in 0..8 {
        let meta = std::fs::symlink_metadata(&p).ok()?;
        if !meta.file_type().is_symlink() {
            return Some(p);
        }
        let target = std::fs::read_link(&p).ok()?;
        p = if target.is_absolute() {
            root.join(target.strip_prefix("/").ok()?)
        } else {
            p.parent()?.join(target)
        };
        if target_escapes(root, &p) {
            return None;
        }
    }
    None
}

fn target_escapes(root: &Path, p: &Path) -> bool {
    let mut depth: i64 = 0;
    let Ok(rest) = p.strip_prefix(root) else {
        return true;
    };
    for c in rest.components() {
        match c {
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

/// Parse `KEY=value` / `KEY="value"` lines.
pub fn parse_os_release(text: &str) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                .unwrap_or(v);
            m.insert(k.trim().to_string(), v.replace("\\\"", "\""));
        }
    }
    m
}

fn linux(root: &Path) -> Option<Os> {
    let text = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .filter_map(|r| resolve_inside(root, r))
        .find_map(|p| read_small(&p, MAX_OS_RELEASE))?;
    let m = parse_os_release(&text);
    let mut kernels: Vec<String> = std::fs::read_dir(root.join("boot"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("vmlinuz-")
                        .map(str::to_string)
                })
                .take(MAX_KERNELS)
                .collect()
        })
        .unwrap_or_default();
    kernels.sort();
    Some(Os {
        family: "linux".into(),
        name: m.get("NAME").cloned().unwrap_or_else(|| "Linux".into()),
        version: m.get("VERSION_ID").or(m.get("VERSION")).cloned(),
        pretty_name: m.get("PRETTY_NAME").cloned(),
        id: m.get("ID").cloned(),
        build: None,
        kernels,
    })
}

/// Find `rel` under `root` ignoring case; no component may be a symlink
/// (it could lead out of the partition).
fn find_nocase(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut cur = root.to_path_buf();
    for part in rel.split('/') {
        let exact = cur.join(part);
        match std::fs::symlink_metadata(&exact) {
            Ok(m) if m.file_type().is_symlink() => return None,
            Ok(_) => {
                cur = exact;
                continue;
            }
            Err(_) => {}
        }
        let found = std::fs::read_dir(&cur)
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(part))?;
        if found.file_type().ok()?.is_symlink() {
            return None;
        }
        cur = found.path();
    }
    Some(cur)
}

fn windows(root: &Path) -> Option<Os> {
    let hive_path = find_nocase(root, "Windows/System32/config/SOFTWARE")?;
    let file = open_regular(&hive_path)?;
    let hive = regf::Hive::new(&file).ok()?;
    let key = hive
        .find(&["Microsoft", "Windows NT", "CurrentVersion"])
        .ok()?;
    let s = |n: &str| {
        hive.value(key, n)
            .ok()
            .flatten()
            .and_then(|v| v.as_string())
    };
    let d = |n: &str| hive.value(key, n).ok().flatten().and_then(|v| v.as_u32());
    let product = s("ProductName").unwrap_or_else(|| "Windows".into());
    let build_no: Option<u32> = s("CurrentBuild")
        .or_else(|| s("CurrentBuildNumber"))
        .and_then(|b| b.trim().parse().ok());
    let name = match build_no {
        Some(b) if b >= 22000 && product.starts_with("Windows 10") => {
            product.replacen("Windows 10", "Windows 11", 1)
        }
        _ => product,
    };
    let build = build_no.map(|b| match d("UBR") {
        Some(u) => format!("{b}.{u}"),
        None => b.to_string(),
    });
    let version = s("DisplayVersion").or_else(|| s("ReleaseId")).or_else(|| {
        match (
            d("CurrentMajorVersionNumber"),
            d("CurrentMinorVersionNumber"),
        ) {
            (Some(a), Some(b)) => Some(format!("{a}.{b}")),
            _ => s("CurrentVersion"),
        }
    });
    Some(Os {
        family: "windows".into(),
        pretty_name: Some(match &version {
            Some(v) => format!("{name} {v}"),
            None => name.clone(),
        }),
        name,
        version,
        id: s("EditionID"),
        build,
        kernels: Vec::new(),
    })
}

/// A read-only parser of Windows registry hive files (`regf`).
pub mod regf {
    /// Parse failures.
    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub enum RegError {
        /// Not a hive, or a cell points outside the file.
        #[error("malformed hive: {0}")]
        Malformed(&'static str),
        /// A key on the path does not exist.
        #[error("key {0:?} not found")]
        NoKey(String),
    }

    /// A value's data.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Value {
        /// REG_SZ / REG_EXPAND_SZ.
        Str(String),
        /// REG_DWORD.
        Dword(u32),
        /// Anything else.
        Other(u32, Vec<u8>),
    }

    impl Value {
        /// The string, or a DWORD as decimal.
        pub fn as_string(&self) -> Option<String> {
            match self {
                Value::Str(s) => Some(s.clone()),
                Value::Dword(d) => Some(d.to_string()),
                Value::Other(..) => None,
            }
        }
        /// The DWORD.
        pub fn as_u32(&self) -> Option<u32> {
            match self {
                Value::Dword(d) => Some(*d),
                Value::Str(s) => s.trim().parse().ok(),
                Value::Other(..) => None,
            }
        }
    }

    /// Largest cell read (key, value, list and data cells of the path to
    /// `CurrentVersion` are far smaller).
    pub const MAX_CELL: usize = 1 << 20;
    /// Most subkey entries examined while looking for one child.
    pub const MAX_SUBKEYS: usize = 1 << 20;

    /// Where a hive's bytes come from: a file (read where the cells lie,
    /// never whole) or memory.
    pub trait Source {
        /// Fill `buf` from `offset`; false past the end or on an error.
        fn read_at(&self, buf: &mut [u8], offset: u64) -> bool;
    }

    impl Source for &[u8] {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> bool {
            let Ok(start) = usize::try_from(offset) else {
                return false;
            };
            match start
                .checked_add(buf.len())
                .and_then(|end| self.get(start..end))
            {
                Some(s) => {
                    buf.copy_from_slice(s);
                    true
                }
                None => false,
            }
        }
    }

    impl Source for std::fs::File {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> bool {
            std::os::unix::fs::FileExt::read_exact_at(self, buf, offset).is_ok()
        }
    }

    /// A hive, read through a [`Source`].
    pub struct Hive<'a> {
        src: &'a dyn Source,
        root: u32,
    }

    const BASE: u64 = 4096;

    fn u16_at(d: &[u8], o: usize) -> Result<u16, RegError> {
        d.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(RegError::Malformed("read past the end"))
    }
    fn u32_at(d: &[u8], o: usize) -> Result<u32, RegError> {
        d.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(RegError::Malformed("read past the end"))
    }

    fn decode_name(raw: &[u8], ascii: bool) -> String {
        if ascii {
            raw.iter().map(|&b| char::from(b)).collect()
        } else {
            utf16(raw)
        }
    }

    fn utf16(raw: &[u8]) -> String {
        let units: Vec<u16> = raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }

    impl<'a> Hive<'a> {
        /// Check the header.
        pub fn new(src: &'a dyn Source) -> Result<Hive<'a>, RegError> {
            let mut head = [0u8; 0x28];
            if !src.read_at(&mut head, 0) || &head[0..4] != b"regf" {
                return Err(RegError::Malformed("no regf signature"));
            }
            let root = u32_at(&head, 0x24)?;
            Ok(Hive { src, root })
        }

        /// The data of the cell at `off` (relative to the first hive bin).
        fn cell(&self, off: u32) -> Result<Vec<u8>, RegError> {
            let start = BASE + u64::from(off);
            let mut size = [0u8; 4];
            if !self.src.read_at(&mut size, start) {
                return Err(RegError::Malformed("read past the end"));
            }
            let len = i32::from_le_bytes(size).unsigned_abs() as usize;
            if len < 4 {
                return Err(RegError::Malformed("cell too small"));
            }
            if len > MAX_CELL {
                return Err(RegError::Malformed("cell larger than 1 MiB"));
            }
            let mut v = vec![0u8; len - 4];
            if !self.src.read_at(&mut v, start + 4) {
                return Err(RegError::Malformed("cell past the end"));
            }
            Ok(v)
        }

        fn key_name(&self, nk: &[u8]) -> Result<String, RegError> {
            let flags = u16_at(nk, 2)?;
            let len = u16_at(nk, 72)? as usize;
            let raw = nk
                .get(76..76 + len)
                .ok_or(RegError::Malformed("key name past the cell"))?;
            Ok(decode_name(raw, flags & 0x20 != 0))
        }

        fn subkeys(&self, list_off: u32, out: &mut Vec<u32>, depth: u32) -> Result<(), RegError> {
            if depth > 4 {
                return Err(RegError::Malformed("subkey lists nested too deep"));
            }
            let l = self.cell(list_off)?;
            let n = u16_at(&l, 2)? as usize;
            let mut push = |o: u32| {
                if out.len() >= MAX_SUBKEYS {
                    return Err(RegError::Malformed("more than 2^20 subkeys"));
                }
                out.push(o);
                Ok(())
            };
            match l.get(0..2) {
                Some(b"lf") | Some(b"lh") => {
                    for i in 0..n {
                        push(u32_at(&l, 4 + i * 8)?)?;
                    }
                }
                Some(b"li") => {
                    for i in 0..n {
                        push(u32_at(&l, 4 + i * 4)?)?;
                    }
                }
                Some(b"ri") => {
                    for i in 0..n {
                        self.subkeys(u32_at(&l, 4 + i * 4)?, out, depth + 1)?;
                    }
                }
                _ => return Err(RegError::Malformed("unknown subkey list")),
            }
            Ok(())
        }

        fn child(&self, key: u32, name: &str) -> Result<Option<u32>, RegError> {
            let nk = self.cell(key)?;
            if nk.get(0..2) != Some(b"nk") {
                return Err(RegError::Malformed("not a key cell"));
            }
            if u32_at(&nk, 20)? == 0 {
                return Ok(None);
            }
            let mut offs = Vec::new();
            self.subkeys(u32_at(&nk, 28)?, &mut offs, 0)?;
            for o in offs {
                let c = self.cell(o)?;
                if self.key_name(&c)?.eq_ignore_ascii_case(name) {
                    return Ok(Some(o));
                }
            }
            Ok(None)
        }

        /// The key at `path` below the root key.
        pub fn find(&self, path: &[&str]) -> Result<u32, RegError> {
            let mut k = self.root;
            for p in path {
                k = self
                    .child(k, p)?
                    .ok_or_else(|| RegError::NoKey(p.to_string()))?;
            }
            Ok(k)
        }

        /// Value `name` of key `key`.
        pub fn value(&self, key: u32, name: &str) -> Result<Option<Value>, RegError> {
            let nk = self.cell(key)?;
            let count = u32_at(&nk, 36)? as usize;
            if count == 0 {
                return Ok(None);
            }
            let list = self.cell(u32_at(&nk, 40)?)?;
            // The list cell (at most 1 MiB) bounds the count.
            for i in 0..count.min(list.len() / 4 + 1) {
                let vk = self.cell(u32_at(&list, i * 4)?)?;
                if vk.get(0..2) != Some(b"vk") {
                    return Err(RegError::Malformed("not a value cell"));
                }
                let nlen = u16_at(&vk, 2)? as usize;
                let flags = u16_at(&vk, 16)?;
                let vname = decode_name(
                    vk.get(20..20 + nlen)
                        .ok_or(RegError::Malformed("value name past the cell"))?,
                    flags & 1 != 0,
                );
                if !vname.eq_ignore_ascii_case(name) {
                    continue;
                }
                let size = u32_at(&vk, 4)?;
                let typ = u32_at(&vk, 12)?;
                let data: Vec<u8> = if size & 0x8000_0000 != 0 {
                    let n = (size & 0x7fff_ffff).min(4) as usize;
                    vk.get(8..8 + n)
                        .ok_or(RegError::Malformed("inline data"))?
                        .to_vec()
                } else {
                    let c = self.cell(u32_at(&vk, 8)?)?;
                    c.get(..size as usize)
                        .ok_or(RegError::Malformed("value data past the cell"))?
                        .to_vec()
                };
                return Ok(Some(match typ {
                    1 | 2 => Value::Str(utf16(&data)),
                    4 if data.len() >= 4 => {
                        Value::Dword(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
                    }
                    t => Value::Other(t, data),
                }));
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quoting_is_understood() {
        let m = parse_os_release(
            "NAME=\"Ubuntu\"\nVERSION_ID='24.04'\nID=ubuntu\n# comment\nPRETTY_NAME=\"Ubuntu 24.04.1 LTS\"\n",
        );
        assert_eq!(m["NAME"], "Ubuntu");
        assert_eq!(m["VERSION_ID"], "24.04");
        assert_eq!(m["ID"], "ubuntu");
        assert_eq!(m["PRETTY_NAME"], "Ubuntu 24.04.1 LTS");
    }

    /// A minimal registry hive writer (test only): one hive bin, cells
    /// appended in order.
    struct HiveBuilder {
        bin: Vec<u8>,
    }

    impl HiveBuilder {
        fn new() -> Self {
            let mut bin = vec![0u8; 32];
            bin[..4].copy_from_slice(b"hbin");
            HiveBuilder { bin }
        }
        fn cell(&mut self, data: &[u8]) -> u32 {
            let off = self.bin.len() as u32;
            let size = (data.len() + 4).div_ceil(8) * 8;
            self.bin.extend_from_slice(&(-(size as i32)).to_le_bytes());
            self.bin.extend_from_slice(data);
            self.bin.resize(off as usize + size, 0);
            off
        }
        fn utf16z(s: &str) -> Vec<u8> {
            s.encode_utf16()
                .chain([0])
                .flat_map(u16::to_le_bytes)
                .collect()
        }
        fn value_sz(&mut self, name: &str, v: &str) -> u32 {
            let data = Self::utf16z(v);
            let d = self.cell(&data);
            self.vk(name, data.len() as u32, d, 1)
        }
        fn value_dword(&mut self, name: &str, v: u32) -> u32 {
            self.vk(name, 0x8000_0004, v, 4)
        }
        fn vk(&mut self, name: &str, size: u32, data: u32, typ: u32) -> u32 {
            let mut c = b"vk".to_vec();
            c.extend_from_slice(&(name.len() as u16).to_le_bytes());
            c.extend_from_slice(&size.to_le_bytes());
            c.extend_from_slice(&data.to_le_bytes());
            c.extend_from_slice(&typ.to_le_bytes());
            c.extend_from_slice(&1u16.to_le_bytes());
            c.extend_from_slice(&0u16.to_le_bytes());
            c.extend_from_slice(name.as_bytes());
            self.cell(&c)
        }
        fn key(&mut self, name: &str, subkeys: &[u32], values: &[u32]) -> u32 {
            let mut list = 0u32;
            if !subkeys.is_empty() {
                let mut l = b"lf".to_vec();
                l.extend_from_slice(&(subkeys.len() as u16).to_le_bytes());
                for k in subkeys {
                    l.extend_from_slice(&k.to_le_bytes());
                    l.extend_from_slice(&0u32.to_le_bytes());
                }
                list = self.cell(&l);
            }
            let mut vlist = 0u32;
            if !values.is_empty() {
                let v: Vec<u8> = values.iter().flat_map(|o| o.to_le_bytes()).collect();
                vlist = self.cell(&v);
            }
            let mut c = vec![0u8; 76];
            c[..2].copy_from_slice(b"nk");
            c[2..4].copy_from_slice(&0x20u16.to_le_bytes());
            c[20..24].copy_from_slice(&(subkeys.len() as u32).to_le_bytes());
            c[28..32].copy_from_slice(&list.to_le_bytes());
            c[36..40].copy_from_slice(&(values.len() as u32).to_le_bytes());
            c[40..44].copy_from_slice(&vlist.to_le_bytes());
            c[72..74].copy_from_slice(&(name.len() as u16).to_le_bytes());
            c.extend_from_slice(name.as_bytes());
            self.cell(&c)
        }
        fn finish(mut self, root: u32) -> Vec<u8> {
            let len = self.bin.len().div_ceil(4096) * 4096;
            self.bin.resize(len, 0);
            self.bin[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            let mut file = vec![0u8; 4096];
            file[..4].copy_from_slice(b"regf");
            file[0x24..0x28].copy_from_slice(&root.to_le_bytes());
            file.extend_from_slice(&self.bin);
            file
        }
    }

    #[test]
    fn windows_name_version_and_build_come_from_the_software_hive() {
        let mut h = HiveBuilder::new();
        let vals = vec![
            h.value_sz("ProductName", "Windows 10 Pro"),
            h.value_sz("DisplayVersion", "23H2"),
            h.value_sz("CurrentBuild", "22631"),
            h.value_dword("UBR", 2861),
            h.value_sz("EditionID", "Professional"),
        ];
        let cv = h.key("CurrentVersion", &[], &vals);
        let other = h.key("Other", &[], &[]);
        let nt = h.key("Windows NT", &[other, cv], &[]);
        let ms = h.key("Microsoft", &[nt], &[]);
        let root = h.key("ROOT", &[ms], &[]);
        let hive = h.finish(root);
        let d = tempfile::tempdir().expect("tmp");
        // Windows paths are case-insensitive.
        let cfg = d.path().join("windows/system32/CONFIG");
        std::fs::create_dir_all(&cfg).expect("mkdir");
        std::fs::write(cfg.join("software"), &hive).expect("hive");
        let os = detect(d.path()).expect("windows found");
        assert_eq!(os.family, "windows");
        assert_eq!(os.name, "Windows 11 Pro");
        assert_eq!(os.version.as_deref(), Some("23H2"));
        assert_eq!(os.build.as_deref(), Some("22631.2861"));
        assert_eq!(os.id.as_deref(), Some("Professional"));
        // A truncated hive is an error, not a panic.
        let truncated = &hive[..4200];
        let bad = regf::Hive::new(&truncated).expect("header");
        assert!(bad
            .find(&["Microsoft", "Windows NT", "CurrentVersion"])
            .is_err());
    }

    /// A 20 GB sparse file (no disk space used).
    fn sparse(path: &Path, start: &[u8]) {
        std::fs::write(path, start).expect("write");
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open")
            .set_len(20_000_000_000)
            .expect("20 GB");
    }

    #[test]
    fn a_fifo_or_a_20_gb_os_release_is_ignored_at_once() {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path();
        std::fs::create_dir_all(root.join("etc")).expect("etc");
        std::fs::create_dir_all(root.join("usr/lib")).expect("usr/lib");
        // A FIFO nobody writes to: reading it would block forever.
        nix::unistd::mkfifo(
            &root.join("etc/os-release"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("fifo");
        sparse(&root.join("usr/lib/os-release"), b"NAME=Huge\n");
        let t = std::time::Instant::now();
        assert_eq!(detect(root), None);
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        // A small regular file behind them is read.
        std::fs::remove_file(root.join("usr/lib/os-release")).expect("rm");
        std::fs::write(root.join("usr/lib/os-release"), "NAME=Small\n").expect("write");
        assert_eq!(detect(root).expect("found").name, "Small");
    }

    #[test]
    fn a_20_gb_software_hive_is_read_only_where_its_cells_lie() {
        let mut h = HiveBuilder::new();
        let vals = vec![h.value_sz("ProductName", "Windows 10 Pro")];
        let cv = h.key("CurrentVersion", &[], &vals);
        let nt = h.key("Windows NT", &[cv], &[]);
        let ms = h.key("Microsoft", &[nt], &[]);
        let root_key = h.key("ROOT", &[ms], &[]);
        let hive = h.finish(root_key);
        let d = tempfile::tempdir().expect("tmp");
        let cfg = d.path().join("Windows/System32/config");
        std::fs::create_dir_all(&cfg).expect("mkdir");
        sparse(&cfg.join("SOFTWARE"), &hive);
        let t = std::time::Instant::now();
        let os = detect(d.path()).expect("windows found");
        assert_eq!(os.name, "Windows 10 Pro");
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        // A hive symlinked elsewhere is not followed.
        std::fs::remove_file(cfg.join("SOFTWARE")).expect("rm");
        let outside = tempfile::NamedTempFile::new().expect("outside");
        std::fs::write(outside.path(), &hive).expect("write");
        std::os::unix::fs::symlink(outside.path(), cfg.join("SOFTWARE")).expect("symlink");
        assert_eq!(detect(d.path()), None);
    }

    #[test]
    fn a_cell_claiming_two_gib_is_refused_before_it_is_read() {
        let mut file = vec![0u8; 4096 + 64];
        file[..4].copy_from_slice(b"regf");
        // Root key cell at offset 0 of the first bin, size -2^31.
        file[4096..4100].copy_from_slice(&i32::MIN.to_le_bytes());
        let src: &[u8] = &file;
        let hive = regf::Hive::new(&src).expect("header");
        assert_eq!(
            hive.find(&["Microsoft"]),
            Err(regf::RegError::Malformed("cell larger than 1 MiB"))
        );
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_partition() {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path();
        std::fs::create_dir_all(root.join("etc")).expect("etc");
        std::fs::create_dir_all(root.join("usr/lib")).expect("usr/lib");
        std::fs::write(
            root.join("usr/lib/os-release"),
            "NAME=Debian GNU/Linux\nVERSION_ID=\"12\"\n",
        )
        .expect("write");
        std::os::unix::fs::symlink("/usr/lib/os-release", root.join("etc/os-release"))
            .expect("symlink");
        let os = detect(root).expect("found");
        assert_eq!(os.family, "linux");
        assert_eq!(os.name, "Debian GNU/Linux");
        assert_eq!(os.version.as_deref(), Some("12"));
        std::os::unix::fs::symlink("../../../../etc/passwd", root.join("usr/lib/escape"))
            .expect("symlink");
        assert_eq!(resolve_inside(root, "usr/lib/escape"), None);
    }
}

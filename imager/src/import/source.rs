//! What an import source is: a partclone image file (maybe split, maybe an
//! OpenGnsys `.img` with its sum files), a Clonezilla image directory or a
//! FOG image directory.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::files::split_parts;
use super::ImportError;

/// The tool whose layout a source follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    /// A bare partclone image (file, URL or standard input).
    Partclone,
    /// An OpenGnsys `.img` (partclone + lzop) with `.img.sum` /
    /// `.img.full.sum`.
    OpenGnsys,
    /// A Clonezilla image directory.
    Clonezilla,
    /// A FOG image directory.
    Fog,
}

impl Tool {
    /// Lower-case name, as recorded in a manifest's origin.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Partclone => "partclone",
            Tool::OpenGnsys => "opengnsys",
            Tool::Clonezilla => "clonezilla",
            Tool::Fog => "fog",
        }
    }
}

/// OpenGnsys checksum sidecars of an `.img`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sums {
    /// `.img.full.sum`: MD5 of the whole file.
    pub full: Option<String>,
    /// `.img.sum`: MD5 of the file's last MiB.
    pub tail: Option<String>,
}

/// One partclone stream of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartStream {
    /// Device name in the source (`sda1`, `d1p2`); empty for a bare image.
    pub dev: String,
    /// Partition number, when the layout tells it.
    pub number: Option<u32>,
    /// The files, in stream order (split parts).
    pub files: Vec<PathBuf>,
}

/// The partition table and boot areas a disk layout saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFiles {
    /// Bytes from the start of the disk (MBR, boot loader gap, primary GPT).
    pub head: Vec<u8>,
    /// Bytes at the end of the disk (GPT backup entries and header).
    pub tail: Vec<u8>,
    /// The files these came from.
    pub files: Vec<PathBuf>,
}

/// A recognised import source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Layout.
    pub tool: Tool,
    /// As given.
    pub path: PathBuf,
    /// The partclone streams, in partition order.
    pub parts: Vec<PartStream>,
    /// For a whole-disk layout (Clonezilla savedisk, FOG with `d1.mbr`).
    pub disk: Option<DiskFiles>,
    /// OpenGnsys sums.
    pub sums: Sums,
    /// Things noticed and left out (swap partitions, …).
    pub notes: Vec<String>,
}

fn read_small(p: &Path, max: u64) -> Result<Vec<u8>, ImportError> {
    let f = std::fs::File::open(p).map_err(|e| ImportError::io(p, e))?;
    let mut v = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut v)
        .map_err(|e| ImportError::io(p, e))?;
    if v.len() as u64 > max {
        return Err(ImportError::Invalid(format!(
            "{} is larger than the {max} bytes such a file may have",
            p.display()
        )));
    }
    Ok(v)
}

fn read_sum(p: &Path) -> Result<Option<String>, ImportError> {
    if !p.is_file() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&read_small(p, 4096)?).into_owned();
    let word = text
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if word.len() != 32 || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ImportError::Invalid(format!(
            "{} holds no MD5 sum ({:?})",
            p.display(),
            text.chars().take(40).collect::<String>()
        )));
    }
    Ok(Some(word))
}

fn list_dir(dir: &Path) -> Result<Vec<String>, ImportError> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| ImportError::io(dir, e))? {
        let e = e.map_err(|e| ImportError::io(dir, e))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The trailing number of a device name: `sda1` → 1, `nvme0n1p2` → 2.
fn trailing_number(dev: &str) -> Option<u32> {
    let digits: String = dev
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().ok()
}

/// The disk a partition device belongs to: `sda1` → `sda`,
/// `nvme0n1p2` → `nvme0n1`.
fn disk_of(dev: &str) -> String {
    let t = dev.trim_end_matches(|c: char| c.is_ascii_digit());
    match t.strip_suffix('p') {
        Some(d) if d.ends_with(|c: char| c.is_ascii_digit()) => d.to_string(),
        _ => t.to_string(),
    }
}

/// True when `dir` is a Clonezilla image directory.
pub fn is_clonezilla(dir: &Path) -> bool {
    (dir.join("parts").is_file() || dir.join("disk").is_file())
        && list_dir(dir)
            .map(|n| {
                n.iter()
                    .any(|f| f.contains("-ptcl-img") || f == "clonezilla-img")
            })
            .unwrap_or(false)
}

/// True when `dir` is a FOG image directory.
pub fn is_fog(dir: &Path) -> bool {
    list_dir(dir)
        .map(|n| {
            n.iter()
                .any(|f| f == "d1.partitions" || f.starts_with("d1p") && f.contains(".img"))
        })
        .unwrap_or(false)
}

/// Recognise `path`: a directory (Clonezilla, FOG) or a partclone file.
pub fn detect(path: &Path) -> Result<Source, ImportError> {
    if path.is_dir() {
        if is_clonezilla(path) {
            return clonezilla(path);
        }
        if is_fog(path) {
            return fog(path);
        }
        return Err(ImportError::Invalid(format!(
            "{} is neither a Clonezilla image directory (no `parts`/`disk` file with *-ptcl-img* files) nor a FOG image directory (no d1.partitions or d1pN.img)",
            path.display()
        )));
    }
    let files = split_parts(path)?;
    let name = path.to_string_lossy();
    let mut sums = Sums::default();
    let mut tool = Tool::Partclone;
    if name.ends_with(".img") {
        sums.full = read_sum(Path::new(&format!("{name}.full.sum")))?;
        sums.tail = read_sum(Path::new(&format!("{name}.sum")))?;
        if sums.full.is_some() || sums.tail.is_some() {
            tool = Tool::OpenGnsys;
        }
    }
    Ok(Source {
        tool,
        path: path.to_path_buf(),
        parts: vec![PartStream {
            dev: String::new(),
            number: None,
            files,
        }],
        disk: None,
        sums,
        notes: vec![],
    })
}

/// The partclone stream of `dev` in a directory's file names: files
/// `<dev>.<anything>` that are partclone images (`-ptcl-img`, or FOG's
/// `.img`), possibly split.
fn stream_of(
    dir: &Path,
    names: &[String],
    dev: &str,
    fog: bool,
) -> Result<Option<Vec<PathBuf>>, ImportError> {
    let prefix = format!("{dev}.");
    // What follows the partclone marker: `.gz` or `.gz.aa` (Clonezilla),
    // nothing or `.000` (FOG). A split set is named by its first part.
    let marker = if fog { "img" } else { "-ptcl-img" };
    let starts: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with(&prefix))
        .filter(|n| {
            let rest = &n[prefix.len()..];
            let Some(at) = rest.find(marker) else {
                return false;
            };
            if fog && at != 0 {
                return false;
            }
            let after = &rest[at + marker.len()..];
            let comps: Vec<&str> = after.split('.').skip(1).collect();
            let split_first = |s: &str| {
                s.len() >= 2 && (s.bytes().all(|b| b == b'a') || s.bytes().all(|b| b == b'0'))
            };
            match (fog, comps.as_slice()) {
                (true, []) => after.is_empty(),
                (true, [s]) => split_first(s),
                (false, [_comp]) => true,
                (false, [_comp, s]) => split_first(s),
                _ => false,
            }
        })
        .collect();
    match starts.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(split_parts(&dir.join(one))?)),
        many => Err(ImportError::Invalid(format!(
            "{}: several images for {dev}: {}",
            dir.display(),
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn clonezilla(dir: &Path) -> Result<Source, ImportError> {
    let names = list_dir(dir)?;
    let parts_text = if dir.join("parts").is_file() {
        String::from_utf8_lossy(&read_small(&dir.join("parts"), 64 << 10)?).into_owned()
    } else {
        String::new()
    };
    let disk_text = if dir.join("disk").is_file() {
        String::from_utf8_lossy(&read_small(&dir.join("disk"), 64 << 10)?).into_owned()
    } else {
        String::new()
    };
    let disks: Vec<&str> = disk_text.split_whitespace().collect();
    if disks.len() > 1 {
        return Err(ImportError::Invalid(format!(
            "{} holds {} disks ({}); import supports one disk per image",
            dir.display(),
            disks.len(),
            disks.join(", ")
        )));
    }
    let mut devs: Vec<String> = parts_text.split_whitespace().map(String::from).collect();
    if devs.is_empty() {
        // Older savedisk images list partitions only through their files.
        if let Some(d) = disks.first() {
            for n in &names {
                if let Some((dev, _)) = n.split_once('.') {
                    if n.contains("-ptcl-img")
                        && disk_of(dev) == *d
                        && !devs.iter().any(|x| x == dev)
                    {
                        devs.push(dev.to_string());
                    }
                }
            }
        }
    }
    let mut parts = Vec::new();
    let mut notes = Vec::new();
    for dev in &devs {
        if dev.contains('/') || dev.contains("..") {
            return Err(ImportError::Invalid(format!(
                "{}: bad device name {dev:?} in `parts`",
                dir.display()
            )));
        }
        match stream_of(dir, &names, dev, false)? {
            Some(files) => parts.push(PartStream {
                dev: dev.clone(),
                number: trailing_number(dev),
                files,
            }),
            None if names.iter().any(|n| n == &format!("swappt-{dev}.info")) => {
                notes.push(format!(
                    "{dev}: swap partition, not imaged (re-created empty)"
                ));
            }
            None if names
                .iter()
                .any(|n| n.starts_with(&format!("{dev}.")) && n.contains("-img")) =>
            {
                return Err(ImportError::Invalid(format!(
                    "{}: {dev} was saved with a tool other than partclone (partimage, ntfsclone or dd); only partclone images can be imported",
                    dir.display()
                )));
            }
            None => {
                return Err(ImportError::Invalid(format!(
                    "{}: no image file for {dev} (expected {dev}.<fs>-ptcl-img.<compression>)",
                    dir.display()
                )))
            }
        }
    }
    if parts.is_empty() {
        return Err(ImportError::Invalid(format!(
            "{}: no partclone image files",
            dir.display()
        )));
    }
    let disk = match disks.first() {
        Some(d) => Some(clonezilla_disk(dir, d)?),
        None => None,
    };
    Ok(Source {
        tool: Tool::Clonezilla,
        path: dir.to_path_buf(),
        parts,
        disk,
        sums: Sums::default(),
        notes,
    })
}

/// Boot areas of a savedisk: `<d>-gpt-1st`/`<d>-gpt-2nd` for GPT, or
/// `<d>-mbr` and `<d>-hidden-data-after-mbr` for MBR.
fn clonezilla_disk(dir: &Path, d: &str) -> Result<DiskFiles, ImportError> {
    const MAX: u64 = 64 << 20;
    let g1 = dir.join(format!("{d}-gpt-1st"));
    let g2 = dir.join(format!("{d}-gpt-2nd"));
    let mbr = dir.join(format!("{d}-mbr"));
    let hidden = dir.join(format!("{d}-hidden-data-after-mbr"));
    let mut files = Vec::new();
    let mut head;
    let mut tail = Vec::new();
    if g1.is_file() && g2.is_file() {
        head = read_small(&g1, MAX)?;
        tail = read_small(&g2, MAX)?;
        files.push(g1);
        files.push(g2);
        // The MBR file carries the boot code (the protective MBR of
        // gpt-1st has it too); the gap after the GPT may hold more.
        if hidden.is_file() {
            let h = read_small(&hidden, MAX)?;
            if head.len() < 512 + h.len() {
                head.resize(512 + h.len(), 0);
            }
            // The hidden data starts right after the MBR, but the primary
            // GPT lives there: keep the GPT's bytes.
            let gpt_len = read_small(&files[0], MAX)?.len();
            for (i, b) in h.iter().enumerate() {
                if 512 + i >= gpt_len {
                    head[512 + i] = *b;
                }
            }
            files.push(hidden);
        }
    } else if mbr.is_file() {
        head = read_small(&mbr, 512)?;
        files.push(mbr);
        if hidden.is_file() {
            head.resize(512, 0);
            head.extend(read_small(&hidden, MAX)?);
            files.push(hidden);
        }
    } else {
        return Err(ImportError::Invalid(format!(
            "{}: a savedisk image without {d}-mbr or {d}-gpt-1st/{d}-gpt-2nd",
            dir.display()
        )));
    }
    Ok(DiskFiles { head, tail, files })
}

fn fog(dir: &Path) -> Result<Source, ImportError> {
    let names = list_dir(dir)?;
    let mut nums: Vec<u32> = names
        .iter()
        .filter_map(|n| n.strip_prefix("d1p"))
        .filter_map(|r| r.split_once('.'))
        .filter(|(_, rest)| rest.starts_with("img"))
        .filter_map(|(n, _)| n.parse().ok())
        .collect();
    nums.sort_unstable();
    nums.dedup();
    let mut parts = Vec::new();
    for n in nums {
        let dev = format!("d1p{n}");
        if let Some(files) = stream_of(dir, &names, &dev, true)? {
            parts.push(PartStream {
                dev,
                number: Some(n),
                files,
            });
        }
    }
    if parts.is_empty() {
        return Err(ImportError::Invalid(format!(
            "{}: no d1pN.img files",
            dir.display()
        )));
    }
    let mut notes = Vec::new();
    if names.iter().any(|n| n.ends_with(".lvm")) {
        return Err(ImportError::Invalid(format!(
            "{}: LVM images (d1pN.lvm) are not supported",
            dir.display()
        )));
    }
    if dir.join("d1.fixed_size_partitions").is_file() {
        notes.push("d1.fixed_size_partitions: partition sizes are kept as captured".into());
    }
    let disk = if dir.join("d1.mbr").is_file() {
        let p = dir.join("d1.mbr");
        let head = read_small(&p, 64 << 20)?;
        let (head, tail) = super::disk::from_sgdisk_backup(&head).unwrap_or((head, Vec::new()));
        Some(DiskFiles {
            head,
            tail,
            files: vec![p],
        })
    } else {
        None
    };
    Ok(Source {
        tool: Tool::Fog,
        path: dir.to_path_buf(),
        parts,
        disk,
        sums: Sums::default(),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_split_into_disk_and_number() {
        assert_eq!(trailing_number("sda1"), Some(1));
        assert_eq!(trailing_number("nvme0n1p12"), Some(12));
        assert_eq!(disk_of("sda1"), "sda");
        assert_eq!(disk_of("nvme0n1p2"), "nvme0n1");
        assert_eq!(disk_of("mmcblk0p1"), "mmcblk0");
    }

    #[test]
    fn clonezilla_part_files_are_found_with_their_split_parts() {
        let d = tempfile::tempdir().expect("tmp");
        for f in [
            "parts",
            "clonezilla-img",
            "sda1.ext4-ptcl-img.gz.aa",
            "sda1.ext4-ptcl-img.gz.ab",
            "sda2.ntfs-ptcl-img.zst",
            "swappt-sda3.info",
        ] {
            std::fs::write(d.path().join(f), "x").expect("w");
        }
        std::fs::write(d.path().join("parts"), "sda1 sda2 sda3\n").expect("w");
        let s = detect(d.path()).expect("detect");
        assert_eq!(s.tool, Tool::Clonezilla);
        assert_eq!(s.parts.len(), 2);
        assert_eq!(s.parts[0].files.len(), 2);
        assert_eq!(s.parts[1].number, Some(2));
        assert_eq!(s.notes.len(), 1);
        assert!(s.disk.is_none());
        std::fs::write(d.path().join("parts"), "sda1 sda4\n").expect("w");
        let e = detect(d.path()).expect_err("sda4 has no file");
        assert!(e.to_string().contains("sda4"), "{e}");
    }
}

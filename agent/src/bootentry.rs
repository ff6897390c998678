//! UEFI boot entries after a restore.
//!
//! A restore gives the disk's EFI system partition (ESP) new contents, and a
//! whole-disk restore also the image's partition GUIDs: the machine's own
//! `Boot####` entries then point to a partition that no longer exists, and
//! some firmware skips the disk altogether. After a restore on a machine
//! booted by UEFI this module
//!
//! 1. finds the ESP(s) of the restored disk (GPT type
//!    `C12A7328-F81F-11D2-BA4B-00A0C93EC93B`) and the first OS loader on
//!    them ([`LOADERS`]: Windows Boot Manager, shim, GRUB, else the
//!    removable-media path), read from the FAT without mounting it;
//! 2. writes an active entry `HD(n,GPT,<guid>,start,size)/File(<loader>)`
//!    through efivarfs, reusing the number of an entry it replaces (or of
//!    an identical one: then nothing is written);
//! 3. removes the stale entries it replaced: entries whose partition GUID
//!    is on no disk of the machine any more and which named the same loader
//!    or the same partition slot;
//! 4. puts the entry into `BootOrder` right after the leading network
//!    entries (so network boot stays first and Aula keeps control) and
//!    drops the removed ones.
//!
//! efivarfs marks most variables immutable (`FS_IMMUTABLE_FL`); the flag is
//! cleared (through [`aula_imager::inode_flags`]) before a variable is replaced
//! or removed. A variable is replaced as efibootmgr does it: removed, then
//! created with one `write` of its attributes and data.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aula_imager::device::{Device, OpenMode, Region};
use aula_imager::disk::{DiskInfo, InspectOptions};
use aula_imager::table::TableKind;
use serde::Serialize;
use thiserror::Error;

use crate::nvram::{self, GptPartition, LoadOption, NvramError, EFI_GLOBAL_GUID};

/// Where the live system mounts efivarfs.
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// GPT type of an EFI system partition (lowercase).
pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";

/// OS loaders looked for on the ESP, in this order, with the description
/// of the entry written for each.
pub const LOADERS: &[(&str, &str)] = &[
    (
        "\\EFI\\Microsoft\\Boot\\bootmgfw.efi",
        "Windows Boot Manager",
    ),
    ("\\EFI\\debian\\shimx64.efi", "debian"),
    ("\\EFI\\ubuntu\\shimx64.efi", "ubuntu"),
    ("\\EFI\\fedora\\shimx64.efi", "fedora"),
    ("\\EFI\\debian\\grubx64.efi", "debian"),
    ("\\EFI\\ubuntu\\grubx64.efi", "ubuntu"),
    ("\\EFI\\BOOT\\BOOTX64.EFI", "UEFI OS"),
];

/// Why the boot entries could not be brought up to date.
#[derive(Debug, Error)]
pub enum BootEntryError {
    /// The restored disk's partition table could not be read.
    #[error("reading the partition table of {path}: {message}")]
    Inspect {
        /// The disk.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The ESP could not be read.
    #[error("reading the EFI system partition {number} of {path}: {message}")]
    Esp {
        /// The disk.
        path: PathBuf,
        /// ESP partition number.
        number: u32,
        /// What went wrong.
        message: String,
    },
    /// An efivarfs operation failed.
    #[error("{op} {path}: {source}")]
    Efivars {
        /// What was being done.
        op: &'static str,
        /// The variable's file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The entry could not be encoded.
    #[error(transparent)]
    Nvram(#[from] NvramError),
    /// Every `Boot####` number is taken.
    #[error("no free Boot#### number")]
    NoFreeNumber,
}

/// One entry this module wrote or removed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Change {
    /// `Boot0004`.
    pub entry: String,
    /// `written`, `unchanged` or `removed`.
    pub action: &'static str,
    /// The entry's description.
    pub description: String,
    /// Its loader path on the ESP, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loader: Option<String>,
    /// Its partition GUID, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_guid: Option<String>,
}

/// What [`update`] did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    /// `updated`, `unchanged`, or `skipped` (with `reason`).
    pub status: &'static str,
    /// Why nothing was done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The ESP's partition number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub esp: Option<u32>,
    /// The entry that boots the restored OS (`Boot0004`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// Entries written, left as they were, or removed.
    pub changes: Vec<Change>,
    /// `BootOrder` before (`Boot####` names).
    pub boot_order_before: Vec<String>,
    /// `BootOrder` after.
    pub boot_order: Vec<String>,
}

impl Report {
    fn skipped(reason: impl Into<String>) -> Report {
        Report {
            status: "skipped",
            reason: Some(reason.into()),
            esp: None,
            entry: None,
            changes: Vec::new(),
            boot_order_before: Vec::new(),
            boot_order: Vec::new(),
        }
    }
}

/// `Boot####` for entry number `n`.
pub fn boot_name(n: u16) -> String {
    format!("Boot{n:04X}")
}

/// The global variables of an efivarfs directory.
pub struct Efivars {
    dir: PathBuf,
}

impl Efivars {
    /// Variables under `dir` (normally [`EFIVARS`]).
    pub fn new(dir: impl Into<PathBuf>) -> Efivars {
        Efivars { dir: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-{EFI_GLOBAL_GUID}"))
    }

    fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BootEntryError + 'a {
        move |source| BootEntryError::Efivars {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A variable's data (without efivarfs' attribute prefix); `None` when
    /// it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, BootEntryError> {
        let p = self.path(name);
        match fs::read(&p) {
            Ok(v) if v.len() >= 4 => Ok(Some(v[4..].to_vec())),
            Ok(_) => Ok(Some(Vec::new())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::err("reading", &p)(e)),
        }
    }

    /// The numbers of every `Boot####` variable, ascending.
    pub fn boot_numbers(&self) -> Result<Vec<u16>, BootEntryError> {
        let suffix = format!("-{EFI_GLOBAL_GUID}");
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(Self::err("listing", &self.dir))? {
            let e = e.map_err(Self::err("listing", &self.dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(hex) = name
                .strip_suffix(&suffix)
                .and_then(|n| n.strip_prefix("Boot"))
            else {
                continue;
            };
            if hex.len() == 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                if let Ok(n) = u16::from_str_radix(hex, 16) {
                    out.push(n);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Clears `FS_IMMUTABLE_FL` on an existing variable (file systems
    /// without inode flags, as a test directory may be, have nothing to
    /// clear).
    fn make_mutable(&self, p: &Path) -> Result<(), BootEntryError> {
        let f = File::open(p).map_err(Self::err("opening", p))?;
        let flags = match aula_imager::inode_flags::file_flags(f.as_fd()) {
            Ok(v) => v,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(Self::err("reading the flags of", p)(e)),
        };
        if flags & aula_imager::inode_flags::FS_IMMUTABLE_FL != 0 {
            aula_imager::inode_flags::set_file_flags(
                f.as_fd(),
                flags & !aula_imager::inode_flags::FS_IMMUTABLE_FL,
            )
            .map_err(Self::err("clearing the immutable flag of", p))?;
        }
        Ok(())
    }

    /// Removes a variable (nothing when it does not exist).
    pub fn remove(&self, name: &str) -> Result<(), BootEntryError> {
        let p = self.path(name);
        if !p.exists() {
            return Ok(());
        }
        self.make_mutable(&p)?;
        fs::remove_file(&p).map_err(Self::err("removing", &p))
    }

    /// Writes a variable (non-volatile, boot and runtime access): removes
    /// it first, then creates it with a single write, as efivarfs needs.
    pub fn write(&self, name: &str, data: &[u8]) -> Result<(), BootEntryError> {
        self.remove(name)?;
        let p = self.path(name);
        let buf = nvram::efivarfs_file(data);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(Self::err("creating", &p))?;
        let n = f.write(&buf).map_err(Self::err("writing", &p))?;
        if n != buf.len() {
            return Err(Self::err("writing", &p)(io::Error::other(format!(
                "short write: {n} of {} bytes",
                buf.len()
            ))));
        }
        Ok(())
    }
}

/// The ESP partitions of a GPT disk, with the sector size the table uses.
fn esps(info: &DiskInfo) -> Vec<GptPartition> {
    let Some(t) = info.table.as_ref().filter(|t| t.kind == TableKind::Gpt) else {
        return Vec::new();
    };
    let ss = u64::from(t.sector_size.max(1));
    info.partitions
        .iter()
        .filter(|p| p.ptype.eq_ignore_ascii_case(ESP_TYPE))
        .filter_map(|p| {
            Some(GptPartition {
                number: p.number,
                start_lba: p.start / ss,
                size_lba: p.size / ss,
                guid: p.guid.as_ref()?.to_ascii_lowercase(),
            })
        })
        .collect()
}

/// The first of [`LOADERS`] on one of the disk's ESPs.
fn find_loader(
    disk: &Path,
    info: &DiskInfo,
) -> Result<Option<(GptPartition, &'static str, &'static str)>, BootEntryError> {
    let esps = esps(info);
    if esps.is_empty() {
        return Ok(None);
    }
    let dev =
        Arc::new(
            Device::open(disk, OpenMode::default()).map_err(|e| BootEntryError::Inspect {
                path: disk.to_path_buf(),
                message: e.to_string(),
            })?,
        );
    let ss = u64::from(info.table.as_ref().map_or(512, |t| t.sector_size.max(1)));
    for esp in esps {
        let bad = |message: String| BootEntryError::Esp {
            path: disk.to_path_buf(),
            number: esp.number,
            message,
        };
        let region = Region::new(dev.clone(), esp.start_lba * ss, esp.size_lba * ss)
            .map_err(|e| bad(e.to_string()))?;
        for (path, description) in LOADERS {
            match aula_imager::fs::fat_has_file(&region, path) {
                Ok(Some(true)) => return Ok(Some((esp, path, description))),
                Ok(Some(false)) => {}
                // Not FAT (not formatted yet, or another file system).
                Ok(None) => break,
                Err(e) => return Err(bad(crate::tls::error_chain(&e))),
            }
        }
    }
    Ok(None)
}

/// Whether an entry boots from the network (its device path has a MAC,
/// IPv4, IPv6 or URI node).
pub fn is_network(o: &LoadOption) -> bool {
    o.network
}

/// Brings the UEFI boot entries up to date after a restore on `disk`.
/// `efivars` is the efivarfs directory (no directory: the machine was not
/// booted by UEFI, and nothing is done); `present` holds the partition
/// GUIDs of the machine's other disks (lowercase), so that their entries
/// are never taken for stale.
pub fn update(
    efivars: &Path,
    disk: &Path,
    present: &HashSet<String>,
) -> Result<Report, BootEntryError> {
    if !efivars.is_dir() {
        return Ok(Report::skipped("not booted by UEFI (no efivarfs)"));
    }
    let info = aula_imager::disk::inspect(disk, &InspectOptions::default()).map_err(|e| {
        BootEntryError::Inspect {
            path: disk.to_path_buf(),
            message: crate::tls::error_chain(&e),
        }
    })?;
    let Some((esp, loader, description)) = find_loader(disk, &info)? else {
        return Ok(Report::skipped(
            "no EFI system partition with a known OS loader on the restored disk",
        ));
    };
    let mut present = present.clone();
    present.extend(
        info.partitions
            .iter()
            .filter_map(|p| p.guid.as_ref().map(|g| g.to_ascii_lowercase())),
    );
    let vars = Efivars::new(efivars);

    // Every readable entry; one that cannot be parsed is left alone.
    let mut entries: Vec<(u16, LoadOption)> = Vec::new();
    for n in vars.boot_numbers()? {
        if let Some(data) = vars.read(&boot_name(n))? {
            if let Ok(o) = nvram::parse_load_option(&data) {
                entries.push((n, o));
            }
        }
    }
    let same_file = |o: &LoadOption| {
        o.file
            .as_deref()
            .is_some_and(|f| f.eq_ignore_ascii_case(loader))
    };
    let identical = entries.iter().find(|(_, o)| {
        o.partition.as_ref() == Some(&esp)
            && same_file(o)
            && o.attributes & nvram::LOAD_OPTION_ACTIVE != 0
            && o.description == description
    });
    let stale: Vec<u16> = entries
        .iter()
        .filter(|(_, o)| {
            o.partition.as_ref().is_some_and(|p| {
                !present.contains(&p.guid)
                    && (same_file(o) || (p.number == esp.number && p.start_lba == esp.start_lba))
            })
        })
        .map(|(n, _)| *n)
        .collect();

    let mut changes = Vec::new();
    let number = match (identical, stale.first()) {
        (Some((n, _)), _) => {
            changes.push(Change {
                entry: boot_name(*n),
                action: "unchanged",
                description: description.to_owned(),
                loader: Some(loader.to_owned()),
                partition_guid: Some(esp.guid.clone()),
            });
            *n
        }
        (None, reuse) => {
            let n = match reuse {
                Some(n) => *n,
                None => {
                    let taken: HashSet<u16> = vars.boot_numbers()?.into_iter().collect();
                    (0..=u16::MAX)
                        .find(|n| !taken.contains(n))
                        .ok_or(BootEntryError::NoFreeNumber)?
                }
            };
            let data = nvram::load_option(description, &esp, loader)?;
            vars.write(&boot_name(n), &data)?;
            tracing::info!(entry = %boot_name(n), loader, esp = esp.number, guid = %esp.guid, "UEFI boot entry written");
            changes.push(Change {
                entry: boot_name(n),
                action: "written",
                description: description.to_owned(),
                loader: Some(loader.to_owned()),
                partition_guid: Some(esp.guid.clone()),
            });
            n
        }
    };
    let mut removed = Vec::new();
    for (n, o) in entries.iter().filter(|(n, _)| stale.contains(n)) {
        if *n == number {
            continue;
        }
        vars.remove(&boot_name(*n))?;
        tracing::info!(entry = %boot_name(*n), description = %o.description, "stale UEFI boot entry removed");
        removed.push(*n);
        changes.push(Change {
            entry: boot_name(*n),
            action: "removed",
            description: o.description.clone(),
            loader: o.file.clone(),
            partition_guid: o.partition.as_ref().map(|p| p.guid.clone()),
        });
    }
    let before = vars
        .read("BootOrder")?
        .map(|d| nvram::parse_boot_order(&d))
        .unwrap_or_default();
    let network: HashSet<u16> = entries
        .iter()
        .filter(|(_, o)| is_network(o))
        .map(|(n, _)| *n)
        .collect();
    let after = nvram::reorder(&before, number, &removed, |n| network.contains(&n));
    if after != before {
        vars.write("BootOrder", &nvram::boot_order_bytes(&after))?;
    }
    let written = changes.iter().any(|c| c.action != "unchanged") || after != before;
    let names = |v: &[u16]| v.iter().map(|n| boot_name(*n)).collect::<Vec<_>>();
    Ok(Report {
        status: if written { "updated" } else { "unchanged" },
        reason: None,
        esp: Some(esp.number),
        entry: Some(boot_name(number)),
        changes,
        boot_order_before: names(&before),
        boot_order: names(&after),
    })
}

//! Partition type dictionaries: GPT type GUIDs with their gdisk-style hex
//! codes, MBR type bytes, and the OpenGnsys mnemonics (`LINUX`, `NTFS`,
//! `EFI`, `CACHE`, …) that map onto both.
//!
//! The OpenGnsys mnemonics follow `ogTypeToId` / `ogIdToType` of the
//! OpenGnsys engine (`client/engine/Disk.lib`) and ogClient's
//! `parttypes.py`; where the two disagree the choice is noted on the entry.

use super::TableKind;

/// A GPT type known by its gdisk code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptType {
    /// gdisk/sgdisk hex code (`0x8300`).
    pub code: u16,
    /// Type GUID, upper case.
    pub guid: &'static str,
    /// Human-readable name.
    pub name: &'static str,
}

/// GPT types known by code. The GUIDs are those of the UEFI specification
/// and the Discoverable Partitions Specification, under the codes gdisk uses.
pub const GPT_TYPES: &[GptType] = &[
    GptType {
        code: 0x0700,
        guid: "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        name: "Microsoft basic data",
    },
    GptType {
        code: 0x0C01,
        guid: "E3C9E316-0B5C-4DB8-817D-F92DF00215AE",
        name: "Microsoft reserved",
    },
    GptType {
        code: 0x2700,
        guid: "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC",
        name: "Windows RE",
    },
    GptType {
        code: 0x4200,
        guid: "AF9B60A0-1431-4F62-BC68-3311714A69AD",
        name: "Windows LDM data",
    },
    GptType {
        code: 0x8200,
        guid: "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
        name: "Linux swap",
    },
    GptType {
        code: 0x8300,
        guid: "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        name: "Linux filesystem",
    },
    GptType {
        code: 0x8301,
        guid: "8DA63339-0007-60C0-C436-083AC8230908",
        name: "Linux reserved",
    },
    GptType {
        code: 0x8302,
        guid: "933AC7E1-2EB4-4F13-B844-0E14E2AEF915",
        name: "Linux /home",
    },
    GptType {
        code: 0x8304,
        guid: "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
        name: "Linux x86-64 root (/)",
    },
    GptType {
        code: 0x8E00,
        guid: "E6D6D379-F507-44C2-A23C-238F2A3DF928",
        name: "Linux LVM",
    },
    GptType {
        code: 0xA500,
        guid: "516E7CB4-6ECF-11D6-8FF8-00022D09712B",
        name: "FreeBSD disklabel",
    },
    GptType {
        code: 0xA503,
        guid: "516E7CB6-6ECF-11D6-8FF8-00022D09712B",
        name: "FreeBSD UFS",
    },
    GptType {
        code: 0xAB00,
        guid: "426F6F74-0000-11AA-AA11-00306543ECAC",
        name: "Recovery HD",
    },
    GptType {
        code: 0xAF00,
        guid: "48465300-0000-11AA-AA11-00306543ECAC",
        name: "Apple HFS/HFS+",
    },
    GptType {
        code: 0xEF00,
        guid: "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        name: "EFI system partition",
    },
    GptType {
        code: 0xEF01,
        guid: "024DEE41-33E7-11D3-9D69-0008C781F39F",
        name: "MBR partition scheme",
    },
    GptType {
        code: 0xEF02,
        guid: "21686148-6449-6E6F-744E-656564454649",
        name: "BIOS boot partition",
    },
    GptType {
        code: 0xFD00,
        guid: "A19D880F-05FC-4D3B-A006-743F0F84911E",
        name: "Linux RAID",
    },
];

/// The GPT type with this gdisk code.
pub fn gpt_by_code(code: u16) -> Option<&'static GptType> {
    GPT_TYPES.iter().find(|t| t.code == code)
}

/// The GPT type with this GUID (any case).
pub fn gpt_by_guid(guid: &str) -> Option<&'static GptType> {
    GPT_TYPES.iter().find(|t| t.guid.eq_ignore_ascii_case(guid))
}

/// True for the MBR type bytes of an extended (container) partition.
pub fn is_mbr_extended(code: u8) -> bool {
    matches!(code, 0x05 | 0x0f | 0x85)
}

/// Name of an MBR type byte, for display.
pub fn mbr_name(code: u8) -> Option<&'static str> {
    Some(match code {
        0x01 => "FAT12",
        0x04 | 0x06 | 0x0e => "FAT16",
        0x05 | 0x0f | 0x85 => "Extended",
        0x07 => "HPFS/NTFS/exFAT",
        0x0b | 0x0c => "FAT32",
        0x11 => "Hidden FAT12",
        0x16 | 0x1e => "Hidden FAT16",
        0x17 => "Hidden NTFS",
        0x1b | 0x1c => "Hidden FAT32",
        0x27 => "Windows RE",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xa5 => "FreeBSD",
        0xa6 => "OpenBSD",
        0xaf => "HFS/HFS+",
        0xca => "OpenGnsys cache",
        0xda => "Non-FS data",
        0xee => "GPT protective",
        0xef => "EFI (FAT-12/16/32)",
        0xfd => "Linux RAID",
        _ => return None,
    })
}

/// A partition type resolved for one table kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedType {
    /// The type as [`super::Partition::ptype`] holds it: `0x83` or a GUID.
    pub ptype: String,
    /// MBR extended container.
    pub extended: bool,
    /// The OpenGnsys CACHE partition.
    pub cache: bool,
}

/// `(mnemonic, MBR byte, GPT code)`. `None` means "not available on that
/// table type".
const MNEMONICS: &[(&str, Option<u8>, Option<u16>)] = &[
    ("LINUX", Some(0x83), Some(0x8300)),
    ("EXT2", Some(0x83), Some(0x8300)),
    ("EXT3", Some(0x83), Some(0x8300)),
    ("EXT4", Some(0x83), Some(0x8300)),
    ("XFS", Some(0x83), Some(0x8300)),
    ("BTRFS", Some(0x83), Some(0x8300)),
    ("NTFS", Some(0x07), Some(0x0700)),
    ("WINDOWS", Some(0x07), Some(0x0700)),
    ("EXFAT", Some(0x07), Some(0x0700)),
    ("FAT12", Some(0x01), Some(0x0700)),
    ("FAT16", Some(0x06), Some(0x0700)),
    ("FAT32", Some(0x0b), Some(0x0700)),
    ("HFAT12", Some(0x11), None),
    ("HFAT16", Some(0x16), None),
    ("HFAT32", Some(0x1b), None),
    ("HNTFS", Some(0x17), None),
    ("WIN-RECOV", Some(0x27), Some(0x2700)),
    ("HNTFS-WINRE", Some(0x27), Some(0x2700)),
    ("WIN-RESERV", None, Some(0x0C01)),
    ("LINUX-SWAP", Some(0x82), Some(0x8200)),
    ("SWAP", Some(0x82), Some(0x8200)),
    ("LINUX-LVM", Some(0x8e), Some(0x8E00)),
    ("LVM", Some(0x8e), Some(0x8E00)),
    ("LINUX-RAID", Some(0xfd), Some(0xFD00)),
    ("RAID", Some(0xfd), Some(0xFD00)),
    ("EFI", Some(0xef), Some(0xEF00)),
    ("ESP", Some(0xef), Some(0xEF00)),
    ("BIOS-BOOT", None, Some(0xEF02)),
    ("HFS", Some(0xaf), Some(0xAF00)),
    ("FREEBSD", Some(0xa5), Some(0xA500)),
    ("OPENBSD", Some(0xa6), None),
    // ogClient maps any GPT type it does not know (DATA included) to LINUX.
    ("DATA", Some(0xda), Some(0x8300)),
    // ogClient creates extended partitions as 0x0f (LBA).
    ("EXTENDED", Some(0x0f), None),
];

/// The MBR byte ↔ GPT code pairs used to accept a code written for the
/// other table type (`83` on GPT means 8300; `ef00` on MBR means `ef`).
const CROSS: &[(u8, u16)] = &[
    (0x83, 0x8300),
    (0x07, 0x0700),
    (0x0b, 0x0700),
    (0x0c, 0x0700),
    (0x82, 0x8200),
    (0xef, 0xEF00),
    (0x8e, 0x8E00),
    (0xfd, 0xFD00),
    (0x27, 0x2700),
    (0xaf, 0xAF00),
    (0xa5, 0xA500),
    (0xda, 0x8300),
];

fn mbr(code: u8) -> ResolvedType {
    ResolvedType {
        ptype: format!("0x{code:02x}"),
        extended: is_mbr_extended(code),
        cache: false,
    }
}

fn gpt(code: u16) -> Option<ResolvedType> {
    gpt_by_code(code).map(|t| ResolvedType {
        ptype: t.guid.to_string(),
        extended: false,
        cache: false,
    })
}

/// Resolve a partition type as a layout gives it, for a table kind:
///
/// * a mnemonic, any case: `LINUX`, `NTFS`, `EFI`, `CACHE`, `LINUX-SWAP`,
///   `DATA`, `EXTENDED`, `FAT32`, `WIN-RESERV`, … (the OpenGnsys set);
/// * MBR type bytes in hex, with or without `0x`: `83`, `7`, `0x0c`;
/// * gdisk codes: `8300`, `ef00`, `0700`;
/// * on GPT, a type GUID.
///
/// A code written for the other table type is accepted when it has an
/// obvious equivalent (`83` on GPT is `8300`, `ef00` on MBR is `ef`).
/// The CACHE partition is type `ca` on MBR and `8300` on GPT (gdisk cannot
/// make `CA00`; OpenGnsys names the GPT partition `CACHE` instead).
pub fn resolve(code: &str, kind: TableKind) -> Result<ResolvedType, String> {
    let c = code.trim();
    if c.is_empty() {
        return Err("empty partition type".into());
    }
    let upper = c.to_ascii_uppercase();
    if upper == "CACHE" || upper == "CA" || upper == "0XCA" || upper == "CA00" {
        let mut r = match kind {
            TableKind::Mbr => mbr(0xca),
            TableKind::Gpt => gpt(0x8300).ok_or("internal: no 8300 type")?,
        };
        r.cache = true;
        return Ok(r);
    }
    if upper == "EMPTY" {
        return Err("EMPTY is not a partition type (leave the partition out)".into());
    }
    if let Some((_, m, g)) = MNEMONICS.iter().find(|(n, _, _)| *n == upper) {
        return match kind {
            TableKind::Mbr => m
                .map(mbr)
                .ok_or_else(|| format!("type {c} does not exist on MBR disks")),
            TableKind::Gpt => match g {
                Some(code) => {
                    gpt(*code).ok_or_else(|| format!("internal: unknown GPT code {code:04X}"))
                }
                None if upper == "EXTENDED" => {
                    Err("extended partitions exist only on MBR disks".into())
                }
                None => Err(format!("type {c} does not exist on GPT disks")),
            },
        };
    }
    if kind == TableKind::Gpt && c.len() == 36 {
        return match super::gpt::parse_guid(c) {
            Some(_) if c.chars().all(|ch| ch == '0' || ch == '-') => {
                Err("the all-zero GUID marks an unused entry".into())
            }
            Some(_) => Ok(ResolvedType {
                ptype: c.to_ascii_uppercase(),
                extended: false,
                cache: false,
            }),
            None => Err(format!("{c} is not a valid GUID")),
        };
    }
    let hex = upper.strip_prefix("0X").unwrap_or(&upper);
    if hex.is_empty() || hex.len() > 4 || !hex.chars().all(|ch| ch.is_ascii_hexdigit()) {
        return Err(format!("unknown partition type {c:?}"));
    }
    let value =
        u16::from_str_radix(hex, 16).map_err(|_| format!("unknown partition type {c:?}"))?;
    let short = hex.len() <= 2;
    match (kind, short) {
        (TableKind::Mbr, true) => {
            let b = value as u8;
            match b {
                0 => Err("type 0 marks an unused entry".into()),
                0xee => Err("type ee is the GPT protective type".into()),
                _ => Ok(mbr(b)),
            }
        }
        (TableKind::Mbr, false) => CROSS
            .iter()
            .find(|(_, g)| *g == value)
            .map(|(m, _)| mbr(*m))
            .ok_or_else(|| format!("GPT code {hex} has no MBR equivalent")),
        (TableKind::Gpt, false) => gpt(value).ok_or_else(|| format!("unknown GPT type code {hex}")),
        (TableKind::Gpt, true) => CROSS
            .iter()
            .find(|(m, _)| u16::from(*m) == value)
            .and_then(|(_, g)| gpt(*g))
            .ok_or_else(|| format!("MBR type {hex} has no GPT equivalent")),
    }
}

/// The OpenGnsys-style code of a partition type as a table holds it: MBR
/// bytes in lower-case hex without leading zeros (`83`, `7`, `ca`), GPT
/// types as gdisk codes (`8300`, `EF00`). `None` for GPT GUIDs gdisk has no
/// code for here.
pub fn og_code(ptype: &str) -> Option<String> {
    if let Some(hex) = ptype.strip_prefix("0x") {
        let v = u8::from_str_radix(hex, 16).ok()?;
        return Some(format!("{v:x}"));
    }
    gpt_by_guid(ptype).map(|t| format!("{:04X}", t.code))
}

/// A display name for a partition type as a table holds it.
pub fn type_name(ptype: &str) -> Option<&'static str> {
    if let Some(hex) = ptype.strip_prefix("0x") {
        return mbr_name(u8::from_str_radix(hex, 16).ok()?);
    }
    gpt_by_guid(ptype).map(|t| t.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnemonics_and_codes_resolve_per_table_kind() {
        let r = resolve("linux", TableKind::Mbr).expect("linux mbr");
        assert_eq!(r.ptype, "0x83");
        let r = resolve("LINUX", TableKind::Gpt).expect("linux gpt");
        assert_eq!(r.ptype, "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert_eq!(resolve("7", TableKind::Mbr).expect("7").ptype, "0x07");
        assert_eq!(
            resolve("ef00", TableKind::Gpt).expect("ef00").ptype,
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        );
        assert_eq!(
            resolve("ef00", TableKind::Mbr).expect("ef00 mbr").ptype,
            "0xef"
        );
        assert_eq!(
            resolve("83", TableKind::Gpt).expect("83 gpt").ptype,
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        );
        let c = resolve("CACHE", TableKind::Mbr).expect("cache");
        assert!(c.cache);
        assert_eq!(c.ptype, "0xca");
        assert!(resolve("cache", TableKind::Gpt).expect("cache gpt").cache);
        assert!(resolve("EXTENDED", TableKind::Mbr).expect("ext").extended);
        assert!(resolve("5", TableKind::Mbr).expect("5").extended);
        assert!(resolve("EXTENDED", TableKind::Gpt).is_err());
        assert!(resolve("BOGUS", TableKind::Gpt).is_err());
        assert!(resolve("1234", TableKind::Gpt).is_err());
        assert!(resolve("0", TableKind::Mbr).is_err());
        assert!(resolve("EMPTY", TableKind::Mbr).is_err());
        assert!(resolve("WIN-RESERV", TableKind::Mbr).is_err());
        assert_eq!(og_code("0x07").as_deref(), Some("7"));
        assert_eq!(
            og_code("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").as_deref(),
            Some("EF00")
        );
    }
}

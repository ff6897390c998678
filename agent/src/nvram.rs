//! UEFI boot entries (`Boot####` variables): the `EFI_LOAD_OPTION` encoding
//! of an entry that boots a file on a GPT partition (UEFI 2.10 §3.1.3 and
//! §10.3.5.1), and its decoding, to find entries whose partition is gone.
//!
//! A load option is: attributes (u32), the length of the device path list
//! (u16), the description (UCS-2, NUL-terminated), the device path list,
//! optional data. The path written here is the short form firmware and
//! efibootmgr use for disks: `HD(n,GPT,<partition GUID>,start,size)` then
//! `File(\EFI\…)` then the end node. Through efivarfs, a variable's file
//! holds its attributes (u32) before its data.
//!
//! Pure functions only; reading and writing `/sys/firmware/efi/efivars`
//! is [`crate::bootentry`]'s.

use thiserror::Error;

/// The EFI global variable GUID, as efivarfs spells it in file names.
pub const EFI_GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// `LOAD_OPTION_ACTIVE`.
pub const LOAD_OPTION_ACTIVE: u32 = 0x0000_0001;
/// Non-volatile, boot-service and runtime access: the attributes of
/// `Boot####` and `BootOrder`.
pub const VAR_ATTRS: u32 = 0x0000_0007;

/// Why a load option cannot be encoded or decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NvramError {
    /// The GUID is not `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    #[error("not a GUID: {0:?}")]
    BadGuid(String),
    /// The loader path is not an absolute `\`-separated ESP path.
    #[error("loader path {0:?} must start with \\ and hold no NUL")]
    BadPath(String),
    /// The variable is too short or its lengths disagree.
    #[error("malformed load option: {0}")]
    Malformed(&'static str),
}

/// A partition on a GPT disk, as an `HD()` node names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    /// Partition number (1-based).
    pub number: u32,
    /// First LBA.
    pub start_lba: u64,
    /// Size in LBAs.
    pub size_lba: u64,
    /// Unique partition GUID (textual, lowercase).
    pub guid: String,
}

/// A decoded load option (the parts this module cares about).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOption {
    /// Attributes.
    pub attributes: u32,
    /// Description.
    pub description: String,
    /// The `HD()` node, when the path has one.
    pub partition: Option<GptPartition>,
    /// The `File()` node's path, when the path has one.
    pub file: Option<String>,
    /// The path boots from the network: it has a MAC, IPv4, IPv6 or URI
    /// messaging node.
    pub network: bool,
}

/// Parses a textual GUID into its on-disk (mixed-endian) 16 bytes.
pub fn guid_bytes(text: &str) -> Result<[u8; 16], NvramError> {
    let bad = || NvramError::BadGuid(text.to_owned());
    let parts: Vec<&str> = text.split('-').collect();
    if parts.len() != 5
        || [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .any(|(n, p)| p.len() != *n || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(bad());
    }
    let hex = parts.concat();
    let mut raw = [0u8; 16];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    // The first three fields are little-endian on disk.
    let mut out = raw;
    out[0..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    out[4..6].copy_from_slice(&[raw[5], raw[4]]);
    out[6..8].copy_from_slice(&[raw[7], raw[6]]);
    Ok(out)
}

/// The textual (lowercase) form of on-disk GUID bytes.
pub fn guid_text(b: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// The device path `HD(…)/File(path)/End`.
pub fn device_path(part: &GptPartition, path: &str) -> Result<Vec<u8>, NvramError> {
    if !path.starts_with('\\') || path.contains('\0') || path.contains('/') {
        return Err(NvramError::BadPath(path.to_owned()));
    }
    let mut dp = Vec::with_capacity(64 + 2 * path.len());
    // Hard drive media device path: type 4, subtype 1, length 42.
    dp.extend_from_slice(&[4, 1, 42, 0]);
    dp.extend_from_slice(&part.number.to_le_bytes());
    dp.extend_from_slice(&part.start_lba.to_le_bytes());
    dp.extend_from_slice(&part.size_lba.to_le_bytes());
    dp.extend_from_slice(&guid_bytes(&part.guid)?);
    dp.push(2); // partition format: GPT
    dp.push(2); // signature type: GUID
                // File path media device path: type 4, subtype 4.
    let name = ucs2(path);
    let len = u16::try_from(4 + name.len()).map_err(|_| NvramError::BadPath(path.to_owned()))?;
    dp.extend_from_slice(&[4, 4]);
    dp.extend_from_slice(&len.to_le_bytes());
    dp.extend_from_slice(&name);
    // End of the entire device path.
    dp.extend_from_slice(&[0x7f, 0xff, 4, 0]);
    Ok(dp)
}

/// The `EFI_LOAD_OPTION` of an active entry `description` booting `path`
/// on `part`.
pub fn load_option(
    description: &str,
    part: &GptPartition,
    path: &str,
) -> Result<Vec<u8>, NvramError> {
    let dp = device_path(part, path)?;
    let dp_len = u16::try_from(dp.len()).map_err(|_| NvramError::BadPath(path.to_owned()))?;
    let mut v = Vec::with_capacity(6 + 2 * description.len() + dp.len());
    v.extend_from_slice(&LOAD_OPTION_ACTIVE.to_le_bytes());
    v.extend_from_slice(&dp_len.to_le_bytes());
    v.extend_from_slice(&ucs2(description));
    v.extend_from_slice(&dp);
    Ok(v)
}

/// The contents of an efivarfs file for a variable holding `data`.
pub fn efivarfs_file(data: &[u8]) -> Vec<u8> {
    let mut v = VAR_ATTRS.to_le_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

/// Decodes a load option (the variable's data, without efivarfs'
/// attribute prefix).
pub fn parse_load_option(data: &[u8]) -> Result<LoadOption, NvramError> {
    if data.len() < 6 {
        return Err(NvramError::Malformed("shorter than its header"));
    }
    let attributes = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let dp_len = u16::from_le_bytes([data[4], data[5]]) as usize;
    let mut units = Vec::new();
    let mut i = 6;
    loop {
        let pair = data
            .get(i..i + 2)
            .ok_or(NvramError::Malformed("description not terminated"))?;
        i += 2;
        let u = u16::from_le_bytes([pair[0], pair[1]]);
        if u == 0 {
            break;
        }
        units.push(u);
    }
    let description = String::from_utf16_lossy(&units);
    let dp = data.get(i..i + dp_len).ok_or(NvramError::Malformed(
        "device path longer than the variable",
    ))?;
    let (mut partition, mut file, mut network) = (None, None, false);
    let mut j = 0;
    while j + 4 <= dp.len() {
        let (ty, sub) = (dp[j], dp[j + 1]);
        let len = u16::from_le_bytes([dp[j + 2], dp[j + 3]]) as usize;
        if len < 4 || j + len > dp.len() {
            return Err(NvramError::Malformed("device path node length"));
        }
        let node = &dp[j..j + len];
        match (ty, sub) {
            (0x7f, 0xff) => break,
            // Messaging: MAC address, IPv4, IPv6, URI.
            (3, 11) | (3, 12) | (3, 13) | (3, 24) => network = true,
            (4, 1) if len == 42 && node[40] == 2 && node[41] == 2 => {
                let u32_at =
                    |o: usize| u32::from_le_bytes([node[o], node[o + 1], node[o + 2], node[o + 3]]);
                let u64_at = |o: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&node[o..o + 8]);
                    u64::from_le_bytes(b)
                };
                let mut g = [0u8; 16];
                g.copy_from_slice(&node[24..40]);
                partition = Some(GptPartition {
                    number: u32_at(4),
                    start_lba: u64_at(8),
                    size_lba: u64_at(16),
                    guid: guid_text(&g),
                });
            }
            (4, 4) => {
                let units: Vec<u16> = node[4..]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|u| *u != 0)
                    .collect();
                file = Some(String::from_utf16_lossy(&units));
            }
            _ => {}
        }
        j += len;
    }
    Ok(LoadOption {
        attributes,
        description,
        partition,
        file,
        network,
    })
}

/// `BootOrder` data from entry numbers.
pub fn boot_order_bytes(order: &[u16]) -> Vec<u8> {
    order.iter().flat_map(|n| n.to_le_bytes()).collect()
}

/// Entry numbers from `BootOrder` data.
pub fn parse_boot_order(data: &[u8]) -> Vec<u16> {
    data.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// The new `BootOrder`: `new` placed right after the leading run of
/// entries `is_network` says boot from the network (so network boot stays
/// first and Aula keeps control), `removed` dropped.
pub fn reorder(
    order: &[u16],
    new: u16,
    removed: &[u16],
    is_network: impl Fn(u16) -> bool,
) -> Vec<u16> {
    let kept: Vec<u16> = order
        .iter()
        .copied()
        .filter(|n| *n != new && !removed.contains(n))
        .collect();
    let lead = kept.iter().take_while(|n| is_network(**n)).count();
    let mut out = kept[..lead].to_vec();
    out.push(new);
    out.extend_from_slice(&kept[lead..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part() -> GptPartition {
        GptPartition {
            number: 1,
            start_lba: 2048,
            size_lba: 98304,
            guid: "41756c61-0000-4000-8000-000000000012".into(),
        }
    }

    /// The load option for that partition and `\EFI\BOOT\BOOTX64.EFI`,
    /// assembled by hand, field by field, from the UEFI specification
    /// (§3.1.3, §10.3.5.1, §10.3.5.4): attributes, path list length 0x5e,
    /// UCS-2 label, HD node of 42 bytes, File node of 0x30 bytes, end node.
    /// Not yet compared with bytes efibootmgr wrote (no efivarfs on the
    /// build host).
    const SPEC_BYTES: &str = "01000000\
        5e00\
        410075006c00610020007400650073007400 0000\
        04012a00 01000000 0008000000000000 0080010000000000\
        616c7541 0000 0040 8000 000000000012 02 02\
        04043000 5c004500460049005c0042004f004f0054005c0042004f004f0054005800360034002e00450046004900 0000\
        7fff0400";

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn load_option_matches_the_layout_of_the_uefi_specification() {
        let v = load_option("Aula test", &part(), "\\EFI\\BOOT\\BOOTX64.EFI").expect("encode");
        assert_eq!(v, unhex(SPEC_BYTES));
    }

    #[test]
    fn load_option_round_trips_through_the_parser() {
        let v = load_option(
            "Windows Boot Manager",
            &part(),
            "\\EFI\\Microsoft\\Boot\\bootmgfw.efi",
        )
        .expect("encode");
        let o = parse_load_option(&v).expect("parse");
        assert_eq!(o.attributes, LOAD_OPTION_ACTIVE);
        assert_eq!(o.description, "Windows Boot Manager");
        assert_eq!(o.partition, Some(part()));
        assert_eq!(
            o.file.as_deref(),
            Some("\\EFI\\Microsoft\\Boot\\bootmgfw.efi")
        );
    }

    #[test]
    fn guid_text_and_bytes_are_inverse_and_mixed_endian() {
        let b = guid_bytes("41756c61-0000-4000-8000-000000000012").expect("guid");
        assert_eq!(&b[..4], &[0x61, 0x6c, 0x75, 0x41]);
        assert_eq!(guid_text(&b), "41756c61-0000-4000-8000-000000000012");
        assert!(guid_bytes("41756c61-0000-4000-8000-00000000001").is_err());
        assert!(guid_bytes("g1756c61-0000-4000-8000-000000000012").is_err());
    }

    #[test]
    fn bad_paths_and_truncated_options_are_refused() {
        assert!(matches!(
            device_path(&part(), "EFI/BOOT/x.efi"),
            Err(NvramError::BadPath(_))
        ));
        let v = load_option("x", &part(), "\\a.efi").expect("encode");
        for cut in [0, 5, 8, v.len() - 1] {
            assert!(parse_load_option(&v[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn efivarfs_file_prefixes_the_attributes() {
        assert_eq!(efivarfs_file(&[1, 0]), vec![7, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn new_entry_goes_after_the_network_entries_and_stale_ones_leave() {
        let order = [0x0001, 0x0002, 0x0003, 0x0004];
        let net = |n: u16| n == 0x0001 || n == 0x0002;
        assert_eq!(reorder(&order, 0x0005, &[0x0003], net), vec![1, 2, 5, 4]);
        // No network entry: the new one goes first.
        assert_eq!(reorder(&order, 0x0005, &[], |_| false), vec![5, 1, 2, 3, 4]);
        // Rewriting an entry already in the order moves it, once.
        assert_eq!(reorder(&order, 0x0004, &[], net), vec![1, 2, 4, 3]);
        assert_eq!(
            parse_boot_order(&boot_order_bytes(&[1, 0x1234])),
            vec![1, 0x1234]
        );
    }
}

//! Firmware detection (option 93, 60, 77) and the choice of boot file.

use serde::Serialize;

use super::packet::{PxeBoot, Request};
use crate::config::ProgramsConfig;
use crate::mac::MacAddr;

/// The client's firmware, from option 93 (RFC 4578 and the IANA registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    /// x86 PC BIOS (0).
    Bios,
    /// 32-bit x86 UEFI (6).
    UefiIa32,
    /// x86-64 UEFI (7; 9 is EBC but x86-64 firmware sends it too).
    UefiX64,
    /// 64-bit ARM UEFI (11).
    UefiArm64,
    /// 32-bit x86 UEFI HTTP boot (15).
    HttpIa32,
    /// x86-64 UEFI HTTP boot (16).
    HttpX64,
    /// 64-bit ARM UEFI HTTP boot (19).
    HttpArm64,
    /// Anything else (the raw option 93 value).
    Other(u16),
}

impl Firmware {
    /// Maps an option 93 value.
    pub fn from_arch(arch: u16) -> Self {
        match arch {
            0 => Firmware::Bios,
            6 => Firmware::UefiIa32,
            7 | 9 => Firmware::UefiX64,
            11 => Firmware::UefiArm64,
            15 => Firmware::HttpIa32,
            16 => Firmware::HttpX64,
            19 => Firmware::HttpArm64,
            n => Firmware::Other(n),
        }
    }

    /// Whether this is a UEFI HTTP boot client.
    pub fn is_http_boot(self) -> bool {
        matches!(
            self,
            Firmware::HttpIa32 | Firmware::HttpX64 | Firmware::HttpArm64
        )
    }

    /// Whether this firmware is UEFI.
    pub fn is_uefi(self) -> bool {
        !matches!(self, Firmware::Bios | Firmware::Other(_))
    }

    /// The configured boot program for this firmware.
    pub fn program(self, p: &ProgramsConfig) -> Option<&str> {
        match self {
            Firmware::Bios => p.bios.as_deref(),
            Firmware::UefiX64 | Firmware::HttpX64 => p.uefi_x64.as_deref(),
            Firmware::UefiIa32 | Firmware::HttpIa32 => p.uefi_ia32.as_deref(),
            Firmware::UefiArm64 | Firmware::HttpArm64 => p.uefi_arm64.as_deref(),
            Firmware::Other(_) => None,
        }
    }
}

/// What kind of netboot client sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientKind {
    /// Firmware from option 93 (BIOS when absent but the client is iPXE / PXE).
    pub firmware: Firmware,
    /// The client is iPXE (user class `iPXE`).
    pub ipxe: bool,
    /// Option 60 starts with `HTTPClient` or option 93 says HTTP boot.
    pub http: bool,
}

/// Whether option 77 names iPXE: the raw string iPXE sends, or the RFC 3004
/// length-prefixed form.
pub fn is_ipxe_user_class(uc: &[u8]) -> bool {
    uc == b"iPXE" || uc == b"\x04iPXE"
}

/// Classifies a request; `None` for clients that are not network-booting.
pub fn classify(req: &Request<'_>) -> Option<ClientKind> {
    let vc = req.vendor_class.unwrap_or(&[]);
    let pxe_vc = vc.starts_with(b"PXEClient");
    let http_vc = vc.starts_with(b"HTTPClient");
    let ipxe = req.user_class.is_some_and(is_ipxe_user_class);
    if req.arch.is_none() && !pxe_vc && !http_vc && !ipxe {
        return None;
    }
    let firmware = req.arch.map(Firmware::from_arch).unwrap_or(Firmware::Bios);
    Some(ClientKind {
        firmware,
        ipxe,
        http: http_vc || firmware.is_http_boot(),
    })
}

/// Option 97 is echoed only when well formed (type 0 + 16-byte GUID).
fn machine_id(req: &Request<'_>) -> Option<Vec<u8>> {
    req.machine_id
        .filter(|id| id.len() == 17 && id[0] == 0)
        .map(<[u8]>::to_vec)
}

/// Decides the boot file for a netboot client.
///
/// * iPXE (user class `iPXE`) gets the HTTP URL of its per-MAC script, so it
///   never downloads iPXE again (no loop);
/// * UEFI HTTP boot clients get the HTTP URL of their boot program;
/// * PXE firmware gets its boot program's TFTP path;
/// * but an x86-64 UEFI client (PXE or HTTP boot) that is not iPXE gets
///   `shim` (the signed chain: shim → GRUB → kernel) instead of iPXE when
///   `shim` is given, i.e. when the machine's `secure_boot` is on.
///
/// `proxy` selects proxyDHCP behaviour for option 43: UEFI firmware gets no
/// discovery-control option there, since several implementations ignore a
/// proxy offer that tries to skip discovery and ask on port 4011 instead.
pub fn boot_for(
    req: &Request<'_>,
    kind: ClientKind,
    mac: MacAddr,
    programs: &ProgramsConfig,
    base_url: &str,
    proxy: bool,
    shim: Option<&str>,
) -> Option<PxeBoot> {
    let vendor_class = if kind.http { "HTTPClient" } else { "PXEClient" };
    let signed = shim
        .filter(|_| !kind.ipxe && matches!(kind.firmware, Firmware::UefiX64 | Firmware::HttpX64));
    let (file, discovery_control) = if kind.ipxe {
        (script_url(base_url, mac), false)
    } else if let Some(shim) = signed {
        if kind.http {
            (format!("{base_url}/boot/live/{shim}"), false)
        } else {
            (shim.to_owned(), !proxy)
        }
    } else if kind.http {
        let prog = kind.firmware.program(programs)?;
        (format!("{base_url}/boot/programs/{prog}"), false)
    } else {
        let prog = kind.firmware.program(programs)?;
        (prog.to_owned(), !(proxy && kind.firmware.is_uefi()))
    };
    Some(PxeBoot {
        file,
        vendor_class,
        discovery_control,
        machine_id: machine_id(req),
    })
}

/// URL of the per-MAC iPXE script.
pub fn script_url(base_url: &str, mac: MacAddr) -> String {
    format!("{base_url}/boot/ipxe/{}", mac.dashed())
}

/// URL of the per-MAC GRUB configuration of the signed chain.
pub fn grub_cfg_url(base_url: &str, mac: MacAddr) -> String {
    format!("{base_url}/boot/grub/{}", mac.dashed())
}

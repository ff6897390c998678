//! What the agent finds out about its machine: identity for registration
//! (MACs, addresses, host name, firmware) and the hardware inventory (CPU,
//! memory, DMI, firmware, disks, NICs). Everything is read from `/proc`,
//! `/sys` and a few syscalls: no external tools.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

fn read_trim(p: &Path) -> Option<String> {
    let s = fs::read_to_string(p).ok()?;
    let t = s.trim().trim_matches(char::from(0)).trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// One network interface.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Nic {
    /// Kernel name (`eth0`, `enp3s0`).
    pub name: String,
    /// MAC address, lower case with colons.
    pub mac: String,
    /// Link speed in Mb/s, when the driver knows it and the link is up.
    pub speed_mbps: Option<u64>,
    /// `up`, `down`, `unknown`, …
    pub operstate: String,
    /// MTU.
    pub mtu: Option<u64>,
    /// Kernel driver.
    pub driver: Option<String>,
    /// Addresses on it.
    pub ips: Vec<IpAddr>,
    /// Attached to hardware (not a bridge, veth, tunnel, …).
    pub physical: bool,
}

/// Interfaces other than loopback, sorted by name.
pub fn nics() -> Vec<Nic> {
    let addrs = addresses();
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let base = e.path();
        let Some(mac) = read_trim(&base.join("address")) else {
            continue;
        };
        // Type 1 = Ethernet; loopback is 772.
        if read_trim(&base.join("type")).as_deref() == Some("772") || name == "lo" {
            continue;
        }
        let physical = base.join("device").exists();
        let speed_mbps = read_trim(&base.join("speed"))
            .and_then(|s| s.parse::<i64>().ok())
            .filter(|s| *s > 0)
            .map(|s| s as u64);
        let driver = fs::read_link(base.join("device/driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        out.push(Nic {
            ips: addrs.get(&name).cloned().unwrap_or_default(),
            name,
            mac: mac.to_ascii_lowercase(),
            speed_mbps,
            operstate: read_trim(&base.join("operstate")).unwrap_or_else(|| "unknown".into()),
            mtu: read_trim(&base.join("mtu")).and_then(|s| s.parse().ok()),
            driver,
            physical,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// IP addresses by interface (no loopback, no IPv6 link-local).
pub fn addresses() -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ifa in list {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local_v6 = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if ip.is_loopback() || link_local_v6 {
            continue;
        }
        out.entry(ifa.interface_name).or_default().push(ip);
    }
    out
}

/// `uefi` when the kernel was started by UEFI firmware, else `bios`.
pub fn firmware() -> &'static str {
    if Path::new("/sys/firmware/efi").exists() {
        "uefi"
    } else {
        "bios"
    }
}

/// Secure Boot state from the EFI variable, when readable.
pub fn secure_boot() -> Option<bool> {
    let p = Path::new("/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c");
    // 4 bytes of attributes, then the value.
    let v = fs::read(p).ok()?;
    v.get(4).map(|b| *b == 1)
}

/// The kernel's host name.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .filter(|h| !h.is_empty())
}

/// Who this machine is, as registered with the server.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    /// Primary MAC.
    pub mac: Option<String>,
    /// Every MAC of a physical NIC (primary first).
    pub macs: Vec<String>,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Host name.
    pub hostname: Option<String>,
    /// `bios` or `uefi`.
    pub firmware: String,
}

impl Identity {
    /// Find out, with overrides from the configuration.
    pub fn discover(ov: &crate::config::IdentitySection) -> Identity {
        let nics = nics();
        let mut macs: Vec<String> = nics
            .iter()
            .filter(|n| n.physical)
            .map(|n| n.mac.clone())
            .collect();
        let primary = ov
            .mac
            .as_ref()
            .map(|m| m.to_ascii_lowercase())
            .or_else(|| {
                nics.iter()
                    .filter(|n| n.physical && !n.ips.is_empty())
                    .map(|n| n.mac.clone())
                    .next()
            })
            .or_else(|| macs.first().cloned());
        if let Some(p) = &primary {
            macs.retain(|m| m != p);
            macs.insert(0, p.clone());
        }
        let ips = if ov.ips.is_empty() {
            // Addresses of the primary interface first.
            let mut v: Vec<IpAddr> = Vec::new();
            let primary_nic = nics.iter().find(|n| Some(&n.mac) == primary.as_ref());
            if let Some(n) = primary_nic {
                v.extend(&n.ips);
            }
            for n in &nics {
                for ip in &n.ips {
                    if !v.contains(ip) {
                        v.push(*ip);
                    }
                }
            }
            v
        } else {
            ov.ips.clone()
        };
        Identity {
            mac: primary,
            macs,
            ips,
            hostname: ov.hostname.clone().or_else(hostname),
            firmware: firmware().to_string(),
        }
    }
}

/// CPU facts.
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    /// Model name.
    pub model: Option<String>,
    /// Vendor id.
    pub vendor: Option<String>,
    /// Logical processors.
    pub threads: usize,
    /// Physical cores (distinct package/core pairs), when known.
    pub cores: Option<usize>,
    /// Sockets, when known.
    pub sockets: Option<usize>,
    /// Current clock of the first processor, MHz.
    pub mhz: Option<f64>,
    /// Machine architecture (`x86_64`, `aarch64`).
    pub arch: String,
}

fn cpu() -> Cpu {
    let text = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut model = None;
    let mut vendor = None;
    let mut mhz = None;
    let mut threads = 0usize;
    let mut pairs = std::collections::BTreeSet::new();
    let mut sockets = std::collections::BTreeSet::new();
    let mut phys: Option<String> = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim().to_string());
        match k {
            "processor" => threads += 1,
            "model name" | "Processor" if model.is_none() => model = Some(v),
            "vendor_id" if vendor.is_none() => vendor = Some(v),
            "cpu MHz" if mhz.is_none() => mhz = v.parse().ok(),
            "physical id" => {
                sockets.insert(v.clone());
                phys = Some(v);
            }
            "core id" => {
                pairs.insert((phys.clone().unwrap_or_default(), v));
            }
            _ => {}
        }
    }
    if threads == 0 {
        threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
    }
    Cpu {
        model,
        vendor,
        threads,
        cores: (!pairs.is_empty()).then_some(pairs.len()),
        sockets: (!sockets.is_empty()).then_some(sockets.len()),
        mhz,
        arch: std::env::consts::ARCH.to_string(),
    }
}

/// Memory facts.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Usable RAM in bytes (`MemTotal`).
    pub total_bytes: u64,
    /// Available RAM in bytes (`MemAvailable`).
    pub available_bytes: Option<u64>,
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn memory() -> Memory {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Memory {
        total_bytes: meminfo_kib(&text, "MemTotal").unwrap_or(0) * 1024,
        available_bytes: meminfo_kib(&text, "MemAvailable").map(|k| k * 1024),
    }
}

/// DMI / SMBIOS identification (absent on machines without DMI).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dmi {
    /// System manufacturer.
    pub vendor: Option<String>,
    /// Product name.
    pub product: Option<String>,
    /// Product version.
    pub version: Option<String>,
    /// System serial number (root only).
    pub serial: Option<String>,
    /// System UUID (root only).
    pub uuid: Option<String>,
    /// Baseboard manufacturer.
    pub board_vendor: Option<String>,
    /// Baseboard name.
    pub board_name: Option<String>,
    /// Chassis type number (SMBIOS).
    pub chassis_type: Option<String>,
}

fn dmi() -> Dmi {
    let d = Path::new("/sys/class/dmi/id");
    let r = |f: &str| read_trim(&d.join(f));
    Dmi {
        vendor: r("sys_vendor"),
        product: r("product_name"),
        version: r("product_version"),
        serial: r("product_serial"),
        uuid: r("product_uuid"),
        board_vendor: r("board_vendor"),
        board_name: r("board_name"),
        chassis_type: r("chassis_type"),
    }
}

/// Firmware facts.
#[derive(Debug, Clone, Serialize)]
pub struct Firmware {
    /// `bios` or `uefi`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Firmware vendor (DMI).
    pub vendor: Option<String>,
    /// Firmware version (DMI).
    pub version: Option<String>,
    /// Firmware release date (DMI).
    pub date: Option<String>,
    /// Secure Boot enabled (UEFI only, when readable).
    pub secure_boot: Option<bool>,
    /// The kernel's lockdown mode (`none`, `integrity`, `confidentiality`;
    /// Debian's kernel chooses `integrity` when Secure Boot is on), when
    /// securityfs shows it.
    pub lockdown: Option<String>,
}

fn firmware_info() -> Firmware {
    let d = Path::new("/sys/class/dmi/id");
    Firmware {
        kind: firmware().into(),
        vendor: read_trim(&d.join("bios_vendor")),
        version: read_trim(&d.join("bios_version")),
        date: read_trim(&d.join("bios_date")),
        secure_boot: secure_boot(),
        lockdown: fs::read_to_string("/sys/kernel/security/lockdown")
            .ok()
            .and_then(|t| lockdown_mode(&t)),
    }
}

/// The selected mode of `/sys/kernel/security/lockdown`
/// (`none [integrity] confidentiality` → `integrity`).
pub fn lockdown_mode(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_owned()).filter(|m| !m.is_empty())
}

/// The hardware inventory (`InventarioHardware`, `GET /v1/inventory`).
#[derive(Debug, Clone, Serialize)]
pub struct Hardware {
    /// Host name.
    pub hostname: Option<String>,
    /// CPU.
    pub cpu: Cpu,
    /// Memory.
    pub memory: Memory,
    /// DMI identification.
    pub dmi: Dmi,
    /// Firmware.
    pub firmware: Firmware,
    /// Disks in `dsk` order (the configured mapping when there is one).
    pub disks: Vec<aula_imager::disk::DiskInfo>,
    /// Network interfaces.
    pub nics: Vec<Nic>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// Problems met while looking.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Collect the hardware inventory. Blocking (reads every disk's table).
pub fn hardware(disk_map: &BTreeMap<u32, PathBuf>) -> Hardware {
    let mut warnings = Vec::new();
    let disks = if disk_map.is_empty() {
        match aula_imager::disk::inventory(&aula_imager::disk::InventoryOptions::default()) {
            Ok(d) => d,
            Err(e) => {
                warnings.push(format!("disk inventory: {e}"));
                Vec::new()
            }
        }
    } else {
        let mut v = Vec::new();
        for (n, p) in disk_map {
            match aula_imager::disk::inspect(p, &aula_imager::disk::InspectOptions::default()) {
                Ok(mut d) => {
                    d.dsk = Some(*n);
                    v.push(d);
                }
                Err(e) => warnings.push(format!("disk {n} ({}): {e}", p.display())),
            }
        }
        v
    };
    Hardware {
        hostname: hostname(),
        cpu: cpu(),
        memory: memory(),
        dmi: dmi(),
        firmware: firmware_info(),
        disks,
        nics: nics(),
        kernel: read_trim(Path::new("/proc/sys/kernel/osrelease")),
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_values_are_read_in_kib() {
        let t = "MemTotal:       24683860 kB\nMemFree:  100 kB\nMemAvailable:   23716020 kB\n";
        assert_eq!(meminfo_kib(t, "MemTotal"), Some(24683860));
        assert_eq!(meminfo_kib(t, "MemAvailable"), Some(23716020));
        assert_eq!(meminfo_kib(t, "Mem"), None);
    }

    #[test]
    fn lockdown_mode_is_the_bracketed_word() {
        assert_eq!(
            lockdown_mode("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        assert_eq!(
            lockdown_mode("[none] integrity confidentiality").as_deref(),
            Some("none")
        );
        assert_eq!(lockdown_mode("none integrity"), None);
        assert_eq!(lockdown_mode("[]"), None);
    }
}

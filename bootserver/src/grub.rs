//! GRUB configurations of the Secure Boot chain (shim → GRUB → kernel).
//!
//! Debian's signed network GRUB (`grubnetx64.efi.signed`, served as
//! `grubx64.efi` beside shim) has the prefix `/grub` on the device it was
//! loaded from, (tftp,<server>), and an embedded configuration that runs
//! `source $prefix/x86_64-efi/grub.cfg` when that file exists and
//! `source $prefix/grub.cfg` otherwise. Under Secure Boot it loads no module
//! (`insmod` is refused), and Debian 12's image (GRUB 2.06) has `tftp`,
//! `efinet`, `linux`, `chain`, `search` built in but no `http`: everything
//! the chain needs after shim comes by TFTP from this server.
//!
//! | TFTP name | what |
//! |---|---|
//! | `grub/grub.cfg` | [`stage1`], the same for every machine: sources the machine's own |
//! | `grub/mac/<mac>.cfg` | [`machine`] for that MAC (`$net_default_mac`, lower-case with colons), the counterpart of the iPXE script: same boot modes, same kernel line, from the same registry state |
//! | `live/<kernel>`, `live/<initrd>` | the live kernel and initrd of `[boot]` |
//!
//! Any other name under `grub/` or `live/` is refused (see
//! [`crate::http::boot::SignedChainTftp`]). Over HTTP the machine's
//! configuration is also served as `/boot/grub/<mac>` (for a GRUB with
//! `http`; Debian 12's has none).

use crate::config::{BootMode, Config};
use crate::mac::MacAddr;

/// Name of the generated first configuration in the TFTP root.
pub const STAGE1_PATH: &str = "grub/grub.cfg";
/// TFTP directory of the per-MAC configurations.
pub const MAC_DIR: &str = "grub/mac";
/// TFTP directory of the live kernel and initrd.
pub const LIVE_DIR: &str = "live";
/// shim's name (TFTP, and under `/boot/live/` over HTTP).
pub const SHIM: &str = "shimx64.efi";
/// GRUB's name: the one shim loads from its own directory.
pub const GRUB: &str = "grubx64.efi";

/// Where the machine's configuration loads the kernel and initrd from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TFTP from the server GRUB itself came from (`($root)`).
    Tftp,
    /// HTTP from the plain HTTP listener (a GRUB with the `http` module).
    Http,
}

/// GRUB's `(http,…)` device for the plain HTTP listener (GRUB has no
/// HTTPS; the boot routes are plain HTTP). GRUB 2.06 takes no port in the
/// device name and connects to port 80; on another port the device names
/// it as `host:port`, which GRUB 2.12 and later understand.
pub fn http_device(cfg: &Config) -> String {
    let url = cfg.public_url();
    let hostport = url
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or(rest).to_owned());
    let hostport =
        hostport.unwrap_or_else(|| format!("{}:{}", cfg.server.address, cfg.http.bind.port()));
    let host = hostport.strip_suffix(":80").unwrap_or(&hostport);
    format!("(http,{host})")
}

/// The TFTP name of `mac`'s configuration, as [`stage1`] asks for it.
pub fn mac_cfg_path(mac: MacAddr) -> String {
    format!("{MAC_DIR}/{mac}.cfg")
}

/// The first configuration, the same for every machine: it sources the
/// machine's own one from the same TFTP server, named by the MAC GRUB
/// booted from (`$net_default_mac`).
pub fn stage1() -> String {
    format!(
        "# Aula: signed chain, first stage (the same for every machine).\n\
         set timeout=0\n\
         echo \"Aula: loading the boot configuration of ${{net_default_mac}}\"\n\
         source \"($root)/{MAC_DIR}/${{net_default_mac}}.cfg\"\n\
         echo \"Aula: no boot configuration from the server, retrying in 10 s\"\n\
         sleep 10\n\
         reboot\n"
    )
}

/// Quotes one word for GRUB's script parser (single quotes are literal;
/// a single quote itself is written `'\''`).
pub fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// Loader paths tried, in order, on the local disks in `local` mode.
pub const LOCAL_LOADERS: &[&str] = &[
    "/EFI/Microsoft/Boot/bootmgfw.efi",
    "/EFI/debian/shimx64.efi",
    "/EFI/ubuntu/shimx64.efi",
    "/EFI/BOOT/BOOTX64.EFI",
];

/// The machine's GRUB configuration for `mode`. `args` is the kernel
/// command line (without `initrd=`: GRUB loads the initrd itself),
/// `kernel` and `initrd` the file names under `live/` (TFTP) or
/// `/boot/live/` (HTTP).
pub fn machine(
    cfg: &Config,
    mac: MacAddr,
    mode: BootMode,
    kernel: &str,
    initrd: &str,
    args: &[String],
    transport: Transport,
) -> String {
    let base = match transport {
        Transport::Tftp => format!("($root)/{LIVE_DIR}"),
        Transport::Http => format!("{}/boot/live", http_device(cfg)),
    };
    match mode {
        BootMode::Live => {
            let line = args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ");
            format!(
                "# Aula: live boot for {mac} (signed chain)\n\
                 set timeout=0\n\
                 echo \"Aula: live boot for {mac}\"\n\
                 while true; do\n\
                 \x20 if linux {base}/{kernel} {line}; then\n\
                 \x20   if initrd {base}/{initrd}; then\n\
                 \x20     boot\n\
                 \x20   fi\n\
                 \x20 fi\n\
                 \x20 echo \"Aula: live boot failed, retrying in 10 s\"\n\
                 \x20 sleep 10\n\
                 done\n"
            )
        }
        BootMode::Local => {
            let loaders = LOCAL_LOADERS.join(" ");
            format!(
                "# Aula: local boot for {mac} (signed chain)\n\
                 set timeout=0\n\
                 echo \"Aula: booting the local disk of {mac}\"\n\
                 for f in {loaders}; do\n\
                 \x20 if search --no-floppy --file --set=aula_esp $f; then\n\
                 \x20   echo \"Aula: chainloading ($aula_esp)$f\"\n\
                 \x20   set root=$aula_esp\n\
                 \x20   chainloader $f\n\
                 \x20   boot\n\
                 \x20 fi\n\
                 done\n\
                 echo \"Aula: no boot loader found on the local disks; back to the firmware\"\n\
                 exit 1\n"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse("[server]\naddress = \"10.213.0.1\"\n[http]\nbind = \"0.0.0.0:8080\"\n")
            .expect("config")
    }

    fn mac() -> MacAddr {
        "52:54:00:E2:E0:03".parse().expect("mac")
    }

    #[test]
    fn stage1_sources_the_per_mac_config_by_tftp_from_the_same_server() {
        let s = stage1();
        assert!(
            s.contains("source \"($root)/grub/mac/${net_default_mac}.cfg\"\n"),
            "{s}"
        );
        // Nothing that needs a module Debian 12's signed GRUB lacks.
        assert!(!s.contains("(http"), "{s}");
        assert!(!s.contains("insmod"), "{s}");
    }

    #[test]
    fn mac_cfg_path_is_the_name_grub_asks_for_lower_case_with_colons() {
        // GRUB's $net_default_mac is lower-case with colons.
        assert_eq!(mac_cfg_path(mac()), "grub/mac/52:54:00:e2:e0:03.cfg");
        assert!(stage1()
            .replace("($root)/", "")
            .replace("${net_default_mac}", "52:54:00:e2:e0:03")
            .contains(&format!("\"{}\"", mac_cfg_path(mac()))));
    }

    #[test]
    fn port_80_is_left_out_of_the_http_device_for_grub_2_06() {
        let c =
            Config::parse("[server]\naddress = \"10.213.0.1\"\n[http]\nbind = \"0.0.0.0:80\"\n")
                .expect("config");
        assert_eq!(http_device(&c), "(http,10.213.0.1)");
        assert_eq!(http_device(&cfg()), "(http,10.213.0.1:8080)");
    }

    #[test]
    fn quote_keeps_grub_specials_literal() {
        assert_eq!(quote("a$b;c"), "'a$b;c'");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn live_config_over_tftp_loads_kernel_and_initrd_from_root_with_quoted_args() {
        let args = vec![
            "BOOTIF=01-52-54-00-e2-e0-03".to_owned(),
            "aula.server=https://10.213.0.1:8443".to_owned(),
            "aula.boot=n1".to_owned(),
        ];
        let s = machine(
            &cfg(),
            mac(),
            BootMode::Live,
            "vmlinuz",
            "initrd.img",
            &args,
            Transport::Tftp,
        );
        assert!(s.contains("linux ($root)/live/vmlinuz 'BOOTIF=01-52-54-00-e2-e0-03' 'aula.server=https://10.213.0.1:8443' 'aula.boot=n1'; then"), "{s}");
        assert!(s.contains("initrd ($root)/live/initrd.img; then"), "{s}");
        assert!(
            s.contains("echo \"Aula: live boot for 52:54:00:e2:e0:03\""),
            "{s}"
        );
        assert!(!s.contains("(http"), "{s}");
        assert!(!s.contains("exit"), "{s}");
        let h = machine(
            &cfg(),
            mac(),
            BootMode::Live,
            "vmlinuz",
            "initrd.img",
            &args,
            Transport::Http,
        );
        assert!(
            h.contains("linux (http,10.213.0.1:8080)/boot/live/vmlinuz 'BOOTIF="),
            "{h}"
        );
    }

    #[test]
    fn local_config_chainloads_a_loader_found_on_the_disk_then_exits() {
        let s = machine(
            &cfg(),
            mac(),
            BootMode::Local,
            "vmlinuz",
            "initrd.img",
            &[],
            Transport::Tftp,
        );
        assert!(s.contains("/EFI/Microsoft/Boot/bootmgfw.efi"), "{s}");
        // GRUB 2.06's chainloader hands the loader the device of $root,
        // not of the file: a shim loaded with the network's device looks
        // for its second stage on the network ("Failed to find fs").
        assert!(s.contains("set root=$aula_esp\n    chainloader $f"), "{s}");
        assert!(s.trim_end().ends_with("exit 1"), "{s}");
        assert!(!s.contains("linux "), "{s}");
    }
}

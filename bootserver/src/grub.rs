//! GRUB configurations of the Secure Boot chain (shim → GRUB → kernel).
//!
//! Debian's signed network GRUB (`grubnetx64.efi.signed`, served as
//! `grubx64.efi` beside shim) has the prefix `/grub` on the device it was
//! loaded from, (tftp,<server>), and an embedded configuration that runs
//! `source $prefix/x86_64-efi/grub.cfg` when that file exists and
//! `source $prefix/grub.cfg` otherwise. Neither name carries the machine, so
//! the TFTP service serves one generated `grub/grub.cfg` ([`stage1`]) that
//! loads the machine's own configuration from this server over HTTP:
//! `/boot/grub/<mac>?ip=…&mac=…` ([`machine`]), the counterpart of the iPXE
//! script, with the same boot modes and the same kernel command line.

use crate::config::{BootMode, Config};
use crate::mac::MacAddr;

/// Name of the generated first configuration in the TFTP root.
pub const STAGE1_PATH: &str = "grub/grub.cfg";
/// shim's name (TFTP, and under `/boot/live/` over HTTP).
pub const SHIM: &str = "shimx64.efi";
/// GRUB's name: the one shim loads from its own directory.
pub const GRUB: &str = "grubx64.efi";

/// GRUB's `(http,…)` device for the plain HTTP listener (GRUB has no
/// HTTPS; the boot routes are plain HTTP). Debian 12's GRUB (2.06) takes no
/// port in the device name and always connects to port 80: the signed
/// chain needs the HTTP listener (or `[http] public_url`) on port 80; on
/// another port the device names it as `host:port`, which only GRUB 2.12
/// and later understand (see [`http_port_ok`]).
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

/// Whether Debian 12's GRUB can reach the HTTP listener: port 80.
pub fn http_port_ok(cfg: &Config) -> bool {
    !http_device(cfg).contains(':')
}

/// The first configuration, the same for every machine: it fetches the
/// machine's own one over HTTP, naming the machine's MAC and address the way
/// the iPXE URL does (`ip=`, `mac=`), so the boot server can tell the
/// machine's own request from anyone else's.
pub fn stage1(cfg: &Config) -> String {
    let dev = http_device(cfg);
    format!(
        "# Aula: signed chain, first stage (the same for every machine).\n\
         set timeout=0\n\
         echo \"Aula: loading the boot configuration of ${{net_default_mac}}\"\n\
         configfile \"{dev}/boot/grub/${{net_default_mac}}?ip=${{net_default_ip}}&mac=${{net_default_mac}}\"\n\
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
/// `kernel` and `initrd` the file names under `/boot/live/`.
pub fn machine(
    cfg: &Config,
    mac: MacAddr,
    mode: BootMode,
    kernel: &str,
    initrd: &str,
    args: &[String],
) -> String {
    let dev = http_device(cfg);
    match mode {
        BootMode::Live => {
            let line = args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ");
            format!(
                "# Aula: live boot for {mac} (signed chain)\n\
                 set timeout=0\n\
                 echo \"Aula: live boot for {mac}\"\n\
                 while true; do\n\
                 \x20 if linux {dev}/boot/live/{kernel} {line}; then\n\
                 \x20   if initrd {dev}/boot/live/{initrd}; then\n\
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
                 \x20   chainloader ($aula_esp)$f\n\
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

    #[test]
    fn stage1_fetches_the_machine_config_over_plain_http_with_ip_and_mac() {
        let s = stage1(&cfg());
        assert!(
            s.contains("configfile \"(http,10.213.0.1:8080)/boot/grub/${net_default_mac}?ip=${net_default_ip}&mac=${net_default_mac}\""),
            "{s}"
        );
    }

    #[test]
    fn port_80_is_left_out_of_the_device_for_grub_2_06() {
        let c =
            Config::parse("[server]\naddress = \"10.213.0.1\"\n[http]\nbind = \"0.0.0.0:80\"\n")
                .expect("config");
        assert_eq!(http_device(&c), "(http,10.213.0.1)");
        assert!(http_port_ok(&c));
        assert!(!http_port_ok(&cfg()));
    }

    #[test]
    fn quote_keeps_grub_specials_literal() {
        assert_eq!(quote("a$b;c"), "'a$b;c'");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn live_config_loads_kernel_and_initrd_over_http_with_quoted_args() {
        let mac: MacAddr = "52:54:00:e2:e0:03".parse().expect("mac");
        let args = vec![
            "BOOTIF=01-52-54-00-e2-e0-03".to_owned(),
            "aula.boot=n1".to_owned(),
        ];
        let s = machine(&cfg(), mac, BootMode::Live, "vmlinuz", "initrd.img", &args);
        assert!(s.contains("linux (http,10.213.0.1:8080)/boot/live/vmlinuz 'BOOTIF=01-52-54-00-e2-e0-03' 'aula.boot=n1'; then"), "{s}");
        assert!(
            s.contains("initrd (http,10.213.0.1:8080)/boot/live/initrd.img; then"),
            "{s}"
        );
        assert!(!s.contains("exit"), "{s}");
    }

    #[test]
    fn local_config_chainloads_a_loader_found_on_the_disk_then_exits() {
        let mac: MacAddr = "52:54:00:e2:e0:03".parse().expect("mac");
        let s = machine(&cfg(), mac, BootMode::Local, "vmlinuz", "initrd.img", &[]);
        assert!(s.contains("/EFI/Microsoft/Boot/bootmgfw.efi"), "{s}");
        assert!(s.contains("chainloader ($aula_esp)$f"), "{s}");
        assert!(s.trim_end().ends_with("exit 1"), "{s}");
        assert!(!s.contains("linux "), "{s}");
    }
}

//! The command line: `--check-config`, clear errors for bad configurations,
//! the embedded default.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_aula-bootserver");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/aula-bootserver.example.toml");

fn check(config_text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("c.toml");
    std::fs::write(&p, config_text).expect("write");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&p)
        .arg("--check-config")
        .output()
        .expect("run");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_config_accepts_the_documented_example() {
    let out = Command::new(BIN)
        .args(["--config", EXAMPLE, "--check-config"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("config OK: server 10.213.0.1 dhcp=full tftp=true http=true ra=true"),
        "{text}"
    );
}

#[test]
fn the_embedded_default_is_the_documented_example() {
    let out = Command::new(BIN)
        .arg("--print-default-config")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(out.stdout, std::fs::read(EXAMPLE).expect("example"));
    let out = Command::new(BIN)
        .arg("--check-config")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "embedded default invalid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_configs_fail_the_check_with_the_offending_key_named() {
    let base = "[server]\naddress = \"10.213.0.1\"\n";
    let cases = [
        (format!("{base}[dhcp]\nmode = \"full\"\nlease_tme = 60\n"), "lease_tme"),
        (format!("{base}[dhcp]\nmode = \"relay\"\n"), "relay"),
        (
            format!("{base}[dhcp]\n[[dhcp.subnet]]\nnetwork = \"10.213.0.0/24\"\nrange = [\"10.213.0.10\", \"10.213.9.9\"]\n"),
            "dhcp.subnet[0].range",
        ),
        (format!("{base}[tftp]\nmax_blksize = 70000\n"), "max_blksize"),
        (format!("{base}[http]\napi_token = \"short\"\n"), "http.api_token"),
        (format!("{base}[ra]\nprefix = \"2001:db8::/64\"\n"), "ra.prefix"),
        ("[server]\naddress = \"not an ip\"\n".to_owned(), "address"),
        ("this is not toml".to_owned(), "parsing config"),
    ];
    for (text, needle) in cases {
        let (ok, out) = check(&text);
        assert!(!ok, "accepted:\n{text}");
        assert!(out.contains(needle), "error for {needle:?} unclear: {out}");
    }
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/aula.toml", "--check-config"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/aula.toml"));
}

#[test]
fn command_line_overrides_are_validated() {
    let out = Command::new(BIN)
        .args([
            "--config",
            EXAMPLE,
            "--check-config",
            "--address",
            "10.99.0.1",
        ])
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "server address outside every subnet accepted"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.address"));
    let out = Command::new(BIN)
        .args(["--bogus-flag"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

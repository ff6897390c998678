//! A real PostgreSQL (Debian's `postgresql`) for tests, started in a
//! temporary directory as the unprivileged user `nobody` (PostgreSQL
//! refuses to run as root), listening on a loopback port with password
//! (SCRAM) authentication; stopped when dropped.
//!
//! Needs root and PostgreSQL's server binaries (`AULA_PG_BIN`, default
//! /usr/lib/postgresql/15/bin): without either it fails and says so.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aula_bootserver::db::pg::PgSettings;

pub const PASSWORD: &str = "pg-test-Secret-7";

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

fn run_as_nobody(bin: &Path, tool: &str, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(bin.join(tool))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool} as nobody: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    pub fn start() -> Postgres {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (it starts PostgreSQL as the user nobody): run it as root, as scripts/test does"
        );
        let bin = PathBuf::from(
            std::env::var("AULA_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        assert!(
            bin.join("initdb").exists() && bin.join("pg_ctl").exists(),
            "PostgreSQL server binaries not found in {} (apt-get install postgresql, or set AULA_PG_BIN)",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("aula-pg-")
            .tempdir()
            .expect("tempdir");
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("passwd")
            .expect("user nobody");
        nix::unistd::chown(dir.path(), Some(nobody.uid), Some(nobody.gid)).expect("chown");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).expect("pwfile");
        nix::unistd::chown(&pwfile, Some(nobody.uid), Some(nobody.gid)).expect("chown");
        let data = dir.path().join("data");
        let (data_s, pw_s) = (data.to_string_lossy(), pwfile.to_string_lossy());
        run_as_nobody(
            &bin,
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "aula",
                "--pwfile",
                &pw_s,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        std::fs::remove_file(&pwfile).expect("rm pwfile");
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c max_connections=50",
            dir.path().display()
        );
        let log = dir.path().join("pg.log");
        run_as_nobody(
            &bin,
            "pg_ctl",
            &[
                "-D",
                &data_s,
                "-l",
                &log.to_string_lossy(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        Postgres { dir, bin, port }
    }

    /// Settings for boot server `id`: the password in a root-only file.
    pub fn settings(&self, id: &str, lease: Duration) -> PgSettings {
        let pw = self.dir.path().join(format!("client-{id}.pw"));
        std::fs::write(&pw, format!("{PASSWORD}\n")).expect("write");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        PgSettings {
            url: format!("postgres://aula@127.0.0.1:{}/postgres", self.port),
            password_file: Some(pw),
            server_id: id.into(),
            lease,
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &data.to_string_lossy(), "-m", "immediate", "stop"])
            .output();
    }
}

impl Postgres {
    /// Restarts the server (fast shutdown: every connection is cut), same
    /// data, port and options.
    pub fn restart(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("pg.log");
        run_as_nobody(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "restart",
            ],
        );
    }

    /// The URL boot servers are configured with (no password in it).
    pub fn url(&self) -> String {
        format!("postgres://aula@127.0.0.1:{}/postgres", self.port)
    }
}

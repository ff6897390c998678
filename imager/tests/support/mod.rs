//! Helpers shared by the imager's integration tests: real filesystems on
//! image files, the CLI binary, byte comparisons of used ranges.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use aula_imager::manifest::Manifest;
use aula_imager::repo::{LocalRepo, Repository};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_aula-imager")
}

/// Run the CLI; returns the output (never panics on a non-zero exit).
pub fn imager(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("AULA_LOG", "warn")
        // Restore records of the tests stay out of the machine's /run.
        .env(
            "AULA_RECORDS",
            std::env::temp_dir().join("aula-test-records"),
        )
        .output()
        .expect("running aula-imager")
}

/// Run the CLI and require success.
pub fn imager_ok(args: &[&str]) -> Output {
    let o = imager(args);
    assert!(
        o.status.success(),
        "aula-imager {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn sh(cmd: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .expect("running sh");
    assert!(st.success(), "command failed: {cmd}");
}

pub fn sh_out(cmd: &str) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("running sh");
    assert!(
        o.status.success(),
        "command failed: {cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    // Parse /proc/self/status to avoid an extra dependency.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
        .unwrap_or(u32::MAX)
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A directory tree of files to put in a filesystem: text, random data,
/// zeros, and a deep directory.
pub fn make_tree(dir: &Path, seed: u64, mib: usize) {
    std::fs::create_dir_all(dir.join("deep/a/b/c")).expect("mkdir");
    for i in 0..mib {
        std::fs::write(
            dir.join(format!("random{i}.bin")),
            pseudo_random(seed + i as u64, 700 << 10),
        )
        .expect("write");
        let text: String = (0..6000)
            .map(|n| format!("line {n} of file {i} seed {seed}\n"))
            .collect();
        std::fs::write(dir.join(format!("deep/a/b/c/text{i}.txt")), text).expect("write");
    }
    std::fs::write(dir.join("zeros.bin"), vec![0u8; 1 << 20]).expect("write");
    std::fs::write(dir.join("small.txt"), b"hello aula\n").expect("write");
}

/// mkfs.ext4 on `[offset, offset+size)` of `img` (created/extended as
/// needed), populated from `tree`.
pub fn mkfs_ext4(img: &Path, offset: u64, size: u64, tree: Option<&Path>) {
    let mut cmd = format!(
        "mkfs.ext4 -q -F -L aula-test -E offset={offset} {} {}",
        img.display(),
        size / 1024
    );
    if let Some(t) = tree {
        cmd = format!(
            "mkfs.ext4 -q -F -L aula-test -d {} -E offset={offset} {} {}",
            t.display(),
            img.display(),
            size / 1024
        );
    }
    sh(&cmd);
}

/// Fill a file with a repeating byte.
pub fn fill(path: &Path, byte: u8, len: u64) {
    std::fs::write(path, vec![byte; len as usize]).expect("fill");
}

pub fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).expect("read for hash");
    aula_imager::chunk::ChunkId::of(&data).hex()
}

pub fn manifest(repo: &Path, name: &str) -> Manifest {
    LocalRepo::open(repo, false)
        .expect("open repo")
        .manifest(name, None)
        .expect("manifest")
}

/// Compare the used ranges of `m` between `a` at `a_off` and `b` at `b_off`.
pub fn assert_used_equal(m: &Manifest, a: &Path, a_off: u64, b: &Path, b_off: u64) {
    use std::os::unix::fs::FileExt;
    let fa = std::fs::File::open(a).expect("open a");
    let fb = std::fs::File::open(b).expect("open b");
    let mut checked = 0u64;
    for e in m.used.extents() {
        let mut pos = e.start;
        while pos < e.end() {
            let n = (e.end() - pos).min(1 << 20) as usize;
            let mut ba = vec![0u8; n];
            let mut bb = vec![0u8; n];
            fa.read_exact_at(&mut ba, a_off + pos).expect("read a");
            fb.read_exact_at(&mut bb, b_off + pos).expect("read b");
            assert!(ba == bb, "used bytes differ in [{pos}, {})", pos + n as u64);
            pos += n as u64;
            checked += n as u64;
        }
    }
    assert_eq!(checked, m.used_bytes);
    assert!(checked > 0, "nothing compared");
}

pub struct Tmp {
    pub dir: tempfile::TempDir,
}

impl Tmp {
    pub fn new() -> Tmp {
        Tmp {
            dir: tempfile::Builder::new()
                .prefix("aula-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }
    pub fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.p(name).display().to_string()
    }
}

/// JSON result line of a `--json` run.
pub fn json_result(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    for line in out.lines().rev() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if v["event"] == "result" {
                return v["result"].clone();
            }
        }
    }
    panic!("no JSON result line in: {out}");
}

/// Inside `impl Repository for W`: the methods a test wrapper hands to its
/// repository in `self.$inner` unchanged (all but `put_chunk` and
/// `get_chunk`, which wrappers change, and the provided ones).
#[allow(unused_macros)]
macro_rules! repository_passthrough {
    ($inner:ident) => {
        fn location(&self) -> String {
            self.$inner.location()
        }
        fn chunk_size_stored(
            &self,
            id: &aula_imager::chunk::ChunkId,
        ) -> aula_imager::Result<Option<u64>> {
            self.$inner.chunk_size_stored(id)
        }
        fn sync_chunks(&self) -> aula_imager::Result<()> {
            self.$inner.sync_chunks()
        }
        fn publish(&self, m: &aula_imager::manifest::Manifest) -> aula_imager::Result<u32> {
            self.$inner.publish(m)
        }
        fn manifest(
            &self,
            name: &str,
            version: Option<u32>,
        ) -> aula_imager::Result<aula_imager::manifest::Manifest> {
            self.$inner.manifest(name, version)
        }
        fn list(&self) -> aula_imager::Result<Vec<aula_imager::repo::ImageSummary>> {
            self.$inner.list()
        }
        fn delete(&self, name: &str) -> aula_imager::Result<()> {
            self.$inner.delete(name)
        }
    };
}
#[allow(unused_imports)]
pub(crate) use repository_passthrough;

//! Helpers for the filesystem and legacy-image tests: running the real
//! tools, loop mounts with cleanup guards, deterministic file trees, and the
//! "copy only the used ranges" proof.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use aula_imager::device::{Device, OpenMode, Region};
use aula_imager::extent::ExtentMap;

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns (success, stdout + stderr).
pub fn run_status(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a shell pipeline.
pub fn sh(script: &str) -> String {
    run("bash", &["-o", "pipefail", "-c", script])
}

/// A path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A sparse file of `len` bytes.
pub fn sparse_file(path: &Path, len: u64) {
    let f = File::create(path).expect("create image file");
    f.set_len(len).expect("size image file");
}

/// Fills `[offset, offset+len)` of a file with pseudo-random garbage, so
/// that stale bytes are visible if a walker wrongly skips or keeps them.
pub fn fill_garbage(path: &Path, offset: u64, len: u64, seed: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for garbage");
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all_at(&buf[..n], offset + pos)
            .expect("write garbage");
        pos += n as u64;
    }
}

/// xorshift64: deterministic test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Writes a deterministic tree: `nfiles` files of assorted sizes (some
/// compressible, some random, some empty) in a few nested directories, plus
/// a symlink. Returns the list of relative file paths.
pub fn make_tree(root: &Path, nfiles: usize, max_size: usize, seed: u64) -> Vec<PathBuf> {
    let mut rng = Rng(seed | 1);
    let mut out = Vec::new();
    for i in 0..nfiles {
        let dir = root
            .join(format!("d{}", i % 5))
            .join(format!("sub{}", i % 3));
        fs::create_dir_all(&dir).expect("mkdir");
        let size = match i % 7 {
            0 => 0,
            1 => 1 + (rng.next() as usize % 100),
            _ => rng.next() as usize % max_size.max(1),
        };
        let mut data = vec![0u8; size];
        if i % 3 == 0 {
            // Compressible text-ish content.
            for (k, b) in data.iter_mut().enumerate() {
                *b = b"aula imaging "[k % 13];
            }
        } else {
            rng.fill(&mut data);
        }
        let rel = PathBuf::from(format!("d{}", i % 5))
            .join(format!("sub{}", i % 3))
            .join(format!("f{i}.bin"));
        fs::write(root.join(&rel), &data).expect("write file");
        out.push(rel);
    }
    std::os::unix::fs::symlink("d0/sub0/f0.bin", root.join("link")).expect("symlink");
    out
}

/// A loop mount, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// `mount -o loop[,opts] img dir`.
    pub fn new(img: &Path, dir: &Path, fstype: Option<&str>, opts: &str) -> Mount {
        fs::create_dir_all(dir).expect("mount point");
        let o = if opts.is_empty() {
            "loop".to_string()
        } else {
            format!("loop,{opts}")
        };
        let mut args = vec!["-o", o.as_str()];
        if let Some(t) = fstype {
            args.extend(["-t", t]);
        }
        args.extend([s(img), s(dir)]);
        run("mount", &args);
        Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// Unmounts now (and checks it worked).
    pub fn umount(mut self) {
        run("umount", &[s(&self.dir)]);
        self.mounted = false;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.dir)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// An ntfs-3g FUSE mount, unmounted on drop.
pub struct FuseMount {
    pub dir: PathBuf,
    mounted: bool,
}

impl FuseMount {
    pub fn ntfs(img: &Path, dir: &Path, ro: bool) -> FuseMount {
        fs::create_dir_all(dir).expect("mount point");
        let mut args = vec![s(img), s(dir)];
        if ro {
            args.extend(["-o", "ro"]);
        }
        run("ntfs-3g", &args);
        FuseMount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    pub fn umount(mut self) {
        run("umount", &[s(&self.dir)]);
        self.mounted = false;
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.dir)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Opens a region of an image file read-only.
pub fn region(img: &Path, offset: u64, len: Option<u64>) -> Region {
    let dev = Arc::new(Device::open(img, OpenMode::default()).expect("open image"));
    let len = len.unwrap_or(dev.size() - offset);
    Region::new(dev, offset, len).expect("region")
}

/// The proof: a fresh all-zero file of the same size as `src`, holding only
/// the used ranges of the region at `offset` copied from `src`.
pub fn copy_used(src: &Path, offset: u64, map: &ExtentMap, dst: &Path) {
    let len = fs::metadata(src).expect("stat").len();
    sparse_file(dst, len);
    let from = File::open(src).expect("open src");
    let to = OpenOptions::new().write(true).open(dst).expect("open dst");
    let mut buf = vec![0u8; 4 << 20];
    for e in map.extents() {
        let mut pos = 0;
        while pos < e.len {
            let n = (e.len - pos).min(buf.len() as u64) as usize;
            from.read_exact_at(&mut buf[..n], offset + e.start + pos)
                .expect("read used range");
            to.write_all_at(&buf[..n], offset + e.start + pos)
                .expect("write used range");
            pos += n as u64;
        }
    }
    to.sync_all().expect("sync copy");
}

/// `diff -r` of two trees (content, names, symlinks).
pub fn assert_trees_equal(a: &Path, b: &Path) {
    let (ok, out) = run_status("diff", &["-r", "--no-dereference", s(a), s(b)]);
    assert!(ok, "trees differ:\n{out}");
    // And make sure the comparison was not vacuous.
    let n = fs::read_dir(a).expect("read dir").count();
    assert!(n > 0, "{} is empty", a.display());
}

/// The 110-byte header of a partclone image, as written by partclone 0.3.x.
#[derive(Debug, Clone)]
pub struct PcHeader {
    pub fs: String,
    pub device_size: u64,
    pub total_blocks: u64,
    pub used_blocks: u64,
    pub block_size: u64,
}

pub fn parse_pc_header(h: &[u8]) -> PcHeader {
    assert!(
        h.len() >= 110 && h.starts_with(b"partclone-image"),
        "not a partclone header"
    );
    let u64at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let fs = String::from_utf8_lossy(&h[36..52])
        .trim_end_matches('\0')
        .to_string();
    PcHeader {
        fs,
        device_size: u64at(52),
        total_blocks: u64at(60),
        used_blocks: u64at(76),
        block_size: u64::from(u32::from_le_bytes(h[84..88].try_into().expect("4 bytes"))),
    }
}

/// Runs `partclone.<fs> -c` on `img` and returns its header (read from the
/// stream; the rest of the stream is discarded).
pub fn partclone_header(tool: &str, img: &Path, dir: &Path) -> PcHeader {
    let log = dir.join(format!("{tool}.log"));
    let mut child = Command::new(tool)
        .args(["-c", "-s", s(img), "-o", "-", "-L", s(&log)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {tool}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut h = vec![0u8; 110];
    out.read_exact(&mut h).expect("partclone header");
    // Drain the rest so partclone finishes normally.
    std::io::copy(&mut out, &mut std::io::sink()).expect("drain partclone");
    let st = child.wait().expect("wait partclone");
    assert!(st.success(), "{tool} failed; see {}", log.display());
    parse_pc_header(&h)
}

/// Writes `data` at `offset` of a file.
pub fn poke(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open to poke");
    f.write_all_at(data, offset).expect("poke");
    f.sync_all().expect("sync poke");
}

/// Reads `len` bytes at `offset`.
pub fn peek(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).expect("open to peek");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).expect("peek");
    b
}

/// Appends a line to stderr output for the report (shown with --nocapture).
pub fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Copies `[offset, offset+len)` of `src` into a new file `dst`.
pub fn extract(src: &Path, offset: u64, len: u64, dst: &Path) {
    let from = File::open(src).expect("open src");
    sparse_file(dst, len);
    let to = OpenOptions::new().write(true).open(dst).expect("open dst");
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], offset + pos)
            .expect("read");
        to.write_all_at(&buf[..n], pos).expect("write");
        pos += n as u64;
    }
}

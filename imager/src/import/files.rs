//! Reading a stream that is stored as one file or as split parts
//! (`.aa`, `.ab`, … as `split` names them; `.000`, `.001`, … as FOG's
//! `split -d` does), remembering which file is being read so that an error
//! can name it, and hashing the bytes as they pass (OpenGnsys sums).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use md5::{Digest, Md5};

use super::ImportError;

/// The split suffix of `name` when it is one: the letters or digits after
/// the last dot, at least two long (`aa`, `aab`, `000`).
fn split_suffix(name: &str) -> Option<(&str, &str)> {
    let (stem, suf) = name.rsplit_once('.')?;
    let letters = suf.len() >= 2 && suf.bytes().all(|b| b.is_ascii_lowercase());
    let digits = suf.len() >= 2 && suf.bytes().all(|b| b.is_ascii_digit());
    (letters || digits).then_some((stem, suf))
}

/// The `k`-th suffix (0-based) of width `width` in the class of `first`
/// (`aa`, `ab`, … `zz`, `aaa`… for letters; `00`, `01`, … for digits).
fn nth_suffix(first: &str, width: usize, k: u64) -> Option<String> {
    let digits = first.bytes().all(|b| b.is_ascii_digit());
    let base: u64 = if digits { 10 } else { 26 };
    let mut v = k;
    let mut out = vec![0u8; width];
    for slot in out.iter_mut().rev() {
        let d = (v % base) as u8;
        *slot = if digits { b'0' + d } else { b'a' + d };
        v /= base;
    }
    (v == 0).then(|| String::from_utf8_lossy(&out).into_owned())
}

/// The files of a stream that starts at `first`: `first` alone, or when
/// its name ends in the first split suffix (`.aa`, `.000`), it and its
/// following parts in order. A gap in the sequence (`.aa`, `.ac` without
/// `.ab`) is refused naming the missing part.
pub fn split_parts(first: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let name = first
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some((stem, suf)) = split_suffix(&name) else {
        return Ok(vec![first.to_path_buf()]);
    };
    let digits = suf.bytes().all(|b| b.is_ascii_digit());
    let is_first = suf.bytes().all(|b| b == if digits { b'0' } else { b'a' });
    if !is_first {
        // `x.img` ends in letters too: only a name that starts a split set
        // (all `a`, all `0`) is read as one.
        return Ok(vec![first.to_path_buf()]);
    }
    let dir = first.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let width = suf.len();
    // Every sibling of the same stem with a suffix of that class and width.
    let mut present = std::collections::BTreeSet::new();
    let rd = std::fs::read_dir(dir).map_err(|e| ImportError::io(dir, e))?;
    for e in rd {
        let e = e.map_err(|e| ImportError::io(dir, e))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some((s, x)) = split_suffix(&n) {
            if s == stem && x.len() == width && x.bytes().all(|b| b.is_ascii_digit()) == digits {
                present.insert(x.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for k in 0..present.len() as u64 {
        let want = nth_suffix(suf, width, k)
            .ok_or_else(|| ImportError::Invalid(format!("too many split parts of {stem}")))?;
        if !present.contains(&want) {
            return Err(ImportError::Invalid(format!(
                "split part {} is missing (found {} parts of {stem}, up to .{})",
                dir.join(format!("{stem}.{want}")).display(),
                present.len(),
                present.iter().next_back().cloned().unwrap_or_default()
            )));
        }
        out.push(dir.join(format!("{stem}.{want}")));
    }
    Ok(out)
}

/// The name the split part after `last` would have (`x.ab` after
/// `x.aa`), when `last` is named as a split part.
pub fn next_part_name(last: &Path) -> Option<PathBuf> {
    let name = last.file_name()?.to_string_lossy().into_owned();
    let (stem, suf) = split_suffix(&name)?;
    let digits = suf.bytes().all(|b| b.is_ascii_digit());
    let base: u64 = if digits { 10 } else { 26 };
    let mut k = 0u64;
    for b in suf.bytes() {
        k = k * base + u64::from(if digits { b - b'0' } else { b - b'a' });
    }
    let next = nth_suffix(suf, suf.len(), k + 1)?;
    Some(last.with_file_name(format!("{stem}.{next}")))
}

/// Which file a [`PartsReader`] is in, shared with whoever reports errors.
#[derive(Debug, Clone, Default)]
pub struct Position(Arc<Mutex<(usize, String)>>);

impl Position {
    /// The file being read (its display name) and its index.
    pub fn current(&self) -> (usize, String) {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }
    fn set(&self, i: usize, name: String) {
        if let Ok(mut g) = self.0.lock() {
            *g = (i, name);
        }
    }
}

/// MD5 of every byte read so far (and how many), shared with the caller.
#[derive(Clone, Default)]
pub struct Md5Tap(Arc<Mutex<(Md5, u64)>>);

impl Md5Tap {
    /// The digest of the whole of `file`: the bytes read through the tap,
    /// then the rest of the file from there (bytes a decoder never asked
    /// for), as lower-case hex.
    pub fn hex_of_whole(&self, file: &Path) -> Result<String, ImportError> {
        use std::io::{Seek, SeekFrom};
        let mut g = self
            .0
            .lock()
            .map_err(|_| ImportError::Invalid("MD5 state lock poisoned".into()))?;
        let mut f = File::open(file).map_err(|e| ImportError::io(file, e))?;
        f.seek(SeekFrom::Start(g.1))
            .map_err(|e| ImportError::io(file, e))?;
        io::copy(&mut f, &mut g.0).map_err(|e| ImportError::io(file, e))?;
        Ok(hex::encode(g.0.clone().finalize()))
    }
}

/// Reads any stream, hashing it through an optional [`Md5Tap`] and
/// recording position for errors.
pub struct Tapped {
    inner: Box<dyn Read + Send>,
    md5: Option<Md5Tap>,
}

impl Tapped {
    /// Wraps `inner`; with `md5`, every byte read is hashed.
    pub fn new(inner: Box<dyn Read + Send>, md5: Option<Md5Tap>) -> Tapped {
        Tapped { inner, md5 }
    }
}

impl Read for Tapped {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(t) = &self.md5 {
            if let Ok(mut h) = t.0.lock() {
                h.0.update(&buf[..n]);
                h.1 += n as u64;
            }
        }
        Ok(n)
    }
}

/// The concatenation of several files, read in order.
pub struct PartsReader {
    files: Vec<PathBuf>,
    next: usize,
    cur: Option<File>,
    pos: Position,
}

impl PartsReader {
    /// Reads `files` in order.
    pub fn new(files: Vec<PathBuf>) -> (PartsReader, Position) {
        let pos = Position::default();
        if let Some(f) = files.first() {
            pos.set(0, f.display().to_string());
        }
        (
            PartsReader {
                files,
                next: 0,
                cur: None,
                pos: pos.clone(),
            },
            pos,
        )
    }
}

impl Read for PartsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.cur.is_none() {
                let Some(p) = self.files.get(self.next) else {
                    return Ok(0);
                };
                let f = File::open(p)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                self.pos.set(self.next, p.display().to_string());
                self.next += 1;
                self.cur = Some(f);
            }
            let Some(f) = self.cur.as_mut() else {
                continue;
            };
            let n = f.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            self.cur = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_suffixes_count_like_split_does() {
        assert_eq!(nth_suffix("aa", 2, 0).as_deref(), Some("aa"));
        assert_eq!(nth_suffix("aa", 2, 1).as_deref(), Some("ab"));
        assert_eq!(nth_suffix("aa", 2, 26).as_deref(), Some("ba"));
        assert_eq!(nth_suffix("aa", 2, 26 * 26), None);
        assert_eq!(nth_suffix("000", 3, 12).as_deref(), Some("012"));
        assert!(split_suffix("sda1.ext4-ptcl-img.gz.aa").is_some());
        assert!(split_suffix("d1p1.img.000").is_some());
        assert!(split_suffix("noext").is_none());
        assert_eq!(
            next_part_name(Path::new("/i/x.gz.az")),
            Some(PathBuf::from("/i/x.gz.ba"))
        );
        assert_eq!(
            next_part_name(Path::new("d1p1.img.009")),
            Some(PathBuf::from("d1p1.img.010"))
        );
    }

    #[test]
    fn split_sets_are_found_in_order_and_a_gap_is_named() {
        let d = tempfile::tempdir().expect("tmp");
        for s in ["aa", "ab", "ac"] {
            std::fs::write(d.path().join(format!("x.gz.{s}")), s).expect("w");
        }
        let parts = split_parts(&d.path().join("x.gz.aa")).expect("parts");
        let names: Vec<_> = parts
            .iter()
            .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            names,
            vec![
                Some("x.gz.aa".into()),
                Some("x.gz.ab".into()),
                Some("x.gz.ac".into())
            ]
        );
        let (mut r, _) = PartsReader::new(parts);
        let mut s = String::new();
        r.read_to_string(&mut s).expect("read");
        assert_eq!(s, "aaabac");
        std::fs::remove_file(d.path().join("x.gz.ab")).expect("rm");
        let e = split_parts(&d.path().join("x.gz.aa")).expect_err("gap");
        assert!(e.to_string().contains("x.gz.ab"), "{e}");
        // A plain name is one file.
        assert_eq!(split_parts(Path::new("/a/b.img")).expect("one").len(), 1);
    }
}

//! A repository in a local directory.
//!
//! ```text
//! REPO/aula-repo.json            {"format":"aula-repo","version":1}
//! REPO/chunks/ab/<sha256>.zst    one zstd frame per chunk, content addressed
//! REPO/images/<name>/<N>.json    manifest version N (the highest is current)
//! REPO/tmp/                      files being written (same filesystem)
//! REPO/trash/                    deleted images
//! ```
//!
//! Every file is written to `tmp/`, fsynced, and renamed into place; the
//! directory is fsynced before anything refers to the file. A manifest
//! version is linked into place without replacing an existing one, so two
//! writers publishing at once get distinct version numbers. A write that
//! fails (a full disk) removes its temporary file, and a publish that fails
//! leaves no new image directory; temporary files of processes that died
//! are removed by [`LocalRepo::sweep_tmp`].

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{check_publishable, ImageSummary, Repository};
use crate::chunk::ChunkId;
use crate::error::{Error, IoContext, Result};
use crate::manifest::{validate_name, Manifest};

const MARKER: &str = "aula-repo.json";

#[derive(Serialize, Deserialize)]
struct Marker {
    format: String,
    version: u32,
}

/// A directory repository.
#[derive(Debug)]
pub struct LocalRepo {
    root: PathBuf,
    /// Chunk directories written since the last `sync_chunks`.
    dirty_dirs: Mutex<HashSet<PathBuf>>,
    counter: AtomicU64,
}

fn sync_dir(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", p.display()))
}

impl LocalRepo {
    /// Open a repository; with `create`, make it (or initialise an empty
    /// directory) when missing.
    pub fn open(root: &Path, create: bool) -> Result<LocalRepo> {
        let marker = root.join(MARKER);
        if marker.exists() {
            let bytes = fs::read(&marker).ctx(|| format!("reading {}", marker.display()))?;
            let m: Marker = serde_json::from_slice(&bytes).map_err(|e| {
                Error::Repo(format!(
                    "{} is not a repository marker: {e}",
                    marker.display()
                ))
            })?;
            if m.format != "aula-repo" || m.version != 1 {
                return Err(Error::Repo(format!(
                    "{} is a {} v{} repository, this build handles aula-repo v1",
                    root.display(),
                    m.format,
                    m.version
                )));
            }
        } else if !create {
            return Err(Error::Repo(format!(
                "{} is not an Aula repository (no {MARKER}); create an image into it first",
                root.display()
            )));
        } else {
            if root.exists() {
                let non_empty = fs::read_dir(root)
                    .ctx(|| format!("listing {}", root.display()))?
                    .next()
                    .is_some();
                if non_empty {
                    return Err(Error::Repo(format!(
                        "{} exists, is not empty and is not an Aula repository",
                        root.display()
                    )));
                }
            }
            fs::create_dir_all(root).ctx(|| format!("creating {}", root.display()))?;
        }
        for d in ["chunks", "images", "tmp", "trash"] {
            let p = root.join(d);
            fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        let repo = LocalRepo {
            root: root.to_path_buf(),
            dirty_dirs: Mutex::new(HashSet::new()),
            counter: AtomicU64::new(0),
        };
        if !marker.exists() {
            let body = serde_json::to_vec(&Marker {
                format: "aula-repo".into(),
                version: 1,
            })
            .map_err(|e| Error::Repo(e.to_string()))?;
            repo.write_atomic(&marker, &body)?;
            sync_dir(root)?;
        }
        Ok(repo)
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a chunk file.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let h = id.hex();
        self.root
            .join("chunks")
            .join(&h[..2])
            .join(format!("{h}.zst"))
    }

    fn image_dir(&self, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        Ok(self.root.join("images").join(name))
    }

    fn temp_path(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}.partial", std::process::id()))
    }

    /// Write to a temporary file and fsync it; returns its path. On
    /// failure nothing is left behind.
    fn write_temp(&self, bytes: &[u8]) -> Result<PathBuf> {
        let tmp = self.temp_path();
        if let Err(e) = crate::device::write_new_synced(&tmp, bytes) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::Io {
                what: format!("writing {}", tmp.display()),
                source: e,
            });
        }
        Ok(tmp)
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.write_temp(bytes)?;
        fs::rename(&tmp, dest).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::Io {
                what: format!("renaming into {}", dest.display()),
                source: e,
            }
        })
    }

    /// Stores a chunk frame and makes it durable before returning: the
    /// file is fsynced, renamed into place and its directory fsynced (and
    /// `chunks/` too when the directory is new). False when the chunk was
    /// already there. For a server that acknowledges each upload; the
    /// batch path is [`Repository::put_chunk`] + [`Repository::sync_chunks`].
    pub fn put_chunk_durable(&self, id: &ChunkId, frame: &[u8]) -> Result<bool> {
        let dest = self.chunk_path(id);
        if dest.exists() {
            return Ok(false);
        }
        let dir = dest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        let new_dir = !dir.exists();
        if new_dir {
            fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        self.write_atomic(&dest, frame)?;
        sync_dir(&dir)?;
        if new_dir {
            sync_dir(&self.root.join("chunks"))?;
        }
        Ok(true)
    }

    /// Removes temporary files that no running writer owns: those named
    /// by a process that is gone, or by this process (left by an earlier
    /// life of it under the same number). Returns how many were removed.
    pub fn sweep_tmp(&self) -> Result<usize> {
        let dir = self.root.join("tmp");
        let me = std::process::id();
        let mut removed = 0;
        for ent in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let ent = ent.ctx(|| format!("listing {}", dir.display()))?;
            let name = ent.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok());
            let alive =
                owner.is_some_and(|pid| pid != me && Path::new(&format!("/proc/{pid}")).exists());
            if alive {
                continue;
            }
            let p = ent.path();
            let r = if ent.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.ctx(|| format!("removing {}", p.display()))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&dir)?;
        }
        Ok(removed)
    }

    /// Version numbers of an image, ascending.
    pub fn versions(&self, name: &str) -> Result<Vec<u32>> {
        let dir = self.image_dir(name)?;
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(Error::Io {
                    what: format!("listing {}", dir.display()),
                    source: e,
                })
            }
        };
        let mut v = Vec::new();
        for ent in rd {
            let ent = ent.ctx(|| format!("listing {}", dir.display()))?;
            let fname = ent.file_name();
            let Some(s) = fname.to_str() else { continue };
            if let Some(n) = s.strip_suffix(".json").and_then(|n| n.parse::<u32>().ok()) {
                v.push(n);
            }
        }
        v.sort_unstable();
        Ok(v)
    }

    /// Store a manifest under its own `image_version` (used by caches that
    /// mirror another repository). A version already present is left alone
    /// when it is the same manifest, and replaced when it differs: the
    /// repository mirrored is the source of truth, not what a cache holds.
    pub fn store_version(&self, m: &Manifest) -> Result<()> {
        m.validate().map_err(|why| Error::BadManifest {
            source_name: Some(m.name.clone()),
            why,
        })?;
        if m.image_version == 0 {
            return Err(Error::Invalid(format!(
                "{} has no version number to store under",
                m.name
            )));
        }
        let dir = self.image_dir(&m.name)?;
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let dest = dir.join(format!("{}.json", m.image_version));
        if dest.exists() {
            match self.read_manifest_file(&dest) {
                Ok(old) if old.to_json() == m.to_json() => return Ok(()),
                _ => {
                    tracing::warn!(
                        "the cached manifest {} differs from the repository's; replacing it",
                        dest.display()
                    );
                    let tmp = self.write_temp(&m.to_json())?;
                    let r = fs::rename(&tmp, &dest);
                    if r.is_err() {
                        let _ = fs::remove_file(&tmp);
                    }
                    r.ctx(|| format!("replacing {}", dest.display()))?;
                    return sync_dir(&dir);
                }
            }
        }
        let tmp = self.write_temp(&m.to_json())?;
        let r = fs::hard_link(&tmp, &dest);
        let _ = fs::remove_file(&tmp);
        match r {
            Ok(()) => sync_dir(&dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::Io {
                what: format!("storing {}", dest.display()),
                source: e,
            }),
        }
    }

    /// Links the next version of `manifest` into `dir` (see `publish`).
    fn publish_into(&self, dir: &Path, created_dir: bool, manifest: &Manifest) -> Result<u32> {
        if created_dir {
            sync_dir(&self.root.join("images"))?;
        }
        loop {
            let next = self.versions(&manifest.name)?.last().copied().unwrap_or(0) + 1;
            let mut m = manifest.clone();
            m.image_version = next;
            let tmp = self.write_temp(&m.to_json())?;
            let dest = dir.join(format!("{next}.json"));
            // hard_link fails when dest exists: a concurrent publisher took
            // this number, so try the next one.
            match fs::hard_link(&tmp, &dest) {
                Ok(()) => {
                    let _ = fs::remove_file(&tmp);
                    if let Err(e) = sync_dir(dir) {
                        // Not known to be durable: not published.
                        let _ = fs::remove_file(&dest);
                        return Err(e);
                    }
                    return Ok(next);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let _ = fs::remove_file(&tmp);
                    continue;
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(Error::Io {
                        what: format!("publishing {}", dest.display()),
                        source: e,
                    });
                }
            }
        }
    }

    fn read_manifest_file(&self, path: &Path) -> Result<Manifest> {
        let mut bytes = Vec::new();
        // One byte more than a manifest may have: from_json names the bound.
        File::open(path)
            .and_then(|f| {
                f.take(crate::manifest::MAX_MANIFEST_BYTES as u64 + 1)
                    .read_to_end(&mut bytes)
            })
            .ctx(|| format!("reading {}", path.display()))?;
        Manifest::from_json(&bytes, &path.display().to_string())
    }
}

impl Repository for LocalRepo {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn chunk_size_stored(&self, id: &ChunkId) -> Result<Option<u64>> {
        let p = self.chunk_path(id);
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io {
                what: format!("checking {}", p.display()),
                source: e,
            }),
        }
    }

    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<()> {
        let dest = self.chunk_path(id);
        if dest.exists() {
            return Ok(());
        }
        let dir = dest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        self.write_atomic(&dest, frame)?;
        if let Ok(mut d) = self.dirty_dirs.lock() {
            d.insert(dir);
        }
        Ok(())
    }

    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        let p = self.chunk_path(id);
        match File::open(&p) {
            Ok(mut f) => {
                f.read_to_end(out)
                    .ctx(|| format!("reading {}", p.display()))?;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::ChunkMissing(*id)),
            Err(e) => Err(Error::Io {
                what: format!("opening {}", p.display()),
                source: e,
            }),
        }
    }

    fn will_need(&self, id: &ChunkId) {
        if let Ok(f) = File::open(self.chunk_path(id)) {
            crate::device::will_need(&f, 0, 0);
        }
    }

    fn sync_chunks(&self) -> Result<()> {
        let dirs: Vec<PathBuf> = match self.dirty_dirs.lock() {
            Ok(mut d) => d.drain().collect(),
            Err(_) => return Err(Error::Repo("chunk bookkeeping lock poisoned".into())),
        };
        for d in &dirs {
            sync_dir(d)?;
        }
        if !dirs.is_empty() {
            sync_dir(&self.root.join("chunks"))?;
        }
        Ok(())
    }

    fn publish(&self, manifest: &Manifest) -> Result<u32> {
        check_publishable(self, manifest)?;
        self.sync_chunks()?;
        let dir = self.image_dir(&manifest.name)?;
        let created_dir = !dir.exists();
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let r = self.publish_into(&dir, created_dir, manifest);
        if r.is_err() && created_dir {
            // Nothing half-done: no empty image directory stays behind.
            let _ = fs::remove_dir(&dir);
        }
        r
    }

    fn manifest(&self, name: &str, version: Option<u32>) -> Result<Manifest> {
        let dir = self.image_dir(name)?;
        let v = match version {
            Some(v) => v,
            None => *self
                .versions(name)?
                .last()
                .ok_or_else(|| Error::ImageNotFound(name.to_string()))?,
        };
        let p = dir.join(format!("{v}.json"));
        if !p.exists() {
            return Err(Error::ImageNotFound(format!("{name}@{v}")));
        }
        let m = self.read_manifest_file(&p)?;
        if m.name != name {
            return Err(Error::BadManifest {
                source_name: Some(p.display().to_string()),
                why: format!("names image {:?}, stored under {name:?}", m.name),
            });
        }
        Ok(m)
    }

    fn list(&self) -> Result<Vec<ImageSummary>> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for ent in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let ent = ent.ctx(|| format!("listing {}", dir.display()))?;
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue;
            }
            let versions = self.versions(&name)?;
            if versions.is_empty() {
                continue;
            }
            let m = self.manifest(&name, None)?;
            out.push(ImageSummary::of(&m, versions));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let dir = self.image_dir(name)?;
        if !dir.exists() {
            return Err(Error::ImageNotFound(name.to_string()));
        }
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let dest = self
            .root
            .join("trash")
            .join(format!("{name}.{stamp}.{}", std::process::id()));
        fs::rename(&dir, &dest).ctx(|| format!("moving {} to the trash", dir.display()))?;
        sync_dir(&self.root.join("images"))
    }
}

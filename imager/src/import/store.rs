//! `import --all`: every image of an OpenGnsys, Clonezilla or FOG store.
//!
//! The store is walked (two levels deep: OpenGnsys keeps images per unit
//! in sub-directories): Clonezilla and FOG image directories, and
//! partclone `.img` files (OpenGnsys). Each is imported under a name made
//! from its file or directory name. An image whose name the repository
//! already holds, imported from the same source, is skipped, so running
//! the command again after an interruption resumes where it stopped (and
//! chunks stored by an interrupted image are not compressed again).

use std::path::{Path, PathBuf};

use super::{detect, import_source, ImportError, ImportOptions, Source};
use crate::progress::Progress;
use crate::repo::Repository;

/// One image found in a store.
#[derive(Debug, Clone)]
pub struct Found {
    /// The image name it is imported as.
    pub name: String,
    /// Its file or directory.
    pub path: PathBuf,
}

/// What happened to one image.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    /// Imported now.
    Imported {
        /// The published images, `name@version`.
        images: Vec<String>,
        /// Used bytes converted.
        used_bytes: u64,
        /// Seconds it took.
        seconds: f64,
        /// What was noticed and left out.
        notes: Vec<String>,
    },
    /// Already in the repository from this source.
    Skipped {
        /// Why.
        why: String,
    },
    /// Not imported.
    Failed {
        /// The error, with its causes.
        error: String,
    },
}

/// One line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Image name.
    pub name: String,
    /// Where it came from.
    pub source: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A name made of `A-Z a-z 0-9 . _ -` from a file or directory name.
pub fn image_name(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with(['.', '-']) {
        s.remove(0);
    }
    s.truncate(100);
    if s.is_empty() {
        s.push_str("image");
    }
    s
}

fn is_opengnsys_img(p: &Path) -> bool {
    p.is_file() && p.extension().is_some_and(|e| e == "img") && super::legacy_kind(p).is_some()
}

fn walk_into(
    dir: &Path,
    prefix: &str,
    depth: u32,
    out: &mut Vec<Found>,
) -> Result<(), ImportError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ImportError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let fname = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if fname.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            if super::source::is_clonezilla(&p) || super::source::is_fog(&p) {
                out.push(Found {
                    name: image_name(&format!("{prefix}{fname}")),
                    path: p,
                });
            } else if depth > 0 && fname != "dev" && fname != "postdownloadscripts" {
                walk_into(&p, &format!("{prefix}{fname}-"), depth - 1, out)?;
            }
        } else if is_opengnsys_img(&p) {
            let stem = fname.trim_end_matches(".img");
            out.push(Found {
                name: image_name(&format!("{prefix}{stem}")),
                path: p,
            });
        }
    }
    Ok(())
}

/// The images of a store, in name order. A directory that is itself one
/// image yields that image.
pub fn walk(dir: &Path) -> Result<Vec<Found>, ImportError> {
    if super::source::is_clonezilla(dir) || super::source::is_fog(dir) {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(vec![Found {
            name: image_name(&name),
            path: dir.to_path_buf(),
        }]);
    }
    if !dir.is_dir() {
        return Err(ImportError::Invalid(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let mut out = Vec::new();
    walk_into(dir, "", 1, &mut out)?;
    Ok(out)
}

/// The names a source is published as.
fn names_of(src: &Source, name: &str) -> Vec<String> {
    if src.disk.is_none() && src.parts.len() > 1 {
        src.parts
            .iter()
            .map(|p| format!("{name}-{}", p.dev))
            .collect()
    } else {
        vec![name.to_string()]
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Imports every image of the store at `dir`, calling `report` after each.
/// Returns every report; errors of single images are reports, not errors.
pub fn import_all(
    dir: &Path,
    repo: &dyn Repository,
    opts: &ImportOptions,
    progress: &Progress,
    report: &mut dyn FnMut(&Report),
) -> Result<Vec<Report>, ImportError> {
    let found = walk(dir)?;
    let mut out = Vec::new();
    for f in found {
        let source = f.path.display().to_string();
        let outcome = match one(&f, repo, opts, progress) {
            Ok(o) => o,
            Err(ImportError::Cancelled) => return Err(ImportError::Cancelled),
            Err(e) => Outcome::Failed {
                error: error_chain(&e),
            },
        };
        let r = Report {
            name: f.name.clone(),
            source,
            outcome,
        };
        report(&r);
        out.push(r);
    }
    Ok(out)
}

fn one(
    f: &Found,
    repo: &dyn Repository,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Outcome, ImportError> {
    let src = detect(&f.path)?;
    let names = names_of(&src, &f.name);
    let mut done = Vec::new();
    for n in &names {
        match repo.manifest(n, None) {
            Ok(m) => {
                let same = m
                    .origin
                    .as_ref()
                    .is_some_and(|o| Path::new(&o.source) == f.path);
                if !same {
                    return Err(ImportError::Invalid(format!(
                        "the repository already has an image {n} that was not imported from {}; import this one by hand under another name",
                        f.path.display()
                    )));
                }
                done.push(format!("{n}@{}", m.image_version));
            }
            Err(crate::Error::ImageNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if done.len() == names.len() {
        return Ok(Outcome::Skipped {
            why: format!("already imported as {}", done.join(", ")),
        });
    }
    let t0 = std::time::Instant::now();
    let imported = import_source(&src, &f.name, repo, opts, progress)?;
    Ok(Outcome::Imported {
        images: imported
            .manifests
            .iter()
            .map(|m| format!("{}@{}", m.name, m.image_version))
            .collect(),
        used_bytes: imported
            .manifests
            .iter()
            .map(|m| m.total_used_bytes())
            .sum(),
        seconds: t0.elapsed().as_secs_f64(),
        notes: imported.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_made_safe() {
        assert_eq!(image_name("win 10 (lab)"), "win_10__lab_");
        assert_eq!(image_name(".hidden"), "hidden");
        assert_eq!(image_name("--"), "image");
        assert!(crate::manifest::validate_name(&image_name("ünïcode/x")).is_ok());
    }
}

//! The `import` subcommand, and the legacy sources `restore` and `info`
//! accept (files, split parts, directories, URLs, standard input).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use aula_imager::import::{self, files::Position, ImportOptions};
use aula_imager::legacy::PartcloneStream;
use aula_imager::repo::HttpRepo;

use super::{http_options, is_url, mib, open_repo, print_result, run_job, usage, NetOpts, Output};

/// Options of `import` besides the source.
pub(crate) struct ImportArgs {
    pub repo: String,
    pub name: Option<String>,
    pub all: bool,
    pub level: i32,
    pub chunk_kib: u64,
    pub threads: Option<usize>,
    pub description: Option<String>,
}

fn url_reader(url: &str, net: &NetOpts) -> Result<Box<dyn std::io::Read + Send>> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => bail!(usage(format!("{url} names no file"))),
    };
    let repo = Arc::new(HttpRepo::new(
        &format!("{scheme}://{host}"),
        http_options(net)?,
    )?);
    Ok(Box::new(
        repo.stream(path)
            .with_context(|| format!("downloading {url}"))?,
    ))
}

/// Opens a legacy image for `restore`/`info`: a partclone file (or the
/// first of its split parts), a URL, `-` (standard input), or a Clonezilla
/// or FOG directory holding one partition image. Returns the stream and,
/// for files, which file is being read.
pub(crate) fn open_legacy(
    name: &str,
    net: &NetOpts,
) -> Result<(PartcloneStream, Option<Position>)> {
    if name == "-" || is_url(name) {
        let reader: Box<dyn std::io::Read + Send> = if name == "-" {
            Box::new(std::io::BufReader::with_capacity(1 << 20, std::io::stdin()))
        } else {
            url_reader(name, net)?
        };
        let s = aula_imager::legacy::open(reader)
            .with_context(|| format!("reading the partclone image {name}"))?;
        return Ok((s, None));
    }
    let src = import::detect(Path::new(name)).with_context(|| format!("reading {name}"))?;
    if src.disk.is_some() && src.parts.len() > 1 {
        bail!(usage(format!(
            "{name} is a whole-disk image of {} partitions: import it (aula-imager import {name} --repo R --name N) and restore that, or restore one partition from its part file",
            src.parts.len()
        )));
    }
    let part = match src.parts.as_slice() {
        [one] => one,
        many => bail!(usage(format!(
            "{name} holds {} partition images ({}): restore one of them by giving its (first) part file",
            many.len(),
            many.iter()
                .map(|p| p.files.first().map(|f| f.display().to_string()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    };
    let (s, pos) = import::open_part(part, None).with_context(|| format!("reading {name}"))?;
    Ok((s, Some(pos)))
}

pub(crate) fn cmd_import(source: &str, a: ImportArgs, out: &Output, net: &NetOpts) -> Result<()> {
    let chunk_size = a
        .chunk_kib
        .checked_mul(1024)
        .filter(|c| c.is_power_of_two() && (64 << 10..=64 << 20).contains(c))
        .ok_or_else(|| usage("--chunk-kib must be a power of two between 64 and 65536"))?;
    let opts = ImportOptions {
        chunk_size,
        level: a.level,
        threads: a.threads.unwrap_or_else(aula_imager::pool::default_threads),
        description: a.description,
    };
    let repo = open_repo(&a.repo, true, net)?;
    if a.all {
        if a.name.is_some() {
            bail!(usage(
                "--all names its images after the store's files: drop --name"
            ));
        }
        let dir = Path::new(source);
        let mut failed = 0usize;
        let (reports, secs) = run_job(out, "import", |p| {
            import::store::import_all(dir, repo.as_ref(), &opts, p, &mut |r| {
                if matches!(r.outcome, import::store::Outcome::Failed { .. }) {
                    failed += 1;
                }
                if out.json {
                    println!("{}", serde_json::json!({"event": "image", "image": r}));
                } else {
                    let what = match &r.outcome {
                        import::store::Outcome::Imported {
                            images,
                            used_bytes,
                            seconds,
                            notes,
                        } => format!(
                            "imported as {} ({} in {seconds:.1} s){}",
                            images.join(", "),
                            mib(*used_bytes),
                            notes.iter().map(|n| format!("; {n}")).collect::<String>()
                        ),
                        import::store::Outcome::Skipped { why } => format!("skipped: {why}"),
                        import::store::Outcome::Failed { error } => format!("FAILED: {error}"),
                    };
                    eprintln!("{}: {} {what}", r.name, r.source);
                }
            })
        })?;
        let n = |k: &str| {
            reports
                .iter()
                .filter(|r| {
                    matches!(
                        (&r.outcome, k),
                        (import::store::Outcome::Imported { .. }, "i")
                            | (import::store::Outcome::Skipped { .. }, "s")
                            | (import::store::Outcome::Failed { .. }, "f")
                    )
                })
                .count()
        };
        print_result(
            out,
            serde_json::json!({"images": reports.len(), "imported": n("i"), "skipped": n("s"), "failed": n("f"), "seconds": secs}),
            format!(
                "{} images in {source}: {} imported, {} already imported, {} failed ({secs:.1} s)",
                reports.len(),
                n("i"),
                n("s"),
                n("f")
            ),
        );
        if failed > 0 {
            bail!("{failed} image(s) of {source} could not be imported (see above); run the same command again to retry them");
        }
        return Ok(());
    }
    let name = a
        .name
        .ok_or_else(|| usage("give --name NAME (or --all to import a whole store)"))?;
    let (imported, secs) = run_job(out, "import", |p| -> Result<_> {
        if source == "-" || is_url(source) {
            let reader: Box<dyn std::io::Read + Send> = if source == "-" {
                Box::new(std::io::BufReader::with_capacity(1 << 20, std::io::stdin()))
            } else {
                url_reader(source, net)?
            };
            let shown = if source == "-" {
                "standard input"
            } else {
                source
            };
            Ok(import::import_reader(
                reader,
                shown,
                &name,
                repo.as_ref(),
                &opts,
                p,
            )?)
        } else {
            Ok(import::import_path(
                Path::new(source),
                &name,
                repo.as_ref(),
                &opts,
                p,
            )?)
        }
    })
    .with_context(|| format!("importing {source}"))?;
    for n in &imported.notes {
        eprintln!("note: {n}");
    }
    let list: Vec<serde_json::Value> = imported
        .manifests
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": m.name, "version": m.image_version, "kind": m.kind,
                "used_bytes": m.total_used_bytes(), "stored_bytes": m.stored_bytes(),
                "origin": m.origin,
            })
        })
        .collect();
    let used: u64 = imported
        .manifests
        .iter()
        .map(|m| m.total_used_bytes())
        .sum();
    print_result(
        out,
        serde_json::json!({"images": list, "seconds": secs}),
        format!(
            "imported {source} as {}: {} used, {:.1} s ({:.0} MiB/s)",
            imported
                .manifests
                .iter()
                .map(|m| format!(
                    "{}@{} ({})",
                    m.name,
                    m.image_version,
                    format!("{:?}", m.kind).to_lowercase()
                ))
                .collect::<Vec<_>>()
                .join(", "),
            mib(used),
            secs,
            used as f64 / 1048576.0 / secs.max(1e-9)
        ),
    );
    Ok(())
}

/// `create` refuses what `import` is for.
pub(crate) fn refuse_legacy_source(source: &Path) -> Result<()> {
    if let Some(kind) = import::legacy_kind(source) {
        bail!(usage(format!(
            "{} is {kind}: `create` images filesystems and disks, it would store this one as opaque bytes; convert it with `aula-imager import {} --repo REPO --name NAME`",
            source.display(),
            source.display()
        )));
    }
    Ok(())
}

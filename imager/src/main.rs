//! `aula-imager` command-line interface: parses arguments and calls the
//! library. Exit codes: 0 ok, 1 failure, 2 usage.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use aula_imager::create::{CreateOptions, SourceInfo};
use aula_imager::device::{Device, DeviceKind, OpenMode, Region};
use aula_imager::manifest::Manifest;
use aula_imager::progress::{Progress, ProgressEvent};
use aula_imager::repo::{parse_image_ref, LocalRepo, Repository};
use aula_imager::restore::RestoreOptions;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "aula-imager",
    version,
    about = "Create, restore and verify Aula disk and partition images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Output {
    /// Progress and result as JSON lines on stdout (for programs).
    #[arg(long, global = true)]
    json: bool,
    /// No progress output.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an image of a file, block device or partition.
    Create {
        /// Source: a file or block device.
        source: PathBuf,
        /// Repository: a directory or an http(s):// URL.
        #[arg(long)]
        repo: String,
        /// Image name (A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
        /// Image partition N of the source's partition table.
        #[arg(long, short)]
        partition: Option<u32>,
        /// Image every byte instead of the filesystem's used blocks.
        #[arg(long)]
        raw: bool,
        /// Image a filesystem even when it is not clean.
        #[arg(long)]
        force: bool,
        /// zstd compression level.
        #[arg(long, default_value_t = aula_imager::create::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(-7..=19))]
        level: i32,
        /// Chunk size in KiB (power of two, 64..65536).
        #[arg(long, default_value_t = 4096)]
        chunk_kib: u64,
        /// Worker threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
        /// Description stored in the manifest.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// Restore an image onto a file, block device or partition.
    Restore {
        /// Image name, or NAME@VERSION.
        name: String,
        /// Repository: a directory or an http(s):// URL.
        #[arg(long)]
        repo: String,
        /// Target: a file (created when missing) or block device.
        target: PathBuf,
        /// Restore onto partition N of the target's partition table.
        #[arg(long, short)]
        partition: Option<u32>,
        /// Fetch and write every chunk, even those the target already holds.
        #[arg(long)]
        no_delta: bool,
        /// Overwrite a whole partitioned device with a partition image.
        #[arg(long)]
        force: bool,
        /// Worker threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        out: Output,
    },
    /// Check an image's chunks in the repository, or compare a target with it.
    Verify {
        /// Image name, or NAME@VERSION.
        name: String,
        /// Repository: a directory or an http(s):// URL.
        #[arg(long)]
        repo: String,
        /// Compare this file or device with the image instead.
        target: Option<PathBuf>,
        /// Compare partition N of the target.
        #[arg(long, short)]
        partition: Option<u32>,
        /// Worker threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        out: Output,
    },
    /// Describe an image.
    Info {
        /// Image name, or NAME@VERSION.
        name: String,
        /// Repository: a directory or an http(s):// URL.
        #[arg(long)]
        repo: String,
        /// Print the whole manifest.
        #[arg(long)]
        manifest: bool,
        #[command(flatten)]
        out: Output,
    },
    /// List the images in a repository.
    List {
        /// Repository: a directory or an http(s):// URL.
        #[arg(long)]
        repo: String,
        #[command(flatten)]
        out: Output,
    },
    /// Delete an image (all versions) from a repository.
    Delete {
        /// Image name.
        name: String,
        /// Repository: a directory or an http(s):// URL.
        #[arg(long)]
        repo: String,
    },
}

/// Errors that are the caller's fault: exit code 2.
#[derive(Debug)]
struct Usage(String);
impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(msg.into()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AULA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aula-imager: error: {e:#}");
            if e.downcast_ref::<Usage>().is_some()
                || matches!(
                    e.downcast_ref::<aula_imager::Error>(),
                    Some(aula_imager::Error::InvalidName(_))
                )
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn open_repo(spec: &str, create: bool) -> Result<Box<dyn Repository>> {
    if spec.starts_with("http://") || spec.starts_with("https://") {
        bail!(usage(format!(
            "HTTP repositories are not available in this build: {spec}"
        )));
    }
    let repo = LocalRepo::open(Path::new(spec), create)
        .with_context(|| format!("opening repository {spec}"))?;
    Ok(Box::new(repo))
}

/// Open a source or target and select the region to work on.
fn select_region(dev: Device, partition: Option<u32>) -> Result<(Region, Option<String>)> {
    let dev = Arc::new(dev);
    let hint = (dev.kind() == DeviceKind::Block).then(|| dev.sector_size());
    let path = dev.path().display().to_string();
    let table = aula_imager::table::read(dev.as_ref(), hint)
        .with_context(|| format!("reading the partition table of {path}"))?;
    match partition {
        None => Ok((Region::whole(dev), None)),
        Some(n) => {
            let t = table.ok_or_else(|| {
                usage(format!(
                    "{path} has no partition table, so it has no partition {n}"
                ))
            })?;
            let p = t.partition(n).ok_or_else(|| {
                let have: Vec<String> = t.partitions.iter().map(|p| p.number.to_string()).collect();
                usage(format!(
                    "{path} has no partition {n} (it has: {})",
                    have.join(", ")
                ))
            })?;
            if p.extended {
                bail!(usage(format!(
                    "partition {n} of {path} is an extended container; pick a logical partition"
                )));
            }
            Ok((Region::new(dev, p.start, p.size)?, Some(p.ptype.clone())))
        }
    }
}

fn has_table(r: &Region) -> bool {
    let hint = (r.device().kind() == DeviceKind::Block).then(|| r.device().sector_size());
    matches!(
        aula_imager::table::read(r.device().as_ref(), hint),
        Ok(Some(_)) | Err(_)
    )
}

/// Shows progress while a job runs: a bar on a terminal, plain lines
/// otherwise, JSON lines with `--json`.
struct Reporter {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    fn start(progress: Arc<Progress>, out: &Output) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let mode = if out.json {
            Mode::Json
        } else if out.quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Plain
        };
        let s2 = stop.clone();
        let handle = std::thread::spawn(move || report_loop(progress, mode, s2));
        Reporter {
            stop,
            handle: Some(handle),
        }
    }
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Json,
    Quiet,
    Bar,
    Plain,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn plain_line(e: &ProgressEvent) -> String {
    let pct = if e.bytes_total > 0 {
        100.0 * e.bytes_done as f64 / e.bytes_total as f64
    } else {
        0.0
    };
    let mut s = format!(
        "{}: {} of {} ({pct:.0}%), {:.1} MiB/s",
        e.phase,
        mib(e.bytes_done),
        mib(e.bytes_total),
        e.rate_bps / 1048576.0
    );
    if e.bytes_skipped > 0 {
        s.push_str(&format!(", {} already in place", mib(e.bytes_skipped)));
    }
    if let Some(eta) = e.eta_s {
        s.push_str(&format!(", ETA {eta:.0} s"));
    }
    s
}

fn report_loop(progress: Arc<Progress>, mode: Mode, stop: Arc<AtomicBool>) {
    let bar = (mode == Mode::Bar).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>8} [{bar:40.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    let tick = Duration::from_millis(match mode {
        Mode::Json => 500,
        Mode::Plain => 2000,
        _ => 100,
    });
    // JSON and bars report at once; plain lines only once a job runs long.
    let mut last = match mode {
        Mode::Plain => std::time::Instant::now(),
        _ => std::time::Instant::now()
            .checked_sub(tick)
            .unwrap_or_else(std::time::Instant::now),
    };
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping || last.elapsed() >= tick {
            last = std::time::Instant::now();
            let e = progress.snapshot();
            match mode {
                Mode::Json => {
                    if let Ok(s) = serde_json::to_string(
                        &serde_json::json!({"event": "progress", "progress": e}),
                    ) {
                        println!("{s}");
                    }
                }
                Mode::Plain if !stopping && e.bytes_total > 0 => eprintln!("{}", plain_line(&e)),
                Mode::Bar => {
                    if let Some(b) = &bar {
                        b.set_prefix(e.phase.clone());
                        b.set_length(e.bytes_total);
                        b.set_position(e.bytes_done);
                        if e.bytes_skipped > 0 {
                            b.set_message(format!("({} in place)", mib(e.bytes_skipped)));
                        }
                    }
                }
                _ => {}
            }
        }
        if stopping {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

fn install_ctrlc(progress: Arc<Progress>) {
    let hits = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let _ = ctrlc::set_handler(move || {
        if hits.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!("\naula-imager: stopping after the chunks in flight (Ctrl-C again to abort at once)");
            progress.cancel();
        } else {
            std::process::exit(130);
        }
    });
}

fn print_result(out: &Output, value: serde_json::Value, human: String) {
    if out.json {
        println!(
            "{}",
            serde_json::json!({"event": "result", "result": value})
        );
    } else {
        println!("{human}");
    }
}

fn cancelled_hint(e: anyhow::Error, what: &str) -> anyhow::Error {
    if matches!(
        e.downcast_ref::<aula_imager::Error>(),
        Some(aula_imager::Error::Cancelled)
    ) {
        anyhow!(
            "{what} cancelled; run the same command again to finish it (work already done is kept)"
        )
    } else {
        e
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Create {
            source,
            repo,
            name,
            partition,
            raw,
            force,
            level,
            chunk_kib,
            threads,
            description,
            out,
        } => {
            aula_imager::manifest::validate_name(&name)?;
            let chunk_size = chunk_kib
                .checked_mul(1024)
                .filter(|c| c.is_power_of_two() && (64 << 10..=64 << 20).contains(c))
                .ok_or_else(|| usage("--chunk-kib must be a power of two between 64 and 65536"))?;
            let dev = Device::open_read(&source)
                .with_context(|| format!("opening {}", source.display()))?;
            let sector_size = dev.sector_size();
            let (region, ptype) = select_region(dev, partition)?;
            if partition.is_none() && !raw && has_table(&region) {
                bail!(usage(format!(
                    "{} holds a partition table: image one partition with --partition N, or every byte with --raw",
                    source.display()
                )));
            }
            let repo = open_repo(&repo, true)?;
            let opts = CreateOptions {
                chunk_size,
                level,
                threads: threads.unwrap_or_else(aula_imager::pool::default_threads),
                raw,
                force,
                description,
            };
            let progress = Arc::new(Progress::new());
            install_ctrlc(progress.clone());
            let rep = Reporter::start(progress.clone(), &out);
            let t0 = std::time::Instant::now();
            let res = aula_imager::create::create_partition(
                &name,
                &region,
                &SourceInfo {
                    sector_size,
                    partition_type: ptype,
                },
                repo.as_ref(),
                &opts,
                &progress,
            );
            rep.finish();
            let m = res.map_err(|e| cancelled_hint(e.into(), "create"))?;
            let secs = t0.elapsed().as_secs_f64();
            let stored = m.stored_bytes();
            print_result(
                &out,
                serde_json::json!({
                    "name": m.name, "version": m.image_version, "used_bytes": m.used_bytes,
                    "stored_bytes": stored, "chunks": m.chunks.len(), "map": m.map,
                    "filesystem": m.filesystem, "seconds": secs,
                }),
                format!(
                    "created {}@{}: {} used ({} map{}), {} stored, {} chunks, {:.1} s ({:.0} MiB/s)",
                    m.name,
                    m.image_version,
                    mib(m.used_bytes),
                    m.map,
                    m.filesystem.as_ref().map(|f| format!(", {}", f.fstype)).unwrap_or_default(),
                    mib(stored),
                    m.chunks.len(),
                    secs,
                    m.used_bytes as f64 / 1048576.0 / secs.max(1e-9)
                ),
            );
            Ok(())
        }
        Cmd::Restore {
            name,
            repo,
            target,
            partition,
            no_delta,
            force,
            threads,
            out,
        } => {
            let (name, version) = parse_image_ref(&name)?;
            let repo = open_repo(&repo, false)?;
            let m = repo
                .manifest(&name, version)
                .with_context(|| format!("reading image {name}"))?;
            let created = !target.exists();
            let mut dev = Device::open(
                &target,
                OpenMode {
                    write: true,
                    create: created,
                    exclusive: false,
                },
            )
            .with_context(|| format!("opening {}", target.display()))?;
            if dev.kind() == DeviceKind::Block {
                // Re-open exclusively: the kernel refuses while a partition
                // of the disk is mounted or held.
                drop(dev);
                dev = Device::open(
                    &target,
                    OpenMode {
                        write: true,
                        create: false,
                        exclusive: true,
                    },
                )
                .with_context(|| {
                    format!(
                        "opening {} exclusively (is a partition mounted?)",
                        target.display()
                    )
                })?;
            }
            if created {
                dev.grow_to(m.source_size)
                    .with_context(|| format!("sizing {}", target.display()))?;
            }
            let (region, _) = select_region(dev, partition)?;
            if partition.is_none() && !force && !created && has_table(&region) {
                bail!(usage(format!(
                    "{} holds a partition table: restore onto --partition N, or pass --force to overwrite the whole device",
                    target.display()
                )));
            }
            let opts = RestoreOptions {
                threads: threads.unwrap_or_else(aula_imager::pool::default_threads),
                delta: !no_delta,
            };
            let progress = Arc::new(Progress::new());
            install_ctrlc(progress.clone());
            let rep = Reporter::start(progress.clone(), &out);
            let t0 = std::time::Instant::now();
            let res = aula_imager::restore::restore_partition(
                &m,
                &region,
                repo.as_ref(),
                &opts,
                &progress,
            );
            rep.finish();
            let s = res.map_err(|e| cancelled_hint(e.into(), "restore"))?;
            let secs = t0.elapsed().as_secs_f64();
            print_result(
                &out,
                serde_json::json!({"name": m.name, "version": m.image_version, "stats": s, "seconds": secs}),
                format!(
                    "restored {}@{} onto {}: {} used, {} fetched, {} already in place ({} of {} chunks skipped), {:.1} s ({:.0} MiB/s)",
                    m.name,
                    m.image_version,
                    target.display(),
                    mib(s.bytes_used),
                    mib(s.bytes_fetched),
                    mib(s.bytes_skipped),
                    s.chunks_skipped,
                    s.chunks,
                    secs,
                    s.bytes_used as f64 / 1048576.0 / secs.max(1e-9)
                ),
            );
            Ok(())
        }
        Cmd::Verify {
            name,
            repo,
            target,
            partition,
            threads,
            out,
        } => {
            let (name, version) = parse_image_ref(&name)?;
            let repo = open_repo(&repo, false)?;
            let m = repo
                .manifest(&name, version)
                .with_context(|| format!("reading image {name}"))?;
            let threads = threads.unwrap_or_else(aula_imager::pool::default_threads);
            let progress = Arc::new(Progress::new());
            install_ctrlc(progress.clone());
            match target {
                None => {
                    if partition.is_some() {
                        bail!(usage("--partition needs a TARGET"));
                    }
                    let rep = Reporter::start(progress.clone(), &out);
                    let res =
                        aula_imager::verify::verify_repo(&m, repo.as_ref(), threads, &progress);
                    rep.finish();
                    let r = res?;
                    for (id, why) in &r.bad {
                        eprintln!("bad chunk {id}: {why}");
                    }
                    print_result(
                        &out,
                        serde_json::to_value(&r).unwrap_or_default(),
                        format!(
                            "{}@{}: {} chunks checked, {} bad",
                            m.name,
                            m.image_version,
                            r.chunks_checked,
                            r.bad.len()
                        ),
                    );
                    if !r.bad.is_empty() {
                        bail!(
                            "{} chunk(s) of {} are missing or corrupt",
                            r.bad.len(),
                            m.name
                        );
                    }
                }
                Some(t) => {
                    let dev = Device::open_read(&t)
                        .with_context(|| format!("opening {}", t.display()))?;
                    let (region, _) = select_region(dev, partition)?;
                    let rep = Reporter::start(progress.clone(), &out);
                    let res = aula_imager::verify::compare_target(&m, &region, threads, &progress);
                    rep.finish();
                    let r = res?;
                    print_result(
                        &out,
                        serde_json::to_value(&r).unwrap_or_default(),
                        format!(
                            "{} vs {}@{}: {} windows compared, {} differ ({})",
                            t.display(),
                            m.name,
                            m.image_version,
                            r.windows_checked,
                            r.windows_differing.len(),
                            mib(r.bytes_differing)
                        ),
                    );
                    if !r.windows_differing.is_empty() {
                        bail!(
                            "{} differs from {} in {} window(s)",
                            t.display(),
                            m.name,
                            r.windows_differing.len()
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Info {
            name,
            repo,
            manifest,
            out,
        } => {
            let (name, version) = parse_image_ref(&name)?;
            let repo = open_repo(&repo, false)?;
            let m = repo
                .manifest(&name, version)
                .with_context(|| format!("reading image {name}"))?;
            if manifest {
                println!("{}", String::from_utf8_lossy(&m.to_json()));
            } else if out.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info_json(&m)).unwrap_or_default()
                );
            } else {
                print!("{}", info_text(&m));
            }
            Ok(())
        }
        Cmd::List { repo, out } => {
            let repo = open_repo(&repo, false)?;
            let images = repo.list()?;
            if out.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&images).unwrap_or_default()
                );
            } else {
                println!(
                    "{:<24} {:>4} {:<9} {:<6} {:>11} {:>11} {:>11}  created",
                    "NAME", "VER", "KIND", "FS", "SIZE", "USED", "STORED"
                );
                for i in images {
                    println!(
                        "{:<24} {:>4} {:<9} {:<6} {:>11} {:>11} {:>11}  {}",
                        i.name,
                        i.version,
                        format!("{:?}", i.kind).to_lowercase(),
                        i.filesystem.unwrap_or_else(|| "-".into()),
                        mib(i.source_size),
                        mib(i.used_bytes),
                        mib(i.stored_bytes),
                        i.created
                    );
                }
            }
            Ok(())
        }
        Cmd::Delete { name, repo } => {
            aula_imager::manifest::validate_name(&name)?;
            let repo = open_repo(&repo, false)?;
            repo.delete(&name)?;
            println!("deleted {name}");
            Ok(())
        }
    }
}

fn info_json(m: &Manifest) -> serde_json::Value {
    let zero = m.chunks.iter().filter(|c| c.id.is_none()).count();
    serde_json::json!({
        "name": m.name, "version": m.image_version, "created": m.created, "tool": m.tool,
        "kind": m.kind, "source_size": m.source_size, "sector_size": m.sector_size,
        "filesystem": m.filesystem, "partition_type": m.partition_type, "map": m.map,
        "used_bytes": m.total_used_bytes(), "extents": m.used.len(), "chunk_size": m.chunk_size,
        "chunks": m.chunks.len(), "zero_chunks": zero, "distinct_chunks": m.unique_chunks().len(),
        "stored_bytes": m.stored_bytes(), "compression": m.compression, "hash": m.hash,
        "description": m.description,
        "partitions": m.partitions.iter().map(|p| serde_json::json!({
            "number": p.number, "start": p.start, "size": p.size,
            "filesystem": p.image.filesystem, "used_bytes": p.image.used_bytes,
        })).collect::<Vec<_>>(),
    })
}

fn info_text(m: &Manifest) -> String {
    let mut s = String::new();
    let zero = m.chunks.iter().filter(|c| c.id.is_none()).count();
    let stored = m.stored_bytes();
    let used = m.total_used_bytes();
    s += &format!("name:         {}@{}\n", m.name, m.image_version);
    s += &format!("kind:         {:?}\n", m.kind);
    s += &format!("created:      {} by {}\n", m.created, m.tool);
    s += &format!(
        "source size:  {} ({} bytes, {}-byte sectors)\n",
        mib(m.source_size),
        m.source_size,
        m.sector_size
    );
    if let Some(f) = &m.filesystem {
        s += &format!(
            "filesystem:   {} label={} uuid={}\n",
            f.fstype,
            f.label.as_deref().unwrap_or("-"),
            f.uuid.as_deref().unwrap_or("-")
        );
    }
    if let Some(t) = &m.partition_type {
        s += &format!("part. type:   {t}\n");
    }
    s += &format!("used map:     {} ({} extents)\n", m.map, m.used.len());
    s += &format!("used:         {}\n", mib(used));
    s += &format!(
        "chunks:       {} of {} KiB ({} zero, {} distinct stored)\n",
        m.chunks.len(),
        m.chunk_size / 1024,
        zero,
        m.unique_chunks().len()
    );
    s += &format!(
        "stored:       {} (zstd level {}, {:.2}x of used)\n",
        mib(stored),
        m.compression.level,
        if stored > 0 {
            used as f64 / stored as f64
        } else {
            0.0
        }
    );
    for p in &m.partitions {
        s += &format!(
            "partition {}:  start {} size {} {} used {}\n",
            p.number,
            p.start,
            mib(p.size),
            p.image
                .filesystem
                .as_ref()
                .map(|f| f.fstype.as_str())
                .unwrap_or("-"),
            mib(p.image.used_bytes)
        );
    }
    if let Some(d) = &m.description {
        s += &format!("description:  {d}\n");
    }
    s
}

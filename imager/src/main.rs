//! `aula-imager` command-line interface: parses arguments and calls the
//! library. Exit codes: 0 ok, 1 failure, 2 usage.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use aula_imager::create::CreateOptions;
use aula_imager::device::{Device, DeviceKind, OpenMode};
use aula_imager::manifest::ImageKind;
use aula_imager::manifest::Manifest;
use aula_imager::progress::{Progress, ProgressEvent};
use aula_imager::repo::{
    parse_image_ref, CachedRepo, HttpOptions, HttpRepo, LocalRepo, Repository, S3Config,
    S3Credentials, S3Repo,
};
use aula_imager::restore::RestoreOptions;
use aula_imager::tls::ServerTrust;
use clap::{Args, Parser, Subcommand};

mod cli_import;

#[derive(Parser)]
#[command(
    name = "aula-imager",
    version,
    about = "Create, restore and verify Aula disk and partition images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    net: NetOpts,
}

/// How to reach an http(s):// repository.
#[derive(Args, Clone, Default)]
struct NetOpts {
    /// Trust an https:// repository by its certificate's SHA-256
    /// (sha256:<hex>, as on the live system's aula.server_fp=). Also read from
    /// AULA_SERVER_FP.
    #[arg(long, global = true)]
    server_fp: Option<String>,
    /// Verify an https:// repository against this CA bundle (PEM).
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// File holding the repository's write token (else AULA_REPO_TOKEN).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// File holding the repository's read token, for a repository that
    /// needs one to read (else AULA_REPO_READ_TOKEN).
    #[arg(long, global = true)]
    read_token_file: Option<PathBuf>,
    /// Chunks fetched at once from a network repository.
    #[arg(long, global = true, default_value_t = 8)]
    parallel: usize,
    /// Give up on an unreachable repository after this many seconds.
    #[arg(long, global = true, default_value_t = 300)]
    retry_for: u64,
    /// For an s3://BUCKET/PREFIX repository: a file of AWS_ACCESS_KEY_ID=,
    /// AWS_SECRET_ACCESS_KEY=, AWS_ENDPOINT_URL= (comma-separated nodes)
    /// and AWS_REGION= lines (else those environment variables).
    #[arg(long, global = true, env = "AULA_S3_CREDENTIALS")]
    s3_credentials: Option<PathBuf>,
}

/// Swarm restore (see imager/FORMAT.md, "Swarm").
#[derive(Args, Clone)]
struct SwarmArgs {
    /// Restore together with the other machines restoring this image: fetch
    /// chunks from peers as the repository's coordinator assigns them, and
    /// serve the chunks this machine verified (needs an http(s) repository
    /// served by aula-bootserver; without its coordinator the restore uses
    /// the repository alone).
    #[arg(long, conflicts_with = "cache")]
    swarm: bool,
    /// Serve peers on this address.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:0")]
    swarm_listen: std::net::SocketAddr,
    /// Fetch from peers but serve nothing.
    #[arg(long)]
    swarm_no_serve: bool,
    /// After the restore, keep serving peers for up to SECS while other
    /// members still restore.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    linger: u64,
    /// RAM kept for verified chunks to serve peers, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    swarm_cache_mib: usize,
    /// Uploads served to peers at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    swarm_slots: usize,
    /// Do not serve chunks by reading them back from the target (only from
    /// the RAM cache).
    #[arg(long)]
    swarm_no_target: bool,
}

/// Fetches at once of a swarm restore (each worker asks the coordinator
/// for one chunk at a time).
const SWARM_PARALLEL: usize = 4;

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
        /// Repository: a directory, an http(s):// URL or s3://BUCKET/PREFIX.
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
    /// Convert an OpenGnsys, Clonezilla or FOG image (or a whole store of
    /// them with --all) into an image of the repository.
    Import {
        /// A partclone image file (plain, gzip, lzop or zstd; the first of
        /// split parts), an http(s):// URL, `-` for standard input, a
        /// Clonezilla or FOG image directory, or with --all a store.
        source: String,
        /// Repository: a directory, an http(s):// URL or s3://BUCKET/PREFIX.
        #[arg(long)]
        repo: String,
        /// Image name (A-Z a-z 0-9 . _ -).
        #[arg(long, required_unless_present = "all")]
        name: Option<String>,
        /// Import every image of the store SOURCE (skips those already
        /// imported; run again to resume).
        #[arg(long)]
        all: bool,
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
    /// Restore an image onto a file, block device or partition. NAME may
    /// also be a legacy partclone image (file, first split part, Clonezilla
    /// or FOG directory of one partition, http(s):// URL, or `-` for
    /// standard input; plain, gzip, lzop or zstd), as OpenGnsys, Clonezilla
    /// and FOG store them.
    Restore {
        /// Image name, NAME@VERSION, or a partclone image file or URL.
        name: String,
        /// Repository: a directory, an http(s):// URL or s3://BUCKET/PREFIX.
        #[arg(long)]
        repo: Option<String>,
        /// Keep fetched chunks in this directory and use the ones it holds
        /// (e.g. the CACHE partition). Its manifests are used only when the
        /// repository served the same manifest earlier in this run, or with
        /// --offline.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// With --cache: take the manifest from the cache without asking the
        /// repository, even one the repository never confirmed.
        #[arg(long, requires = "cache")]
        offline: bool,
        /// Target: a file (created when missing) or block device.
        target: PathBuf,
        /// Restore onto partition N of the target's partition table.
        #[arg(long, short)]
        partition: Option<u32>,
        /// Fetch and write every chunk, even those the target already holds.
        #[arg(long)]
        no_delta: bool,
        /// Read and hash the target to find the chunks it holds, even when a
        /// restore record of this boot says what it holds.
        #[arg(long, conflicts_with = "no_delta")]
        scan: bool,
        /// Restore records directory (default: /run/aula/records for root,
        /// $XDG_RUNTIME_DIR/aula/records otherwise).
        #[arg(long, value_name = "DIR", env = "AULA_RECORDS")]
        records: Option<PathBuf>,
        /// Overwrite a whole partitioned device with a partition image.
        #[arg(long)]
        force: bool,
        /// Worker threads (default: two per CPU and at least 8 from a directory, at least
        /// 8 over HTTP(S), 16 from S3; with --swarm, 4 fetches at once).
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        swarm: SwarmArgs,
        #[command(flatten)]
        out: Output,
    },
    /// Check an image's chunks in the repository, or compare a target with it.
    Verify {
        /// Image name, or NAME@VERSION.
        name: String,
        /// Repository: a directory, an http(s):// URL or s3://BUCKET/PREFIX.
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
    /// Describe an image (or a legacy partclone image file or URL).
    Info {
        /// Image name, NAME@VERSION, or a partclone image file or URL.
        name: String,
        /// Repository: a directory, an http(s):// URL or s3://BUCKET/PREFIX.
        #[arg(long)]
        repo: Option<String>,
        /// Print the whole manifest.
        #[arg(long)]
        manifest: bool,
        #[command(flatten)]
        out: Output,
    },
    /// List the images in a repository.
    List {
        /// Repository: a directory, an http(s):// URL or s3://BUCKET/PREFIX.
        #[arg(long)]
        repo: String,
        #[command(flatten)]
        out: Output,
    },
    /// List this machine's disks in OpenGnsys `dsk` order, or describe a
    /// disk image file.
    Disks {
        /// Describe this disk image file or block device instead.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the device path of disk number N (1-based).
        #[arg(long)]
        dsk: Option<u32>,
        /// Include loop, RAM, network and device-mapper devices.
        #[arg(long)]
        all: bool,
        /// Include read-only media.
        #[arg(long)]
        read_only: bool,
        /// Compute used space per filesystem (slower).
        #[arg(long)]
        usage: bool,
        /// Do not look at filesystems.
        #[arg(long)]
        no_fs: bool,
        /// Logical sector size of a disk image file.
        #[arg(long)]
        sector_size: Option<u32>,
        #[command(flatten)]
        out: Output,
    },
    /// Partition a disk or disk image file and make its filesystems.
    Partition {
        /// The disk (block device or image file); or use --dsk.
        device: Option<PathBuf>,
        /// Disk number N (1-based, as `disks` lists them).
        #[arg(long)]
        dsk: Option<u32>,
        /// Native layout (JSON; see the disk::layout documentation).
        #[arg(long, conflicts_with = "opengnsys")]
        layout: Option<PathBuf>,
        /// An OpenGnsys `setup` (Configurar) body, or @FILE.
        #[arg(long)]
        opengnsys: Option<String>,
        /// Logical sector size of a disk image file.
        #[arg(long)]
        sector_size: Option<u32>,
        /// Show the plan without writing anything.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Copy a directory repository into an S3 bucket (resumable: what the
    /// bucket holds already is skipped).
    Migrate {
        /// The directory repository.
        from: PathBuf,
        /// The bucket: s3://BUCKET[/PREFIX].
        to: String,
        /// Uploads at once.
        #[arg(long, default_value_t = 16)]
        threads: usize,
        #[command(flatten)]
        out: Output,
    },
    /// Collect garbage in an S3 repository: remove chunks no image version
    /// references and older than the grace period, unless an upload is in
    /// progress. (A directory repository is collected by its boot server.)
    Gc {
        /// Repository: s3://BUCKET[/PREFIX].
        #[arg(long)]
        repo: String,
        /// Unreferenced chunks younger than this many seconds are kept.
        #[arg(long, default_value_t = 3600)]
        grace: u64,
    },
    /// Delete an image (all versions) from a repository.
    Delete {
        /// Image name.
        name: String,
        /// Repository: a directory, an http(s):// URL or s3://BUCKET/PREFIX.
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
            // Wake the reporter from its pause so it reports and ends now.
            h.thread().unpark();
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
        std::thread::park_timeout(Duration::from_millis(50));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// Set by Ctrl-C: the legacy restore and HTTP downloads poll it; pipelines
/// also see it through `Progress::cancel`.
fn cancel_flag() -> &'static Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

fn install_ctrlc(progress: Arc<Progress>) {
    let hits = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let _ = ctrlc::set_handler(move || {
        if hits.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!("\naula-imager: stopping after the chunks in flight (Ctrl-C again to abort at once)");
            cancel_flag().store(true, Ordering::SeqCst);
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

/// Run a job with the progress view and Ctrl-C handling; returns its
/// result and how many seconds it took.
fn run_job<T, E>(
    out: &Output,
    what: &str,
    job: impl FnOnce(&Arc<Progress>) -> std::result::Result<T, E>,
) -> Result<(T, f64)>
where
    E: Into<anyhow::Error>,
{
    let progress = Arc::new(Progress::new());
    install_ctrlc(progress.clone());
    let rep = Reporter::start(progress.clone(), out);
    let t0 = std::time::Instant::now();
    let res = job(&progress);
    rep.finish();
    let v = res.map_err(|e| cancelled_hint(e.into(), what))?;
    Ok((v, t0.elapsed().as_secs_f64()))
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
    let net = cli.net;
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
            cli_import::refuse_legacy_source(&source)?;
            let chunk_size = chunk_kib
                .checked_mul(1024)
                .filter(|c| c.is_power_of_two() && (64 << 10..=64 << 20).contains(c))
                .ok_or_else(|| usage("--chunk-kib must be a power of two between 64 and 65536"))?;
            let dev = Device::open_read(&source)
                .with_context(|| format!("opening {}", source.display()))?;
            let dev = Arc::new(dev);
            if let Some(n) = partition {
                aula_imager::image::find_partition(&dev, n).map_err(|e| usage(e.to_string()))?;
            }
            let repo = open_repo(&repo, true, &net)?;
            let opts = CreateOptions {
                chunk_size,
                level,
                threads: threads.unwrap_or_else(aula_imager::pool::default_threads),
                raw,
                force,
                description,
            };
            let (m, secs) = run_job(&out, "create", |p| {
                aula_imager::image::create_image(&name, dev, partition, repo.as_ref(), &opts, p)
            })?;
            let stored = m.stored_bytes();
            print_result(
                &out,
                serde_json::json!({
                    "name": m.name, "version": m.image_version, "kind": m.kind, "used_bytes": m.total_used_bytes(),
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
            cache,
            offline,
            target,
            partition,
            no_delta,
            scan,
            records,
            force,
            threads,
            swarm,
            out,
        } => {
            if is_legacy_ref(&name) {
                if swarm.swarm {
                    bail!(usage(
                        "--swarm restores images of a repository, not legacy image files"
                    ));
                }
                return restore_legacy(&name, &target, partition, force, &out, &net);
            }
            let (name, version) = parse_image_ref(&name)?;
            let repo =
                repo.ok_or_else(|| usage("--repo is required to restore an image by name"))?;
            let (repo, http): (Arc<dyn Repository>, Option<Arc<HttpRepo>>) = if swarm.swarm {
                if !is_url(&repo) {
                    bail!(usage(
                        "--swarm needs an http(s):// repository served by aula-bootserver"
                    ));
                }
                let h = Arc::new(
                    HttpRepo::new(&repo, http_options(&net)?)
                        .with_context(|| format!("repository {repo}"))?,
                );
                (h.clone(), Some(h))
            } else {
                let mut r: Box<dyn Repository> = open_repo(&repo, false, &net)?;
                if let Some(dir) = &cache {
                    let c = LocalRepo::open(dir, true)
                        .with_context(|| format!("opening the cache {}", dir.display()))?;
                    r = Box::new(CachedRepo::new(r, c).offline(offline));
                }
                (Arc::from(r), None)
            };
            let m = repo
                .manifest(&name, version)
                .with_context(|| format!("reading image {name}"))?;
            let dev = open_target(
                &target,
                m.source_size,
                partition,
                force,
                m.kind == ImageKind::Partition,
            )?;
            let member = match &http {
                Some(h) => join_swarm(h, &m, &swarm),
                None => None,
            };
            let opts = RestoreOptions {
                threads: threads.unwrap_or_else(|| match &member {
                    Some(_) => SWARM_PARALLEL,
                    None => repo.preferred_threads(),
                }),
                delta: !no_delta,
                records: records.or_else(aula_imager::record::default_dir),
                scan,
                feed: member
                    .clone()
                    .map(|s| s as Arc<dyn aula_imager::restore::Feed>),
            };
            let res = run_job(&out, "restore", |p| {
                aula_imager::image::restore_image(&m, dev, partition, repo.as_ref(), &opts, p)
            });
            let (s, secs) = match res {
                Ok(v) => v,
                Err(e) => {
                    if let Some(sw) = &member {
                        sw.leave();
                    }
                    return Err(e);
                }
            };
            let swarm_json = member.as_ref().map(|sw| sw.stats());
            print_result(
                &out,
                serde_json::json!({"name": m.name, "version": m.image_version, "stats": s, "seconds": secs, "swarm": swarm_json}),
                format!(
                    "restored {}@{} onto {}: {} used, {} fetched{}, {} already in place ({} of {} chunks skipped{}), {:.1} s ({:.0} MiB/s)",
                    m.name,
                    m.image_version,
                    target.display(),
                    mib(s.bytes_used),
                    mib(s.bytes_fetched),
                    if member.is_some() {
                        format!(
                            " ({} from the server, {} from peers)",
                            mib(s.bytes_from_server),
                            mib(s.bytes_from_peers)
                        )
                    } else {
                        String::new()
                    },
                    mib(s.bytes_skipped),
                    s.chunks_skipped,
                    s.chunks,
                    if s.chunks_unread > 0 {
                        format!(", {} known from this boot's restore record without reading", s.chunks_unread)
                    } else {
                        String::new()
                    },
                    secs,
                    s.bytes_used as f64 / 1048576.0 / secs.max(1e-9)
                ),
            );
            if let Some(sw) = member {
                sw.finish();
                sw.linger(Duration::from_secs(swarm.linger), || {
                    cancel_flag().load(Ordering::Relaxed)
                });
                sw.leave();
                let st = sw.stats();
                if out.json {
                    println!("{}", serde_json::json!({"event": "swarm", "swarm": st}));
                } else if !out.quiet {
                    eprintln!(
                        "swarm {}: served {} chunks ({}) to peers; {} peer fetches failed{}",
                        st.session,
                        st.served.chunks_served,
                        mib(st.served.bytes_served),
                        st.peer_failures,
                        if st.avoided.is_empty() {
                            String::new()
                        } else {
                            format!(" (avoided: {})", st.avoided.join(", "))
                        }
                    );
                }
            }
            Ok(())
        }
        Cmd::Import {
            source,
            repo,
            name,
            all,
            level,
            chunk_kib,
            threads,
            description,
            out,
        } => cli_import::cmd_import(
            &source,
            cli_import::ImportArgs {
                repo,
                name,
                all,
                level,
                chunk_kib,
                threads,
                description,
            },
            &out,
            &net,
        ),
        Cmd::Verify {
            name,
            repo,
            target,
            partition,
            threads,
            out,
        } => {
            let (name, version) = parse_image_ref(&name)?;
            let repo = open_repo(&repo, false, &net)?;
            let m = repo
                .manifest(&name, version)
                .with_context(|| format!("reading image {name}"))?;
            let threads = threads.unwrap_or_else(|| repo.preferred_threads());
            match target {
                None => {
                    if partition.is_some() {
                        bail!(usage("--partition needs a TARGET"));
                    }
                    let (r, _) = run_job(&out, "verify", |p| {
                        aula_imager::verify::verify_repo(&m, repo.as_ref(), threads, p)
                    })?;
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
                    let dev = Arc::new(dev);
                    let (r, _) = run_job(&out, "verify", |p| {
                        aula_imager::verify::compare_image(
                            &m,
                            dev,
                            partition,
                            repo.as_ref(),
                            threads,
                            p,
                        )
                    })?;
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
            if is_legacy_ref(&name) {
                return info_legacy(&name, &out, &net);
            }
            let (name, version) = parse_image_ref(&name)?;
            let repo =
                repo.ok_or_else(|| usage("--repo is required to describe an image by name"))?;
            let repo = open_repo(&repo, false, &net)?;
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
            let repo = open_repo(&repo, false, &net)?;
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
        Cmd::Disks {
            file,
            dsk,
            all,
            read_only,
            usage,
            no_fs,
            sector_size,
            out,
        } => cmd_disks(file, dsk, all, read_only, usage, no_fs, sector_size, &out),
        Cmd::Partition {
            device,
            dsk,
            layout,
            opengnsys,
            sector_size,
            dry_run,
            out,
        } => cmd_partition(device, dsk, layout, opengnsys, sector_size, dry_run, &out),
        Cmd::Migrate {
            from,
            to,
            threads,
            out,
        } => {
            let src = LocalRepo::open(&from, false)
                .with_context(|| format!("opening repository {}", from.display()))?;
            let dst = open_s3(&to, true, &net)?;
            let quiet = out.quiet || out.json;
            let report =
                aula_imager::repo::migrate_dir_to_s3(&src, &dst, threads, &|done, total| {
                    if !quiet {
                        eprintln!("aula-imager: migrate: {done}/{total} chunks copied");
                    }
                })
                .with_context(|| format!("migrating {} to {to}", from.display()))?;
            if out.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!(
                    "migrated {} into {to}: {} of {} chunks copied ({} bytes), {} of {} manifest versions",
                    from.display(),
                    report.chunks_copied,
                    report.chunks,
                    report.bytes_copied,
                    report.manifests_copied,
                    report.manifests
                );
            }
            Ok(())
        }
        Cmd::Gc { repo, grace } => {
            let s3 = open_s3(&repo, false, &net)?;
            let r = s3.gc(std::time::Duration::from_secs(grace))?;
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            Ok(())
        }
        Cmd::Delete { name, repo } => {
            aula_imager::manifest::validate_name(&name)?;
            let repo = open_repo(&repo, false, &net)?;
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
        "description": m.description, "origin": m.origin,
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
    if let Some(o) = &m.origin {
        s += &format!(
            "imported:     from {} {} on {} ({})\n",
            o.tool, o.source, o.imported, o.format
        );
        if !o.verified.is_empty() {
            s += &format!("verified:     {}\n", o.verified.join(", "));
        }
    }
    s
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

fn http_options(net: &NetOpts) -> Result<HttpOptions> {
    let fp = net
        .server_fp
        .clone()
        .or_else(|| std::env::var("AULA_SERVER_FP").ok());
    let trust = match (fp, &net.ca) {
        (Some(_), Some(_)) => bail!(usage("give --server-fp or --ca, not both")),
        (Some(fp), None) => ServerTrust::Pin(
            aula_imager::tls::parse_fingerprint(&fp).map_err(|e| usage(e.to_string()))?,
        ),
        (None, Some(ca)) => ServerTrust::CaFile(ca.clone()),
        (None, None) => ServerTrust::System,
    };
    let token_from = |file: &Option<PathBuf>, var: &str| -> Result<Option<String>> {
        Ok(match file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading the token file {}", p.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string(),
            )
            .filter(|t| !t.is_empty()),
            None => std::env::var(var).ok().filter(|t| !t.is_empty()),
        })
    };
    let token = token_from(&net.token_file, "AULA_REPO_TOKEN")?;
    let read_token = token_from(&net.read_token_file, "AULA_REPO_READ_TOKEN")?;
    Ok(HttpOptions {
        trust,
        token,
        read_token,
        retry_for: Duration::from_secs(net.retry_for),
        parallel: net.parallel.max(1),
        cancel: Some(cancel_flag().clone()),
        ..Default::default()
    })
}

/// Join the swarm of `m`; None (and a warning) when it cannot be joined:
/// the restore then uses the repository alone.
fn join_swarm(
    repo: &Arc<HttpRepo>,
    m: &Manifest,
    a: &SwarmArgs,
) -> Option<Arc<aula_imager::swarm::Swarm>> {
    let opts = aula_imager::swarm::SwarmOptions {
        listen: (!a.swarm_no_serve).then_some(a.swarm_listen),
        slots: a.swarm_slots.max(1),
        cache_bytes: a.swarm_cache_mib << 20,
        serve_from_target: !a.swarm_no_target,
        cancel: Some(cancel_flag().clone()),
        ..Default::default()
    };
    match aula_imager::swarm::Swarm::join(repo.clone(), m, opts) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!(
                "aula-imager: cannot join the swarm ({e}); restoring from the repository alone"
            );
            None
        }
    }
}

/// An s3://BUCKET/PREFIX repository, credentials from `--s3-credentials`
/// (or AULA_S3_CREDENTIALS) or the AWS_* environment variables.
fn open_s3(spec: &str, create: bool, net: &NetOpts) -> Result<S3Repo> {
    let (bucket, prefix) =
        aula_imager::repo::parse_s3_url(spec).map_err(|e| usage(e.to_string()))?;
    let creds = match &net.s3_credentials {
        Some(f) => S3Credentials::from_file(f)?,
        None => S3Credentials::from_env()?,
    };
    let cfg = S3Config {
        endpoints: creds.endpoints,
        bucket,
        prefix,
        region: creds.region.unwrap_or_else(|| "garage".into()),
        access_key: creds.access_key,
        secret_key: creds.secret_key,
        retry_for: std::time::Duration::from_secs(net.retry_for),
        timeout: std::time::Duration::from_secs(30),
        lease_ttl: std::time::Duration::from_secs(120),
    };
    S3Repo::open(cfg, create).with_context(|| format!("repository {spec}"))
}

fn open_repo(spec: &str, create: bool, net: &NetOpts) -> Result<Box<dyn Repository>> {
    if spec.starts_with("s3://") {
        return Ok(Box::new(open_s3(spec, create, net)?));
    }
    if is_url(spec) {
        let repo = HttpRepo::new(spec, http_options(net)?)
            .with_context(|| format!("repository {spec}"))?;
        return Ok(Box::new(repo));
    }
    let repo = LocalRepo::open(Path::new(spec), create)
        .with_context(|| format!("opening repository {spec}"))?;
    Ok(Box::new(repo))
}

/// True when NAME names a legacy image file or URL rather than an image in
/// a repository (image names cannot contain `/`).
fn is_legacy_ref(name: &str) -> bool {
    is_url(name) || name == "-" || name.contains('/') || Path::new(name).exists()
}

fn legacy_json(i: &aula_imager::legacy::PartcloneInfo) -> serde_json::Value {
    serde_json::json!({
        "legacy": "partclone", "filesystem": i.fs, "partclone_version": i.partclone_version,
        "device_size": i.device_size, "total_blocks": i.total_blocks, "used_blocks": i.used_blocks,
        "block_size": i.block_size, "used_bytes": i.used_bytes(), "checksum_mode": i.checksum_mode,
        "blocks_per_checksum": i.blocks_per_checksum, "compression": format!("{:?}", i.compression),
    })
}

fn info_legacy(name: &str, out: &Output, net: &NetOpts) -> Result<()> {
    let (s, _) = cli_import::open_legacy(name, net)?;
    let i = s.info();
    if out.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&legacy_json(i)).unwrap_or_default()
        );
        return Ok(());
    }
    println!("legacy partclone image {name}");
    println!("filesystem:   {} (partclone {})", i.fs, i.partclone_version);
    println!("compression:  {:?}", i.compression);
    println!(
        "device size:  {} ({} bytes)",
        mib(i.device_size),
        i.device_size
    );
    println!(
        "blocks:       {} used of {} ({} bytes each)",
        i.used_blocks, i.total_blocks, i.block_size
    );
    println!("used:         {}", mib(i.used_bytes()));
    let sums = if i.checksum_mode == 0 {
        "none".to_string()
    } else {
        format!("CRC32 every {} blocks", i.blocks_per_checksum)
    };
    println!("checksums:    {sums}");
    Ok(())
}

/// Open a restore target: created when missing (sized `size`), exclusive
/// for block devices. A partition image over a whole partitioned device
/// needs --force; --partition N must exist.
fn open_target(
    target: &Path,
    size: u64,
    partition: Option<u32>,
    force: bool,
    partition_image: bool,
) -> Result<Arc<Device>> {
    let created = !target.exists();
    let mut dev = Device::open(
        target,
        OpenMode {
            write: true,
            create: created,
            exclusive: false,
        },
    )
    .with_context(|| format!("opening {}", target.display()))?;
    if dev.kind() == DeviceKind::Block {
        // Re-open exclusively: the kernel refuses while a partition of the
        // disk is mounted or held.
        drop(dev);
        dev = Device::open(
            target,
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
        dev.grow_to(size)
            .with_context(|| format!("sizing {}", target.display()))?;
    }
    let dev = Arc::new(dev);
    match partition {
        Some(n) => {
            aula_imager::image::find_partition(&dev, n).map_err(|e| usage(e.to_string()))?;
        }
        None if partition_image
            && !force
            && !created
            && aula_imager::image::read_table(&dev).map_or(true, |t| t.is_some()) =>
        {
            bail!(usage(format!(
                "{} holds a partition table: restore onto --partition N, or pass --force to overwrite the whole device",
                target.display()
            )));
        }
        None => {}
    }
    Ok(dev)
}

fn restore_legacy(
    name: &str,
    target: &Path,
    partition: Option<u32>,
    force: bool,
    out: &Output,
    net: &NetOpts,
) -> Result<()> {
    let (stream, pos) = cli_import::open_legacy(name, net)?;
    let info = stream.info().clone();
    let dev = open_target(target, info.device_size, partition, force, true)?;
    let (region, _) = aula_imager::image::region_of(&dev, partition)?;
    let (s, secs) = run_job(out, "restore", |p| {
        p.start_phase("restore", info.used_bytes());
        let mut last = 0u64;
        stream
            .restore_to(
                &region,
                &mut |done| {
                    p.add_done(done.saturating_sub(last));
                    p.add_written(done.saturating_sub(last));
                    last = done;
                },
                cancel_flag(),
            )
            .with_context(|| match &pos {
                Some(p) => format!("restoring {name} (reading {})", p.current().1),
                None => format!("restoring {name}"),
            })
    })?;
    print_result(
        out,
        serde_json::json!({"legacy": legacy_json(&info), "stats": s, "seconds": secs}),
        format!(
            "restored legacy {} image {name} onto {}: {} in {} blocks, {} checksum strips verified, {:.1} s ({:.0} MiB/s)",
            info.fs,
            target.display(),
            mib(s.bytes_written),
            s.blocks_written,
            s.strips_verified,
            secs,
            s.bytes_written as f64 / 1048576.0 / secs.max(1e-9)
        ),
    );
    Ok(())
}

fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    }
}

fn print_disk(d: &aula_imager::disk::DiskInfo) {
    let num = d.dsk.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "disk {num}  {}  {}  {:?}  {}/{}  {}  {}",
        d.path.display(),
        gib(d.size),
        d.transport,
        d.logical_sector_size,
        d.physical_sector_size,
        d.model
            .as_deref()
            .map(|m| format!("{m:?}"))
            .unwrap_or_else(|| "-".into()),
        d.serial.as_deref().unwrap_or("-")
    );
    match &d.table {
        Some(t) => println!("        {:?}  {}", t.kind, t.disk_id),
        None => println!("        no partition table"),
    }
    for p in &d.partitions {
        println!(
            "   {:<2} {:>10} {:>10}  {:<5} {:<24} {:<6} {}{}",
            p.number,
            gib(p.start),
            gib(p.size),
            p.code.as_deref().unwrap_or("-"),
            p.type_name.as_deref().unwrap_or(&p.ptype),
            p.filesystem.as_deref().unwrap_or("-"),
            p.label
                .as_deref()
                .map(|l| format!("{l:?}"))
                .unwrap_or_default(),
            p.used
                .map(|u| format!("  used {}", gib(u)))
                .unwrap_or_default()
        );
        if let Some(e) = &p.error {
            println!("        partition {}: {e}", p.number);
        }
    }
    for w in &d.warnings {
        println!("        warning: {w}");
    }
}

#[allow(clippy::too_many_arguments)]
fn cmd_disks(
    file: Option<PathBuf>,
    dsk: Option<u32>,
    all: bool,
    read_only: bool,
    usage: bool,
    no_fs: bool,
    sector_size: Option<u32>,
    out: &Output,
) -> Result<()> {
    use aula_imager::disk;
    if let Some(n) = dsk {
        let p = disk::resolve_dsk_with(
            n,
            &disk::InventoryOptions {
                include_virtual: all,
                include_read_only: read_only,
                ..Default::default()
            },
        )?;
        println!("{}", p.display());
        return Ok(());
    }
    if let Some(f) = file {
        let d = disk::inspect(&f, &disk::InspectOptions { sector_size, usage })?;
        if out.json {
            println!("{}", serde_json::to_string_pretty(&d)?);
        } else {
            print_disk(&d);
        }
        return Ok(());
    }
    let opts = disk::InventoryOptions {
        include_virtual: all,
        include_read_only: read_only,
        usage,
        filesystems: !no_fs,
        ..Default::default()
    };
    let disks = disk::inventory(&opts)?;
    if out.json {
        println!("{}", serde_json::to_string_pretty(&disks)?);
    } else if disks.is_empty() {
        println!("no disks (loop and RAM devices are listed with --all)");
    } else {
        for d in &disks {
            print_disk(d);
        }
    }
    Ok(())
}

fn cmd_partition(
    device: Option<PathBuf>,
    dsk: Option<u32>,
    layout: Option<PathBuf>,
    opengnsys: Option<String>,
    sector_size: Option<u32>,
    dry_run: bool,
    out: &Output,
) -> Result<()> {
    use aula_imager::disk::{self, layout as lay};
    let (spec, og_disk) = match (&layout, &opengnsys) {
        (Some(f), None) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| usage(format!("reading {}: {e}", f.display())))?;
            let spec: lay::LayoutSpec =
                serde_json::from_str(&text).map_err(|e| usage(format!("{}: {e}", f.display())))?;
            (spec, None)
        }
        (None, Some(body)) => {
            let text = match body.strip_prefix('@') {
                Some(f) => {
                    std::fs::read_to_string(f).map_err(|e| usage(format!("reading {f}: {e}")))?
                }
                None => body.clone(),
            };
            let setup = lay::OpenGnsysSetup::parse(&text).map_err(|e| usage(e.to_string()))?;
            let n = setup.disk()?;
            (setup.to_spec()?, Some(n))
        }
        _ => bail!(usage(
            "give a layout: --layout FILE or --opengnsys JSON|@FILE"
        )),
    };
    let target = match (device, dsk.or(og_disk)) {
        (Some(d), _) => d,
        (None, Some(n)) => disk::resolve_dsk(n)?,
        (None, None) => bail!(usage("name the disk: DEVICE or --dsk N")),
    };
    if dry_run {
        let dev =
            Device::open_read(&target).with_context(|| format!("opening {}", target.display()))?;
        let ss = if dev.kind() == DeviceKind::Block {
            dev.sector_size()
        } else {
            sector_size.unwrap_or(512)
        };
        let plan = lay::plan(&spec, dev.size(), ss)?;
        if out.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            println!(
                "plan for {} ({}, {}-byte sectors): {:?} table",
                target.display(),
                gib(dev.size()),
                ss,
                plan.table.kind
            );
            for p in &plan.table.partitions {
                println!(
                    "   {:<2} start {:>10} size {:>10}  type {}",
                    p.number,
                    gib(p.start),
                    gib(p.size),
                    p.ptype
                );
            }
            for f in &plan.formats {
                println!(
                    "   {:<2} mkfs {:?} {}",
                    f.number,
                    f.filesystem,
                    f.label.as_deref().unwrap_or("")
                );
            }
        }
        return Ok(());
    }
    let opts = disk::layout::ApplyOptions {
        sector_size,
        ..Default::default()
    };
    let applied = lay::apply(&target, &spec, &opts)
        .with_context(|| format!("partitioning {}", target.display()))?;
    if out.json {
        println!("{}", serde_json::to_string_pretty(&applied)?);
    } else {
        println!(
            "partitioned {}: {:?} table {}",
            target.display(),
            applied.table.kind,
            applied.table.disk_id
        );
        for p in &applied.table.partitions {
            println!(
                "   {:<2} start {:>10} size {:>10}  type {}",
                p.number,
                gib(p.start),
                gib(p.size),
                p.ptype
            );
        }
        for f in &applied.formatted {
            let via = match &f.via {
                disk::layout::FormatVia::Node(n) => format!("via {}", n.display()),
                disk::layout::FormatVia::Offset => "by offset".into(),
            };
            println!(
                "   {:<2} {:?} {} {via}",
                f.number,
                f.filesystem,
                f.label
                    .as_deref()
                    .map(|l| format!("{l:?}"))
                    .unwrap_or_default()
            );
        }
        if let Some(n) = &applied.note {
            println!("note: {n}");
        }
    }
    Ok(())
}

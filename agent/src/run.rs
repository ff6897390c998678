//! Running jobs: each op's work, and how its errors become a job failure
//! with a stated disk state.
//!
//! Disk work runs on a blocking thread (`spawn_blocking`) under the job's
//! tracing span; scripts and power operations are async.
//!
//! # The disk after a failure or a cancel
//!
//! | job | failed or cancelled before writing | after writing began |
//! |---|---|---|
//! | restore of a partition | unchanged | the partition's first MiB is zeroed: it holds no recognisable filesystem, will not mount or boot; the rest of the disk is untouched; a new restore finishes it (delta: only what is missing is fetched) |
//! | restore of a whole disk | unchanged | the partition table is wiped: the disk looks unpartitioned and will not boot (the imager's guarantee) |
//! | create | the disk is only read | the disk is only read; no image version was published |
//! | layout | unchanged (bad layout, busy disk, missing tool) | table signatures wiped, or the error says wiping failed too |

use std::sync::Arc;
use std::time::Duration;

use aula_imager::device::{Device, OpenMode};
use aula_imager::disk::layout::{ApplyOptions, LayoutError};
use aula_imager::repo::{CachedRepo, HttpOptions, HttpRepo, LocalRepo, Repository};
use serde_json::json;

use crate::disks::{self, DiskError};
use crate::jobs::{Failure, Job, Outcome};
use crate::spec::{CreateSpec, JobSpec, LayoutJobSpec, Method, PartitionRef, RestoreSpec};
use crate::Ctx;

/// Run a job to its end.
pub async fn run(job: Arc<Job>, ctx: Arc<Ctx>) -> Outcome {
    match job.spec.clone() {
        JobSpec::Script(s) => crate::script::run(&job, &ctx, &s).await,
        JobSpec::Poweroff(_) => Ok(json!({"action": "poweroff", "mode": ctx.power_mode()})),
        JobSpec::Reboot(_) => Ok(json!({"action": "reboot", "mode": ctx.power_mode()})),
        JobSpec::BootOs(b) => crate::power::boot_os(&ctx, &b).await,
        spec => {
            let span = job.span.clone();
            let j = job.clone();
            let c = ctx.clone();
            let r =
                tokio::task::spawn_blocking(move || span.in_scope(|| blocking(&j, &c, spec))).await;
            match r {
                Ok(o) => o,
                Err(e) => Err(Failure::new(
                    "internal",
                    format!("the job thread ended abnormally: {e}"),
                )),
            }
        }
    }
}

fn blocking(job: &Job, ctx: &Ctx, spec: JobSpec) -> Outcome {
    match spec {
        JobSpec::Restore(r) => {
            let o = restore(job, ctx, &r);
            disks::after_disk_change(&ctx.settings.jobs.after_disk_change);
            o
        }
        JobSpec::Create(c) => create(job, ctx, &c),
        JobSpec::Layout(l) => {
            let o = layout(ctx, &l);
            disks::after_disk_change(&ctx.settings.jobs.after_disk_change);
            o
        }
        JobSpec::HardwareInventory(_) => {
            serde_json::to_value(crate::system::hardware(&ctx.settings.disks))
                .map_err(|e| Failure::new("internal", e.to_string()))
        }
        JobSpec::SoftwareInventory(p) => software(job, ctx, &p),
        JobSpec::Script(_) | JobSpec::Poweroff(_) | JobSpec::Reboot(_) | JobSpec::BootOs(_) => {
            Err(Failure::new("internal", "not a blocking job"))
        }
    }
}

/// Failure class of an imager error (exhaustive: a new variant must be
/// classified here).
pub fn imager_kind(e: &aula_imager::Error) -> &'static str {
    use aula_imager::Error as E;
    match e {
        E::Io { .. } => "io",
        E::BadManifest { .. } => "bad_manifest",
        E::UnsupportedVersion { .. } => "unsupported_version",
        E::ImageNotFound(_) => "image_not_found",
        E::InvalidName(_) => "invalid",
        E::ChunkMissing(_) => "chunk_missing",
        E::ChunkCorrupt { .. } => "chunk_corrupt",
        E::TargetTooSmall { .. } => "target_too_small",
        E::Incomplete { source, .. } => imager_kind(source),
        E::Cancelled => "cancelled",
        E::Table(_) => "partition_table",
        E::Fs(_) => "filesystem",
        E::Invalid(_) => "invalid",
        E::Repo(_) => "repository",
    }
}

fn is_cancel(e: &aula_imager::Error) -> bool {
    match e {
        aula_imager::Error::Cancelled => true,
        aula_imager::Error::Incomplete { source, .. } => is_cancel(source),
        _ => false,
    }
}

fn imager_failure(e: &aula_imager::Error) -> Failure {
    let f = Failure::new(imager_kind(e), crate::tls::error_chain(e));
    if is_cancel(e) {
        f.cancelled()
    } else {
        f
    }
}

/// Failure class of a disk-access error.
pub fn disk_failure(e: &DiskError) -> Failure {
    let kind = match e {
        DiskError::NoDisk(_) => "no_disk",
        DiskError::Inspect { .. } => "io",
        DiskError::NoPartition { .. } => "no_partition",
        DiskError::Busy(_) => "busy",
        DiskError::Mount { .. } => "mount",
    };
    Failure::new(kind, e.to_string())
}

const UNCHANGED: &str = "unchanged: nothing was written";

/// The repository client of a job: its downloads stop as soon as the job is
/// cancelled, not only at the next chunk boundary.
///
/// Credentials go only where they belong (see `crate::config`):
///
/// | repository | reads send | writes send |
/// |---|---|---|
/// | the boot server's origin | the read token from registration | `repository.write_token` if the server is the configured repository, else the upload token (`HMAC(agent token, "aula-upload-v1")`, good for a capture grant only) |
/// | the configured `repository.url` | `repository.read_token` | `repository.write_token` |
/// | any other host a job names | nothing | nothing |
///
/// The agent's own bearer token never goes to a repository. An agent that
/// pins the server refuses `http://` repositories unless asked.
fn http_repo(
    ctx: &Ctx,
    job: &Job,
    url: &str,
    write: bool,
    allow_http: bool,
) -> Result<HttpRepo, Failure> {
    let s = &ctx.settings;
    if url.trim().to_ascii_lowercase().starts_with("http://")
        && s.strict_tls()
        && !allow_http
        && !s.repository.allow_http
    {
        return Err(Failure::new(
            "insecure_repository",
            format!(
                "refusing the plain-HTTP repository {url}: this agent verifies the boot server by its pin or a CA, so a repository must be https://; to use plain HTTP anyway, send \"allow_http\": true in the job, or set repository.allow_http = true in the agent's configuration"
            ),
        )
        .disk_state(UNCHANGED));
    }
    let configured = s.is_configured_repo(url);
    let server = s.is_server(url);
    let write_token = if !write {
        None
    } else if configured && s.repo_write_token.is_some() {
        s.repo_write_token.clone()
    } else if server {
        // The boot server's repository accepts this for a machine the
        // operator granted capture rights (PUT /v1/clients/{mac}/capture).
        Some(aula_imager::tls::upload_token(&ctx.token))
    } else {
        tracing::warn!(%url, "not the configured repository: no token is sent to it (the upload will need none)");
        None
    };
    let read_token = if server {
        server_read_token(ctx).or_else(|| {
            configured
                .then(|| s.repository.read_token.clone())
                .flatten()
        })
    } else if configured {
        s.repository.read_token.clone()
    } else {
        None
    };
    let opts = HttpOptions {
        cancel: Some(job.progress.cancel_flag()),
        trust: s.trust_for(url),
        token: write_token,
        read_token,
        // The swarm coordinator lives on the boot server and knows this
        // machine by its registered token; elsewhere only the read
        // credential goes.
        swarm_token: server.then(|| ctx.token.clone()),
        retry_for: Duration::from_secs(s.repository.retry_s),
        ..HttpOptions::default()
    };
    HttpRepo::new(url, opts).map_err(|e| imager_failure(&e).disk_state(UNCHANGED))
}

/// The read token the registration answered. A job that arrives while the
/// registration is still under way (a core that knew this agent before it
/// restarted) waits for its answer, at most 10 s (blocking thread).
fn server_read_token(ctx: &Ctx) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = ctx.registration.get();
        let settled = st.registered
            || ctx.settings.server_url.is_none()
            || st
                .last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("refused"));
        if settled || std::time::Instant::now() >= deadline {
            return ctx.registration.read_token();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn repo_url(ctx: &Ctx, given: &Option<String>) -> Result<String, Failure> {
    given
        .clone()
        .or_else(|| ctx.settings.default_repo_url())
        .ok_or_else(|| {
            Failure::new(
                "invalid",
                "no repository: give one in the job or configure repository.url / aula.server",
            )
            .disk_state(UNCHANGED)
        })
}

fn restore(job: &Job, ctx: &Ctx, r: &RestoreSpec) -> Outcome {
    let disk = disks::resolve(&ctx.settings.disks, r.disk)
        .map_err(|e| disk_failure(&e).disk_state(UNCHANGED))?;
    ctx.swarm.stop_disk(&disk);
    let url = repo_url(ctx, &r.repository)?;
    let remote = http_repo(ctx, job, &url, false, r.allow_http)?;
    job.progress.set_phase("manifest");
    let (name, version) = aula_imager::repo::parse_image_ref(&r.image)
        .map_err(|e| imager_failure(&e).disk_state(UNCHANGED))?;

    // The CACHE partition, for unicast-cache.
    let mut cache_use = None;
    let cache_disk = match r.method {
        Method::UnicastCache => Some(
            disks::resolve(&ctx.settings.disks, ctx.settings.cache.disk)
                .map_err(|e| disk_failure(&e).disk_state(UNCHANGED))?,
        ),
        Method::Unicast | Method::Swarm => None,
    };
    let mut swarm_repo = None;
    let repo: Arc<dyn Repository> = match &cache_disk {
        None if r.method == Method::Swarm => {
            let h = Arc::new(remote);
            swarm_repo = Some(h.clone());
            h
        }
        None => Arc::new(remote),
        Some(cd) => {
            let u = ctx
                .cache
                .acquire(cd, &ctx.settings.cache.mount_dir)
                .map_err(|e| disk_failure(&e).disk_state(UNCHANGED))?;
            let local = LocalRepo::open(&u.repo_dir(), true)
                .map_err(|e| imager_failure(&e).disk_state(UNCHANGED))?;
            cache_use = Some(u);
            Arc::new(
                CachedRepo::new(Box::new(remote), local)
                    .with_confirmed(ctx.confirmed.clone())
                    .offline(r.offline),
            )
        }
    };
    let m = repo
        .manifest(&name, version)
        .map_err(|e| imager_failure(&e).disk_state(UNCHANGED))?;
    tracing::info!(image = %m.name, version = m.image_version, kind = ?m.kind, disk = %disk.display(), partition = ?r.partition, method = r.method.as_str(), "restoring");

    let whole_disk = r.partition.is_none();
    if whole_disk && cache_disk.as_ref() == Some(&disk) {
        return Err(Failure::new(
            "invalid",
            "unicast-cache cannot restore onto the whole disk that holds the CACHE partition",
        )
        .disk_state(UNCHANGED));
    }
    let block = disks::is_block(&disk);
    let mut guard = None;
    let mut target_part = None;
    if let Some(n) = r.partition {
        let info = disks::inspect(&disk).map_err(|e| disk_failure(&e).disk_state(UNCHANGED))?;
        let p = disks::partition(&info, n).map_err(|e| disk_failure(&e).disk_state(UNCHANGED))?;
        guard = Some(
            disks::claim_partition(&disk, &p)
                .map_err(|e| disk_failure(&e).disk_state(UNCHANGED))?,
        );
        target_part = Some(p);
    } else {
        disks::check_file_unused(&disk).map_err(|e| disk_failure(&e).disk_state(UNCHANGED))?;
    }
    let mode = OpenMode {
        write: true,
        create: false,
        exclusive: block && whole_disk,
    };
    let dev = Device::open(&disk, mode).map_err(|e| {
        let busy = e.raw_os_error() == Some(libc::EBUSY);
        Failure::new(
            if busy { "busy" } else { "io" },
            format!(
                "opening {}{}: {e}",
                disk.display(),
                if busy {
                    " (a partition is mounted or the disk is held)"
                } else {
                    ""
                }
            ),
        )
        .disk_state(UNCHANGED)
    })?;
    let dev = Arc::new(dev);
    let member = swarm_repo.as_ref().and_then(|h| {
        crate::swarm::join(
            &ctx.settings.swarm,
            ctx.settings.listen.address,
            h,
            &m,
            job.progress.cancel_flag(),
        )
    });
    let threads = match &member {
        Some(_) => ctx.settings.swarm.parallel.max(1),
        None => repo.preferred_threads(),
    };
    let opts = aula_imager::restore::RestoreOptions {
        threads,
        delta: r.delta,
        records: ctx.settings.restore_records.clone(),
        scan: false,
        feed: member
            .clone()
            .map(|s| s as Arc<dyn aula_imager::restore::Feed>),
    };
    let res = aula_imager::image::restore_image(
        &m,
        dev.clone(),
        r.partition,
        repo.as_ref(),
        &opts,
        &job.progress,
    );
    if let Some(g) = &guard {
        g.drop_caches();
    }
    drop(cache_use);
    let swarm = member.as_ref().map(|sw| {
        sw.finish();
        sw.stats()
    });
    if let Some(sw) = member {
        if res.is_ok() {
            ctx.swarm
                .start(&disk, sw, Duration::from_secs(ctx.settings.swarm.linger_s));
        } else {
            sw.leave();
        }
    }
    match res {
        Ok(stats) => {
            drop(dev);
            let boot_entries = boot_entries(ctx, &disk);
            let mut warnings = partition_type_warnings(job, target_part.as_ref());
            if let Some(e) = boot_entries.get("error").and_then(|e| e.as_str()) {
                warnings.push(format!("UEFI boot entries not updated: {e}"));
            }
            Ok(json!({
            "image": m.name,
            "version": m.image_version,
            "kind": m.kind,
            "disk": r.disk,
            "partition": r.partition,
            "device": disk,
            "repository": url,
            "method": r.method.as_str(),
            "stats": stats,
            "swarm": swarm,
            "boot_entries": boot_entries,
            "warnings": warnings,
            }))
        }
        Err(e) => {
            let f = imager_failure(&e);
            let state = match (&e, &target_part) {
                (aula_imager::Error::Incomplete { state, .. }, _) => state.clone(),
                // Nothing was written before the restore phase began.
                _ if job.progress.snapshot().phase == "manifest" => UNCHANGED.into(),
                (_, Some(p)) => scrub(&dev, p.start, p.size, &format!("partition {}", p.number)),
                // A partition image restored onto the whole device.
                (_, None) => scrub(&dev, 0, dev.size(), "the disk"),
            };
            Err(f.disk_state(state))
        }
    }
}

/// After a restore: the UEFI boot entry of the restored OS (see
/// [`crate::bootentry`]), as the job result's `boot_entries`. A failure
/// there does not fail the restore (the disk holds the image); it is
/// reported as `{"error": …}` and a warning.
fn boot_entries(ctx: &Ctx, disk: &std::path::Path) -> serde_json::Value {
    // An image file is no disk the firmware boots: its entries are not this
    // machine's business (and tests restoring files must not touch NVRAM).
    if !disks::is_block(disk) {
        return json!({"status": "skipped", "reason": "the restore target is not a block device"});
    }
    // Partition GUIDs of the machine's other disks: their entries are
    // never stale.
    let mut present = std::collections::HashSet::new();
    for other in ctx.settings.disks.values().filter(|p| p.as_path() != disk) {
        if let Ok(info) = disks::inspect(other) {
            present.extend(
                info.partitions
                    .iter()
                    .filter_map(|p| p.guid.as_ref().map(|g| g.to_ascii_lowercase())),
            );
        }
    }
    match crate::bootentry::update(&ctx.settings.jobs.efivars, disk, &present) {
        Ok(r) => serde_json::to_value(&r).unwrap_or_else(|e| json!({"error": e.to_string()})),
        Err(e) => {
            tracing::warn!(error = %e, "UEFI boot entries not updated");
            json!({"error": e.to_string()})
        }
    }
}

/// OpenGnsys `cpt`: warn when the target partition's type differs.
fn partition_type_warnings(job: &Job, p: Option<&aula_imager::disk::PartitionInfo>) -> Vec<String> {
    let (Some(cpt), Some(p)) = (job.echo.as_ref().and_then(|e| e.get("cpt")), p) else {
        return Vec::new();
    };
    let code = p.code.clone().unwrap_or_default();
    let norm = |s: &str| {
        s.trim()
            .trim_start_matches("0x")
            .trim_start_matches('0')
            .to_ascii_lowercase()
    };
    if norm(cpt) == norm(&code) {
        Vec::new()
    } else {
        vec![format!(
            "the request's cpt {cpt:?} differs from partition {}'s type code {code:?} (left unchanged)",
            p.number
        )]
    }
}

/// After an interrupted restore of a filesystem image: zero the first MiB
/// of its target range so the half-written filesystem is not recognised,
/// mounted or booted.
fn scrub(dev: &Device, start: u64, size: u64, what: &str) -> String {
    let len = size.min(1 << 20);
    let zeros = vec![0u8; len as usize];
    let res = dev
        .write_all_at(&zeros, start)
        .and_then(|()| dev.file().sync_all());
    match res {
        Ok(()) => format!(
            "{what} was partly written and its first MiB zeroed: it holds no recognisable filesystem and will not mount or boot; the rest of the disk is untouched; restoring again finishes it (delta restore fetches only what is missing)"
        ),
        Err(e) => format!(
            "{what} was partly written and zeroing its first MiB failed ({e}): do not boot it before restoring again"
        ),
    }
}

fn create(job: &Job, ctx: &Ctx, c: &CreateSpec) -> Outcome {
    const READ_ONLY: &str = "unchanged: the disk was only read; no image version was published";
    let disk = disks::resolve(&ctx.settings.disks, c.disk)
        .map_err(|e| disk_failure(&e).disk_state(READ_ONLY))?;
    ctx.swarm.stop_disk(&disk);
    let url = repo_url(ctx, &c.repository)?;
    let repo =
        http_repo(ctx, job, &url, true, c.allow_http).map_err(|f| f.disk_state(READ_ONLY))?;
    let _guard = match c.partition {
        Some(n) => {
            let info = disks::inspect(&disk).map_err(|e| disk_failure(&e).disk_state(READ_ONLY))?;
            let p =
                disks::partition(&info, n).map_err(|e| disk_failure(&e).disk_state(READ_ONLY))?;
            Some(
                disks::claim_partition(&disk, &p)
                    .map_err(|e| disk_failure(&e).disk_state(READ_ONLY))?,
            )
        }
        None => None,
    };
    let dev = Device::open(&disk, OpenMode::default()).map_err(|e| {
        Failure::new("io", format!("opening {}: {e}", disk.display())).disk_state(READ_ONLY)
    })?;
    let opts = aula_imager::create::CreateOptions {
        raw: c.raw,
        description: c.description.clone(),
        ..Default::default()
    };
    job.progress.set_phase("scan");
    let m = aula_imager::image::create_image(
        &c.image,
        Arc::new(dev),
        c.partition,
        &repo,
        &opts,
        &job.progress,
    )
    .map_err(|e| imager_failure(&e).disk_state(READ_ONLY))?;
    Ok(json!({
        "image": m.name,
        "version": m.image_version,
        "kind": m.kind,
        "disk": c.disk,
        "partition": c.partition,
        "repository": url,
        "filesystem": m.filesystem.as_ref().map(|f| f.fstype.clone()),
        "source_size": m.source_size,
        "used_bytes": m.total_used_bytes(),
        "stored_bytes": m.stored_bytes(),
        "chunks": m.chunks.len(),
    }))
}

/// Failure class of a layout error (exhaustive).
pub fn layout_failure(e: &LayoutError) -> Failure {
    let msg = crate::tls::error_chain(e);
    let (kind, state) = match e {
        LayoutError::Partition { .. }
        | LayoutError::Invalid(_)
        | LayoutError::OpenGnsys(_)
        | LayoutError::OpenGnsysJson(_) => ("invalid", UNCHANGED.to_string()),
        LayoutError::Table(_) => ("partition_table", UNCHANGED.to_string()),
        LayoutError::Open { .. } => ("io", UNCHANGED.to_string()),
        LayoutError::Busy { .. } => ("busy", UNCHANGED.to_string()),
        LayoutError::MissingTool { .. } => ("missing_tool", UNCHANGED.to_string()),
        LayoutError::Failed { state, .. } => ("layout_failed", state.to_string()),
    };
    Failure::new(kind, msg).disk_state(state)
}

fn layout(ctx: &Ctx, l: &LayoutJobSpec) -> Outcome {
    let disk = disks::resolve(&ctx.settings.disks, l.disk)
        .map_err(|e| disk_failure(&e).disk_state(UNCHANGED))?;
    ctx.swarm.stop_disk(&disk);
    let applied = aula_imager::disk::layout::apply(&disk, &l.layout, &ApplyOptions::default())
        .map_err(|e| layout_failure(&e))?;
    serde_json::to_value(applied).map_err(|e| Failure::new("internal", e.to_string()))
}

fn software(job: &Job, ctx: &Ctx, p: &PartitionRef) -> Outcome {
    let disk = disks::resolve(&ctx.settings.disks, p.disk).map_err(|e| disk_failure(&e))?;
    let info = disks::inspect(&disk).map_err(|e| disk_failure(&e))?;
    let part = disks::partition(&info, p.partition).map_err(|e| disk_failure(&e))?;
    let os = match part.filesystem.as_deref() {
        Some("ext2" | "ext3" | "ext4" | "ntfs" | "fat32" | "fat16" | "fat12" | "btrfs" | "xfs") => {
            let dir = std::env::temp_dir().join(format!("aula-inspect-{}", job.id));
            let m = disks::mount(&disk, &part, &dir, true, true).map_err(|e| disk_failure(&e))?;
            let os = crate::software::detect(m.dir());
            drop(m);
            os
        }
        _ => None,
    };
    Ok(json!({
        "disk": p.disk,
        "partition": p.partition,
        "filesystem": part.filesystem,
        "label": part.label,
        "os": os,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelled_restores_are_recognised_through_incomplete() {
        let e = aula_imager::Error::Incomplete {
            state: "wiped".into(),
            source: Box::new(aula_imager::Error::Cancelled),
        };
        assert!(is_cancel(&e));
        assert_eq!(imager_kind(&e), "cancelled");
        let f = imager_failure(&e);
        assert!(f.cancelled);
        assert!(!is_cancel(&aula_imager::Error::Invalid("x".into())));
    }
}

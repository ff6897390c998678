//! A read-only TFTP server (RFC 1350) with option negotiation (RFC 2347),
//! `blksize` (RFC 2348), `tsize` and `timeout` (RFC 2349) and `windowsize`
//! (RFC 7440).
//!
//! Why not the `tftpd` crate: it runs a thread per transfer with no limit,
//! grants any blksize/windowsize a client asks for (65464-byte blocks mean IP
//! fragmentation), logs with `println!`, and follows symlinks out of its root.
//! This server is a tokio task per transfer under a semaphore, caps the
//! options, logs through `tracing`, and confines every open to the root three
//! ways: the name must consist of plain path components (no `..`, no absolute
//! path); the canonical path (symlinks resolved) must have the canonical root
//! as a component-wise prefix; and the file is opened with
//! `openat2(RESOLVE_BENEATH)` relative to the root, so the kernel refuses an
//! escape even if a symlink is swapped in between the check and the open.
//!
//! Files are read whole into memory (at most [`MAX_FILE`]) and kept while
//! they do not change on disk (at most [`CACHE_BYTES`] in all): TFTP only
//! carries the iPXE programs (under 1 MiB); kernels and initrds go over HTTP.
//!
//! # Limits
//!
//! UDP sources are trivially forged, so a request costs the server little
//! until its client has proven it is there by acknowledging:
//!
//! | stage | bound | when it is reached |
//! |---|---|---|
//! | a request awaits its client's first ACK (of the OACK or of block 1) | `max_pending` (256) | the oldest waiting request is dropped for the new one |
//! | the client acknowledged | `max_transfers` (64), `max_transfers_per_ip` (8) | the client gets "server busy" |
//! | retransmission timeout | the client's `timeout` option if at most `max_timeout_s` (5 s), else `timeout_ms` (1 s, and the option is not acknowledged, as RFC 2349 requires) | `retries` (5) timeouts in a row end the transfer |
//! | whole transfer | `max_transfer_s` (60 s) | the client gets an error, the transfer ends |
//!
//! So forged requests that are never acknowledged hold no transfer slot:
//! they wait at most `(retries + 1) × max_timeout_s` among the pending
//! ones, and a flood of them only pushes out other never-acknowledged
//! requests.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TftpConfig;

/// Largest file served.
pub const MAX_FILE: u64 = 32 << 20;
/// Most bytes of file content kept in memory between transfers.
pub const CACHE_BYTES: u64 = 64 << 20;

const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

/// TFTP error codes (RFC 1350, 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not defined, see message.
    Undefined = 0,
    /// File not found.
    NotFound = 1,
    /// Access violation.
    AccessViolation = 2,
    /// Illegal operation.
    IllegalOperation = 4,
    /// Option negotiation refused.
    BadOption = 8,
}

/// Errors starting the TFTP service.
#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    /// The root directory is unusable.
    #[error("TFTP root {path}")]
    Root {
        /// The root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket could not be bound.
    #[error("binding TFTP socket {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Turns a client-supplied name into a relative path of plain components, or
/// `None` if it is absolute, contains `..`/`.`, a NUL, or is empty. Backslashes
/// count as separators (some firmware sends DOS-style names).
pub fn safe_relative_path(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('\0') || name.len() > 512 {
        return None;
    }
    let name = name.replace('\\', "/");
    let p = Path::new(&name);
    if p.is_absolute() || name.starts_with('/') {
        return None;
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir
            | Component::ParentDir
            | Component::RootDir
            | Component::Prefix(_) => return None,
        }
    }
    // Path::components drops interior "." silently; refuse them explicitly.
    if name.split('/').any(|s| s == "." || s == "..") {
        return None;
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Why a file cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The name is not a plain relative path.
    #[error("path not allowed")]
    BadName,
    /// Nothing there.
    #[error("file not found")]
    NotFound,
    /// Resolves outside the root.
    #[error("path escapes the root")]
    Escape,
    /// Not a regular file.
    #[error("not a regular file")]
    NotFile,
    /// Too large for TFTP.
    #[error("file too large for TFTP (use HTTP)")]
    TooLarge,
    /// Other I/O error.
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// A name in a namespace the server generates (the signed chain's
    /// `grub/…` and `live/…`) that is not one of its files, or not for this
    /// client; the text says which.
    #[error("not allowed: {0}")]
    NotAllowed(&'static str),
}

/// A boxed future, as [`Dynamic`] returns.
pub type DynFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What a [`Dynamic`] provider serves for a name.
#[derive(Debug)]
pub enum DynFile {
    /// These bytes (made for this request).
    Bytes(Bytes),
    /// The file at this path, chosen by the administrator's configuration
    /// (not by the client), read through the server's cache.
    Path(PathBuf),
}

/// Files the server makes or picks per request: the signed chain's per-MAC
/// GRUB configuration and the live kernel and initrd. Asked before the
/// generated files and the root.
pub trait Dynamic: Send + Sync {
    /// `None` when `name` (plain relative components, a client's leading
    /// `/` removed) is outside the provider's namespaces; otherwise what to
    /// serve to `peer`, or why not.
    fn file<'a>(
        &'a self,
        name: &'a Path,
        peer: IpAddr,
    ) -> Option<DynFuture<'a, Result<DynFile, OpenError>>>;
}

/// A root directory that files are opened beneath, never outside.
///
/// One exception, decided by the administrator and fixed at start-up: a boot
/// program named in the configuration may be a symlink leading out of the
/// root (Debian's `/usr/lib/ipxe/ipxe.efi` points to `/boot/ipxe.efi`). Its
/// target is resolved once and pinned; the name is served only while it still
/// resolves to exactly that file. No client-chosen name gets this treatment.
#[derive(Debug)]
pub struct ConfinedRoot {
    canonical: PathBuf,
    dir: File,
    pinned: std::collections::HashMap<PathBuf, PathBuf>,
}

impl ConfinedRoot {
    /// Opens the root.
    pub fn open(root: &Path) -> io::Result<Self> {
        let canonical = std::fs::canonicalize(root)?;
        let dir = File::open(&canonical)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a directory",
            ));
        }
        Ok(Self {
            canonical,
            dir,
            pinned: Default::default(),
        })
    }

    /// Opens the root and pins the configured boot programs that resolve
    /// outside it (see the type's documentation).
    pub fn open_with_programs<'a>(
        root: &Path,
        programs: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<Self> {
        let mut r = Self::open(root)?;
        for name in programs {
            let Some(rel) = safe_relative_path(name) else {
                continue;
            };
            let Ok(target) = std::fs::canonicalize(r.canonical.join(&rel)) else {
                continue;
            };
            if !target.starts_with(&r.canonical) && target.is_file() {
                tracing::info!(program = name, target = %target.display(), "configured boot program resolves outside the root; serving that file for this name only");
                r.pinned.insert(rel, target);
            }
        }
        Ok(r)
    }

    /// The canonical root path.
    pub fn path(&self) -> &Path {
        &self.canonical
    }

    /// Opens a regular file named by a client, confined to the root.
    pub fn open_file(&self, name: &str) -> Result<(File, u64), OpenError> {
        let rel = safe_relative_path(name).ok_or(OpenError::BadName)?;
        let canon = match std::fs::canonicalize(self.canonical.join(&rel)) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OpenError::NotFound),
            Err(e) => return Err(OpenError::Io(e)),
        };
        // Component-wise prefix check: /srv/tftp-private is not under /srv/tftp.
        let file = if canon.starts_with(&self.canonical) {
            self.open_beneath(&rel, &canon)?
        } else if self.pinned.get(&rel) == Some(&canon) {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&canon)
                .map_err(OpenError::Io)?
        } else {
            return Err(OpenError::Escape);
        };
        let meta = file.metadata().map_err(OpenError::Io)?;
        if !meta.is_file() {
            return Err(OpenError::NotFile);
        }
        if meta.len() > MAX_FILE {
            return Err(OpenError::TooLarge);
        }
        Ok((file, meta.len()))
    }

    fn open_beneath(&self, rel: &Path, canon: &Path) -> Result<File, OpenError> {
        use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match openat2(self.dir.as_raw_fd(), rel, how) {
            // SAFETY: openat2 returned a new, open descriptor that nothing else
            // owns; the File takes sole ownership and closes it.
            Ok(fd) => Ok(unsafe { File::from_raw_fd(fd) }),
            Err(nix::errno::Errno::EXDEV) => Err(OpenError::Escape),
            Err(nix::errno::Errno::ENOENT) => Err(OpenError::NotFound),
            Err(nix::errno::Errno::ENOSYS) => {
                // Kernels before 5.6: open the checked canonical path, refusing
                // a final symlink swapped in since the check.
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(canon)
                    .map_err(OpenError::Io)
            }
            Err(e) => Err(OpenError::Io(e.into())),
        }
    }
}

/// A parsed read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpRequest {
    /// RRQ or WRQ.
    pub write: bool,
    /// File name as sent.
    pub filename: String,
    /// Transfer mode.
    pub netascii: bool,
    /// blksize asked for.
    pub blksize: Option<u16>,
    /// tsize asked for.
    pub tsize: bool,
    /// timeout asked for (seconds).
    pub timeout: Option<u8>,
    /// windowsize asked for.
    pub windowsize: Option<u16>,
}

/// Parses an RRQ/WRQ strictly: `None` for anything malformed (no reply is sent).
pub fn parse_request(buf: &[u8]) -> Option<TftpRequest> {
    let op = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]);
    if op != OP_RRQ && op != OP_WRQ {
        return None;
    }
    let body = &buf[2..];
    if body.last() != Some(&0) {
        return None;
    }
    let mut fields = body[..body.len() - 1].split(|b| *b == 0);
    let filename = std::str::from_utf8(fields.next()?).ok()?;
    let mode = std::str::from_utf8(fields.next()?).ok()?;
    if filename.is_empty() {
        return None;
    }
    let netascii = if mode.eq_ignore_ascii_case("octet") {
        false
    } else if mode.eq_ignore_ascii_case("netascii") {
        true
    } else {
        return None;
    };
    let mut req = TftpRequest {
        write: op == OP_WRQ,
        filename: filename.to_owned(),
        netascii,
        blksize: None,
        tsize: false,
        timeout: None,
        windowsize: None,
    };
    while let Some(name) = fields.next() {
        let value = fields.next()?; // an option name without a value is malformed
        let name = std::str::from_utf8(name).ok()?;
        let value = std::str::from_utf8(value).ok()?;
        if name.is_empty() {
            return None;
        }
        let num: Option<u64> =
            (!value.is_empty() && value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse().ok())
                .flatten();
        if name.eq_ignore_ascii_case("blksize") {
            req.blksize = num.filter(|n| (8..=65464).contains(n)).map(|n| n as u16);
        } else if name.eq_ignore_ascii_case("tsize") {
            req.tsize = num.is_some();
        } else if name.eq_ignore_ascii_case("timeout") {
            req.timeout = num.filter(|n| (1..=255).contains(n)).map(|n| n as u8);
        } else if name.eq_ignore_ascii_case("windowsize") {
            req.windowsize = num.filter(|n| (1..=65535).contains(n)).map(|n| n as u16);
        }
    }
    Some(req)
}

fn error_packet(code: ErrorCode, msg: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + msg.len());
    v.extend_from_slice(&OP_ERROR.to_be_bytes());
    v.extend_from_slice(&(code as u16).to_be_bytes());
    v.extend_from_slice(msg.as_bytes());
    v.push(0);
    v
}

/// The running TFTP service.
#[derive(Debug, Clone)]
pub struct TftpService {
    /// Listening address.
    pub local_addr: SocketAddr,
}

struct Shared {
    root: ConfinedRoot,
    cfg: TftpConfig,
    /// Transfers whose client acknowledged.
    slots: Arc<Semaphore>,
    /// Acknowledged transfers per client address.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Requests waiting for their client's first ACK.
    pending: Mutex<Pending>,
    cache: FileCache,
    bind_ip: std::net::IpAddr,
    /// Files the server generates (relative names), served before the root.
    generated: HashMap<PathBuf, Bytes>,
    /// Files made or picked per request, asked first.
    dynamic: Option<Arc<dyn Dynamic>>,
}

/// Requests waiting for their client's first acknowledgement.
#[derive(Default)]
struct Pending {
    next: u64,
    waiting: HashMap<u64, (Instant, CancellationToken)>,
}

/// File contents kept between transfers, valid while the file is unchanged.
#[derive(Default)]
struct FileCache {
    files: Mutex<HashMap<String, CachedFile>>,
}

struct CachedFile {
    /// Device, inode, size, modification time (s, ns).
    stamp: (u64, u64, u64, i64, i64),
    data: Bytes,
}

impl FileCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedFile>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The contents of `name` under `root`, from memory when the file is
    /// the one read last time (same inode, size and modification time).
    fn load(&self, root: &ConfinedRoot, name: &str) -> Result<Bytes, OpenError> {
        let (f, len) = root.open_file(name)?;
        self.load_open(name, f, len)
    }

    /// The contents of the configured file at `path` (see [`DynFile::Path`]).
    fn load_path(&self, path: &Path) -> Result<Bytes, OpenError> {
        let f = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => OpenError::NotFound,
            _ => OpenError::Io(e),
        })?;
        let meta = f.metadata().map_err(OpenError::Io)?;
        if !meta.is_file() {
            return Err(OpenError::NotFile);
        }
        if meta.len() > MAX_FILE {
            return Err(OpenError::TooLarge);
        }
        // Keyed apart from the root's names (those are relative).
        let key = format!("\0{}", path.display());
        self.load_open(&key, f, meta.len())
    }

    fn load_open(&self, name: &str, mut f: File, len: u64) -> Result<Bytes, OpenError> {
        let m = f.metadata().map_err(OpenError::Io)?;
        let stamp = (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec());
        if let Some(c) = self.lock().get(name).filter(|c| c.stamp == stamp) {
            return Ok(c.data.clone());
        }
        let mut data = Vec::with_capacity(len as usize);
        f.by_ref()
            .take(MAX_FILE + 1)
            .read_to_end(&mut data)
            .map_err(OpenError::Io)?;
        if data.len() as u64 > MAX_FILE {
            return Err(OpenError::TooLarge);
        }
        let data = Bytes::from(data);
        let mut all = self.lock();
        let held: u64 = all.values().map(|c| c.data.len() as u64).sum();
        if held + data.len() as u64 > CACHE_BYTES {
            all.clear();
        }
        all.insert(
            name.to_owned(),
            CachedFile {
                stamp,
                data: data.clone(),
            },
        );
        Ok(data)
    }
}

/// A transfer's claim on the server: pending until its client's first
/// ACK, then a transfer slot and a place in its address's quota.
struct Admission {
    shared: Arc<Shared>,
    ip: IpAddr,
    pending_id: u64,
    held: Option<(OwnedSemaphorePermit, IpTicket)>,
}

/// One acknowledged transfer of an address, given back on drop.
struct IpTicket {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for IpTicket {
    fn drop(&mut self) {
        let mut m = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    /// The client acknowledged: leave the pending requests and take a
    /// transfer slot (the error says why there is none).
    fn confirm(&mut self) -> Result<(), &'static str> {
        if self.held.is_some() {
            return Ok(());
        }
        self.shared.unpend(self.pending_id);
        let permit = self
            .shared
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| "server busy, retry later")?;
        {
            let mut m = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(self.ip).or_insert(0);
            if *n >= self.shared.cfg.max_transfers_per_ip {
                return Err("too many transfers from this address, retry later");
            }
            *n += 1;
        }
        let ticket = IpTicket {
            shared: self.shared.clone(),
            ip: self.ip,
        };
        self.held = Some((permit, ticket));
        Ok(())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.unpend(self.pending_id);
    }
}

/// Binds the socket and spawns the listener on `tracker`.
pub fn start<'a>(
    cfg: &TftpConfig,
    programs: impl IntoIterator<Item = &'a str>,
    bind: SocketAddr,
    device: Option<&str>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<TftpService, TftpError> {
    start_with(
        cfg,
        programs,
        HashMap::new(),
        None,
        bind,
        device,
        cancel,
        tracker,
    )
}

/// [`start`], also serving `generated` files (relative names such as
/// `grub/grub.cfg`, looked up before the root; a request may name them with
/// a leading `/`, as GRUB does), and first the files of `dynamic`.
#[allow(clippy::too_many_arguments)]
pub fn start_with<'a>(
    cfg: &TftpConfig,
    programs: impl IntoIterator<Item = &'a str>,
    generated: HashMap<String, Bytes>,
    dynamic: Option<Arc<dyn Dynamic>>,
    bind: SocketAddr,
    device: Option<&str>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<TftpService, TftpError> {
    let generated = generated
        .into_iter()
        .filter_map(|(k, v)| safe_relative_path(&k).map(|p| (p, v)))
        .collect();
    let root = ConfinedRoot::open_with_programs(&cfg.root, programs).map_err(|source| {
        TftpError::Root {
            path: cfg.root.clone(),
            source,
        }
    })?;
    let std_sock = crate::netutil::udp_socket(bind, device, false)
        .map_err(|source| TftpError::Bind { addr: bind, source })?;
    let sock =
        UdpSocket::from_std(std_sock).map_err(|source| TftpError::Bind { addr: bind, source })?;
    let local_addr = sock
        .local_addr()
        .map_err(|source| TftpError::Bind { addr: bind, source })?;
    let shared = Arc::new(Shared {
        root,
        slots: Arc::new(Semaphore::new(cfg.max_transfers)),
        per_ip: Mutex::new(HashMap::new()),
        pending: Mutex::new(Pending::default()),
        cache: FileCache::default(),
        cfg: cfg.clone(),
        bind_ip: bind.ip(),
        generated,
        dynamic,
    });
    tracing::info!(%local_addr, root = %shared.root.path().display(), "TFTP service started");
    let t2 = tracker.clone();
    tracker.spawn(async move { shared.listen(sock, cancel, t2).await });
    Ok(TftpService { local_addr })
}

impl Shared {
    /// Registers a request awaiting its first ACK, dropping the oldest
    /// waiting one when there are `max_pending` already.
    fn pend(&self) -> (u64, CancellationToken) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.waiting.len() >= self.cfg.max_pending {
            let oldest = p
                .waiting
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(id, _)| *id);
            if let Some((_, token)) = oldest.and_then(|id| p.waiting.remove(&id)) {
                token.cancel();
                tracing::debug!("TFTP: dropped the oldest unacknowledged request for a new one");
            }
        }
        let id = p.next;
        p.next += 1;
        let token = CancellationToken::new();
        p.waiting.insert(id, (Instant::now(), token.clone()));
        (id, token)
    }

    fn unpend(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .waiting
            .remove(&id);
    }

    async fn listen(
        self: Arc<Self>,
        sock: UdpSocket,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, peer) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = sock.recv_from(&mut buf) => match r {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::debug!(error = %e, "TFTP receive error");
                        continue;
                    }
                },
            };
            let Some(req) = parse_request(&buf[..n]) else {
                tracing::trace!(%peer, "dropping malformed TFTP datagram");
                continue;
            };
            if req.write {
                let _ = sock
                    .send_to(
                        &error_packet(ErrorCode::AccessViolation, "read-only server"),
                        peer,
                    )
                    .await;
                continue;
            }
            let (pending_id, dropped) = self.pend();
            let admission = Admission {
                shared: self.clone(),
                ip: peer.ip(),
                pending_id,
                held: None,
            };
            let me = self.clone();
            let cancel = cancel.clone();
            tracker.spawn(async move {
                tokio::select! {
                    _ = dropped.cancelled() => {}
                    _ = me.transfer(req, peer, admission, cancel) => {}
                }
            });
        }
        tracing::debug!("TFTP listener stopped");
    }

    /// What to send for `name`: the dynamic provider's file, a generated
    /// one, or one under the root (a leading `/` is dropped for the first
    /// two, as GRUB asks with one).
    async fn load(
        self: &Arc<Self>,
        name: &str,
        peer: IpAddr,
    ) -> Result<Result<Bytes, OpenError>, tokio::task::JoinError> {
        let rel = safe_relative_path(name.strip_prefix('/').unwrap_or(name));
        if let (Some(dynamic), Some(rel)) = (&self.dynamic, &rel) {
            if let Some(fut) = dynamic.file(rel, peer) {
                return match fut.await {
                    Ok(DynFile::Bytes(b)) => Ok(Ok(b)),
                    Ok(DynFile::Path(path)) => {
                        let me = self.clone();
                        tokio::task::spawn_blocking(move || me.cache.load_path(&path)).await
                    }
                    Err(e) => Ok(Err(e)),
                };
            }
        }
        if let Some(d) = rel.and_then(|p| self.generated.get(&p).cloned()) {
            return Ok(Ok(d));
        }
        let me = self.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || me.cache.load(&me.root, &name)).await
    }

    async fn transfer(
        self: Arc<Self>,
        req: TftpRequest,
        peer: SocketAddr,
        mut admission: Admission,
        cancel: CancellationToken,
    ) {
        let sock = match UdpSocket::bind(SocketAddr::new(self.bind_ip, 0)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "TFTP transfer socket");
                return;
            }
        };
        if let Err(e) = sock.connect(peer).await {
            tracing::debug!(%peer, error = %e, "TFTP connect");
            return;
        }
        let loaded = self.load(&req.filename, peer.ip()).await;
        let data = match loaded {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let code = match e {
                    OpenError::NotFound | OpenError::NotFile => ErrorCode::NotFound,
                    OpenError::BadName | OpenError::Escape | OpenError::NotAllowed(_) => {
                        ErrorCode::AccessViolation
                    }
                    OpenError::TooLarge | OpenError::Io(_) => ErrorCode::Undefined,
                };
                tracing::info!(%peer, file = %req.filename, error = %e, "TFTP request refused");
                crate::metrics::global().tftp_refused();
                let _ = sock.send(&error_packet(code, &e.to_string())).await;
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "TFTP file reader failed");
                return;
            }
        };
        let data = if req.netascii {
            to_netascii(&data)
        } else {
            data
        };
        let started = Instant::now();
        let result = tokio::select! {
            _ = cancel.cancelled() => Err("server shutting down"),
            r = self.send_file(&sock, &req, &data, &mut admission) => r,
        };
        match &result {
            Ok(_) => crate::metrics::global().tftp_transfer(Some(data.len() as u64)),
            Err(_) if admission.held.is_some() => crate::metrics::global().tftp_transfer(None),
            Err(_) => {}
        }
        match result {
            Ok(stats) => tracing::info!(
                %peer, file = %req.filename, bytes = data.len(), blksize = stats.0, windowsize = stats.1,
                ms = started.elapsed().as_millis() as u64, "TFTP transfer complete"
            ),
            Err(why) => {
                if admission.held.is_some() {
                    tracing::info!(%peer, file = %req.filename, why, "TFTP transfer ended early")
                } else {
                    // Never acknowledged: likely a forged source; keep it quiet.
                    tracing::debug!(%peer, file = %req.filename, why, "TFTP request never acknowledged")
                }
            }
        }
    }

    /// Negotiates options and sends `data`; returns (blksize, windowsize).
    /// The client's first ACK confirms `admission` (see the module's limits).
    async fn send_file(
        &self,
        sock: &UdpSocket,
        req: &TftpRequest,
        data: &[u8],
        admission: &mut Admission,
    ) -> Result<(usize, usize), &'static str> {
        let blksize = req
            .blksize
            .map(|b| b.min(self.cfg.max_blksize))
            .unwrap_or(512) as usize;
        let window = req
            .windowsize
            .map(|w| w.min(self.cfg.max_windowsize))
            .unwrap_or(1) as usize;
        // RFC 2349: a timeout is acknowledged as asked or not at all.
        let granted_timeout = req.timeout.filter(|t| *t <= self.cfg.max_timeout_s);
        let timeout = granted_timeout
            .map(|t| Duration::from_secs(u64::from(t)))
            .unwrap_or(Duration::from_millis(self.cfg.timeout_ms));
        let end = tokio::time::Instant::now() + Duration::from_secs(self.cfg.max_transfer_s);
        let mut rbuf = [0u8; 1024];
        let refuse = |why: &'static str| async move {
            let _ = sock.send(&error_packet(ErrorCode::Undefined, why)).await;
            why
        };

        // Option acknowledgement (RFC 2347), answered by ACK 0.
        let mut oack = Vec::new();
        if req.blksize.is_some()
            || req.tsize
            || granted_timeout.is_some()
            || req.windowsize.is_some()
        {
            oack.extend_from_slice(&OP_OACK.to_be_bytes());
            let mut opt = |k: &str, v: String| {
                oack.extend_from_slice(k.as_bytes());
                oack.push(0);
                oack.extend_from_slice(v.as_bytes());
                oack.push(0);
            };
            if req.blksize.is_some() {
                opt("blksize", blksize.to_string());
            }
            if req.tsize {
                opt("tsize", data.len().to_string());
            }
            if let Some(t) = granted_timeout {
                opt("timeout", t.to_string());
            }
            if req.windowsize.is_some() {
                opt("windowsize", window.to_string());
            }
            let mut tries = 0;
            loop {
                sock.send(&oack).await.map_err(|_| "send failed")?;
                match self.recv_ack(sock, &mut rbuf, timeout, end).await {
                    Ok(Some(0)) => break,
                    // A wrong ACK counts as a failed try, so a confused or
                    // hostile client cannot keep the transfer alive forever.
                    Ok(Some(_)) | Ok(None) => {
                        tries += 1;
                        if tries > self.cfg.retries {
                            return Err("no ACK for OACK");
                        }
                    }
                    Err(Ended::Client(why)) => return Err(why),
                    Err(Ended::TooLong) => return Err(refuse(TOO_LONG).await),
                }
            }
            if let Err(why) = admission.confirm() {
                return Err(refuse(why).await);
            }
        }

        let blocks = data.len() / blksize + 1; // last one is short, maybe empty
        let mut base = 1usize; // first unacknowledged block
        let mut tries = 0u32;
        let mut pkt = Vec::with_capacity(blksize + 4);
        while base <= blocks {
            let last = (base + window - 1).min(blocks);
            for b in base..=last {
                let start = (b - 1) * blksize;
                let stop = (start + blksize).min(data.len());
                pkt.clear();
                pkt.extend_from_slice(&OP_DATA.to_be_bytes());
                pkt.extend_from_slice(&(b as u16).to_be_bytes()); // wraps after 65535 (rollover to 0)
                pkt.extend_from_slice(&data[start..stop]);
                sock.send(&pkt).await.map_err(|_| "send failed")?;
            }
            // Wait for an ACK inside the window; older ACKs are duplicates and
            // ignored (no retransmission on duplicates: Sorcerer's Apprentice),
            // but only until the window's deadline, so a stream of stale ACKs
            // cannot hold the transfer open.
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let ack = if left.is_zero() {
                    None
                } else {
                    match self.recv_ack(sock, &mut rbuf, left, end).await {
                        Ok(a) => a,
                        Err(Ended::Client(why)) => return Err(why),
                        Err(Ended::TooLong) => return Err(refuse(TOO_LONG).await),
                    }
                };
                match ack {
                    Some(wire) => {
                        let lo = base - 1;
                        let ahead = usize::from(wire.wrapping_sub(lo as u16));
                        if ahead == 0 || lo + ahead > last {
                            continue;
                        }
                        if let Err(why) = admission.confirm() {
                            return Err(refuse(why).await);
                        }
                        base = lo + ahead + 1;
                        tries = 0;
                        break;
                    }
                    None => {
                        tries += 1;
                        if tries > self.cfg.retries {
                            return Err("client stopped acknowledging");
                        }
                        break; // resend the window from `base`
                    }
                }
            }
        }
        Ok((blksize, window))
    }

    /// Waits up to `timeout` (and never past `end`) for an ACK; `Ok(None)`
    /// when none came in time.
    async fn recv_ack(
        &self,
        sock: &UdpSocket,
        buf: &mut [u8],
        timeout: Duration,
        end: tokio::time::Instant,
    ) -> Result<Option<u16>, Ended> {
        let now = tokio::time::Instant::now();
        if now >= end {
            return Err(Ended::TooLong);
        }
        let deadline = (now + timeout).min(end);
        loop {
            let n = match tokio::time::timeout_at(deadline, sock.recv(buf)).await {
                Err(_) if deadline == end => return Err(Ended::TooLong),
                Err(_) => return Ok(None),
                Ok(Err(_)) => return Err(Ended::Client("receive failed")),
                Ok(Ok(n)) => n,
            };
            if n < 4 {
                continue;
            }
            match u16::from_be_bytes([buf[0], buf[1]]) {
                OP_ACK => return Ok(Some(u16::from_be_bytes([buf[2], buf[3]]))),
                OP_ERROR => return Err(Ended::Client("client sent an error")),
                _ => continue,
            }
        }
    }
}

/// Why waiting for an ACK ended a transfer.
enum Ended {
    /// The client's doing.
    Client(&'static str),
    /// `max_transfer_s` passed.
    TooLong,
}

const TOO_LONG: &str = "transfer took longer than the server allows";

/// RFC 764 netascii: LF becomes CR LF, a bare CR becomes CR NUL.
fn to_netascii(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_path_accepts_plain_names_only() {
        assert_eq!(
            safe_relative_path("ipxe.efi"),
            Some(PathBuf::from("ipxe.efi"))
        );
        assert_eq!(
            safe_relative_path("arm64/snponly.efi"),
            Some(PathBuf::from("arm64/snponly.efi"))
        );
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "\\..\\x",
            "a\0b",
            "./x",
            "..",
        ] {
            assert_eq!(safe_relative_path(bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_requests_with_options_and_refuses_malformed_ones() {
        let r = parse_request(
            b"\x00\x01ipxe.efi\x00octet\x00blksize\x001468\x00tsize\x000\x00windowsize\x004\x00",
        )
        .expect("valid RRQ");
        assert_eq!(r.blksize, Some(1468));
        assert!(r.tsize);
        assert_eq!(r.windowsize, Some(4));
        assert!(!r.write);
        for bad in [
            &b"\x00\x01ipxe.efi"[..],
            b"\x00\x01ipxe.efi\x00",
            b"\x00\x01ipxe.efi\x00octet",
            b"\x00\x01ipxe.efi\x00mail\x00",
            b"\x00\x01\x00octet\x00",
            b"\x00\x01ipxe.efi\x00octet\x00blksize\x00",
            b"\x00\x03\x00\x01data",
            b"\x00",
        ] {
            assert_eq!(parse_request(bad), None, "{bad:?} accepted");
        }
    }

    #[test]
    fn confined_root_refuses_symlink_escapes_and_sibling_prefixes() {
        let base = tempfile::tempdir().expect("tempdir");
        let root = base.path().join("tftp");
        let sibling = base.path().join("tftp-private");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::create_dir_all(&sibling).expect("mkdir");
        std::fs::write(root.join("ok.bin"), b"ok").expect("write");
        std::fs::write(sibling.join("secret"), b"secret").expect("write");
        std::os::unix::fs::symlink(&sibling, root.join("sub/out")).expect("symlink");
        std::os::unix::fs::symlink("../ok.bin", root.join("sub/in")).expect("symlink");
        let r = ConfinedRoot::open(&root).expect("root");
        assert!(r.open_file("ok.bin").is_ok());
        assert!(
            r.open_file("sub/in").is_ok(),
            "a symlink staying inside is fine"
        );
        assert!(matches!(
            r.open_file("sub/out/secret"),
            Err(OpenError::Escape)
        ));
        assert!(matches!(
            r.open_file("../tftp-private/secret"),
            Err(OpenError::BadName)
        ));
        assert!(matches!(r.open_file("sub"), Err(OpenError::NotFile)));
        assert!(matches!(r.open_file("nope"), Err(OpenError::NotFound)));
    }

    #[test]
    fn netascii_converts_line_ends() {
        assert_eq!(&to_netascii(b"a\nb\rc")[..], b"a\r\nb\r\0c");
    }

    #[test]
    fn configured_programs_may_point_outside_but_only_to_the_pinned_file() {
        let base = tempfile::tempdir().expect("tempdir");
        let root = base.path().join("root");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::write(base.path().join("ipxe.efi"), b"efi").expect("write");
        std::fs::write(base.path().join("other"), b"other").expect("write");
        std::os::unix::fs::symlink(base.path().join("ipxe.efi"), root.join("ipxe.efi"))
            .expect("symlink");
        std::os::unix::fs::symlink(base.path().join("other"), root.join("unlisted"))
            .expect("symlink");
        let r = ConfinedRoot::open_with_programs(&root, ["ipxe.efi", "unlisted-not-configured"])
            .expect("root");
        assert!(
            r.open_file("ipxe.efi").is_ok(),
            "configured program refused"
        );
        assert!(matches!(r.open_file("unlisted"), Err(OpenError::Escape)));
        // Re-pointing the configured name elsewhere is refused.
        std::fs::remove_file(root.join("ipxe.efi")).expect("rm");
        std::os::unix::fs::symlink(base.path().join("other"), root.join("ipxe.efi"))
            .expect("symlink");
        assert!(matches!(r.open_file("ipxe.efi"), Err(OpenError::Escape)));
    }
}

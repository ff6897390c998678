//! The lease journal: durable, batched, off the packet path.
//!
//! The DHCP socket loop never touches the disk. When a lease is bound,
//! renewed, released or declined it hands the change — together with the ACK
//! that announces it, if any — to the journal thread over a bounded channel.
//! The thread takes everything queued (group commit), appends one JSON line per
//! change, calls `fdatasync` once for the batch and only then sends the ACKs.
//! So no client is ever told about a lease that is not on disk, and one fsync
//! covers as many leases as arrived while the previous one ran.
//!
//! The file is an append-only log of [`LeaseChange`]s. When it grows past
//! twice the live leases (plus slack) the thread rewrites it as a snapshot:
//! temp file, fsync, rename, fsync of the directory. A torn last line (crash
//! mid-append) is skipped on load.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::leases::LeaseChange;
use crate::mac::MacAddr;
use crate::persist::{sync_dir, PersistError};

/// Capacity of the queue between the socket loop and the journal thread.
const QUEUE: usize = 16384;
/// Most changes written per fsync.
const MAX_BATCH: usize = 8192;

/// A reply to send once its change is durable.
#[derive(Debug)]
pub struct DeferredReply {
    /// Encoded DHCP message.
    pub data: Vec<u8>,
    /// Where it goes.
    pub dest: SocketAddr,
    /// Socket to send it on (the one the request came in on).
    pub socket: usize,
}

struct Job {
    change: LeaseChange,
    reply: Option<DeferredReply>,
}

/// Handle to the journal thread.
#[derive(Clone)]
pub struct Journal {
    tx: SyncSender<Job>,
}

/// The journal queue is full; the caller drops the packet and the client retries.
#[derive(Debug, thiserror::Error)]
#[error("lease journal queue is full")]
pub struct JournalFull;

impl Journal {
    /// Queues a change (and the reply that must wait for it).
    pub fn submit(
        &self,
        change: LeaseChange,
        reply: Option<DeferredReply>,
    ) -> Result<(), JournalFull> {
        match self.tx.try_send(Job { change, reply }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(JournalFull),
        }
    }
}

/// Reads the journal at `path` (missing file = no leases).
pub fn load(path: &Path) -> Result<Vec<LeaseChange>, PersistError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PersistError::new("opening lease journal", path, e)),
    };
    let mut out = Vec::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| PersistError::new("reading lease journal", path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<LeaseChange>(&line) {
            Ok(c) => out.push(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping unreadable lease journal line")
            }
        }
    }
    Ok(out)
}

/// Starts the journal thread. `sockets` are the DHCP sockets deferred replies
/// are sent on (clones of the listening sockets' descriptors).
pub fn start(
    path: PathBuf,
    initial: &[LeaseChange],
    sockets: Vec<UdpSocket>,
) -> Result<(Journal, JoinHandle<()>), PersistError> {
    let mut live: HashMap<MacAddr, LeaseChange> = HashMap::new();
    for c in initial {
        apply(&mut live, c);
    }
    let mut writer = Writer {
        file: compact(&path, &live)?,
        path,
        lines: live.len(),
        live,
    };
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let handle = std::thread::Builder::new()
        .name("lease-journal".into())
        .spawn(move || writer.run(rx, sockets))
        .map_err(|e| PersistError::new("starting lease journal thread", Path::new("-"), e))?;
    Ok((Journal { tx }, handle))
}

fn apply(live: &mut HashMap<MacAddr, LeaseChange>, c: &LeaseChange) {
    match c {
        LeaseChange::Bind { mac, .. } => {
            live.insert(*mac, c.clone());
        }
        LeaseChange::Free { mac, ip } => {
            if matches!(live.get(mac), Some(LeaseChange::Bind { ip: bound, .. }) if bound == ip) {
                live.remove(mac);
            }
        }
    }
}

/// Writes a snapshot of `live` to `path` atomically and opens it for appending.
fn compact(path: &Path, live: &HashMap<MacAddr, LeaseChange>) -> Result<File, PersistError> {
    let tmp = path.with_extension("journal.partial");
    let write = || -> io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = io::BufWriter::new(crate::persist::create_private(&tmp, true)?);
        for c in live.values() {
            serde_json::to_writer(&mut f, c)?;
            f.write_all(b"\n")?;
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    };
    write().map_err(|e| PersistError::new("writing lease snapshot", &tmp, e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| PersistError::new("renaming lease snapshot", path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| PersistError::new("opening lease journal", path, e))
}

struct Writer {
    file: File,
    path: PathBuf,
    lines: usize,
    live: HashMap<MacAddr, LeaseChange>,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Job>, sockets: Vec<UdpSocket>) {
        let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        // recv() fails only when every sender is gone: the server is stopping.
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            buf.clear();
            for job in &batch {
                // Serialising these plain types cannot fail; a failure would be a bug.
                if let Err(e) = serde_json::to_writer(&mut buf, &job.change) {
                    tracing::error!(error = %e, "encoding lease change");
                    continue;
                }
                buf.push(b'\n');
                apply(&mut self.live, &job.change);
            }
            self.lines += batch.len();
            let durable = self
                .file
                .write_all(&buf)
                .and_then(|()| self.file.sync_data());
            match durable {
                Ok(()) => {
                    for job in batch.drain(..) {
                        if let Some(r) = job.reply {
                            if let Some(sock) = sockets.get(r.socket) {
                                send_retrying(sock, &r.data, r.dest);
                            }
                        }
                    }
                }
                Err(e) => {
                    // No ACK for a lease that is not on disk: the clients retry.
                    tracing::error!(path = %self.path.display(), error = %e, leases = batch.len(), "lease journal write failed; withholding ACKs");
                    batch.clear();
                }
            }
            if self.lines > 2 * self.live.len() + 10_000 {
                match compact(&self.path, &self.live) {
                    Ok(f) => {
                        self.file = f;
                        self.lines = self.live.len();
                        tracing::debug!(leases = self.lines, "lease journal compacted");
                    }
                    Err(e) => tracing::error!(error = %e, "lease journal compaction failed"),
                }
            }
        }
        tracing::debug!("lease journal thread stopped");
    }
}

/// Sends on a non-blocking socket, waiting briefly while its buffer is full.
fn send_retrying(sock: &UdpSocket, data: &[u8], dest: SocketAddr) {
    for _ in 0..50 {
        match sock.send_to(data, dest) {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => {
                tracing::debug!(%dest, error = %e, "sending deferred DHCP reply");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn journal_survives_restart_and_skips_a_torn_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("leases.journal");
        let m = MacAddr([2, 0, 0, 0, 0, 1]);
        let bind = LeaseChange::Bind {
            mac: m,
            ip: Ipv4Addr::new(10, 0, 0, 5),
            expires: 100,
            hostname: None,
        };
        {
            let (j, h) = start(path.clone(), &[], vec![]).expect("start");
            j.submit(bind.clone(), None).expect("queue");
            drop(j);
            h.join().expect("journal thread");
        }
        // A crash in the middle of an append leaves a partial line.
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"op\":\"bind\",\"mac\":\"02:00")
            .expect("write");
        drop(f);
        let loaded = load(&path).expect("load");
        assert_eq!(loaded, vec![bind]);
    }
}

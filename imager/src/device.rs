//! Sources and targets: regular files and block devices, whole or a byte
//! range of one (a partition addressed through its table, never through a
//! kernel partition node).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::ioctl;

/// Random-access reads of exactly `buf.len()` bytes.
pub trait ReadAt: Send + Sync {
    /// Fill `buf` from `offset`; an error if the range is not fully readable.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Size of the readable space in bytes.
    fn size(&self) -> u64;
    /// Hint that `[offset, offset+len)` will be read soon (read-ahead).
    /// Best effort; the default does nothing.
    fn will_need(&self, _offset: u64, _len: u64) {}
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the source",
    )
}

/// What kind of object a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A regular file (disk image file).
    File,
    /// A block device.
    Block,
}

/// An open file or block device with its size and sector size.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
    kind: DeviceKind,
    size: u64,
    sector_size: u32,
    physical_sector_size: u32,
    writable: bool,
    /// The same file opened again with `O_DIRECT`, for writes whose
    /// offset and length are multiples of [`DIRECT_ALIGN`] (None where the
    /// filesystem refuses `O_DIRECT`, or with `AULA_NO_DIRECT=1`).
    direct: Option<File>,
    /// A direct write was refused: buffered writes from then on.
    direct_refused: std::sync::atomic::AtomicBool,
    /// For a device opened read-only (a create's source): the same file
    /// opened again with `O_DIRECT`, for reads whose buffer, offset and
    /// length are multiples of [`DIRECT_ALIGN`] (see [`open_direct`]).
    direct_read: Option<File>,
    /// Holes are worth asking the kernel for (`SEEK_DATA`): regular files
    /// not on tmpfs (see [`seeks_holes_cheaply`]).
    seek_holes: bool,
    /// Upper bound of the 512-byte sectors the kernel may count as written
    /// because of writes through this handle (see [`Device::own_write_sectors`]).
    own_writes: AtomicU64,
}

/// The page size writes are rounded to when bounding their sectors.
fn page_size() -> u64 {
    // SAFETY: sysconf takes an integer and touches no memory of ours.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p >= 512).unwrap_or(4096)
}

/// Alignment (memory, offset, length) of the writes sent with `O_DIRECT`:
/// a page, which covers 512-byte and 4 KiB logical blocks.
pub const DIRECT_ALIGN: usize = 4096;

/// One page of an [`AlignedBuf`].
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; DIRECT_ALIGN]);

/// A zero-filled byte buffer that starts on a page boundary, so slices of
/// it at page-aligned offsets go to and from the disk with `O_DIRECT`
/// without a bounce copy.
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf {
            pages: vec![Page([0; DIRECT_ALIGN]); len.div_ceil(DIRECT_ALIGN)],
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `Page` is a repr(C) byte array without padding, so the
        // Vec's pages are `pages.len() * DIRECT_ALIGN` contiguous,
        // initialised bytes, of which `len` is at most that many; the slice
        // borrows `self`.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and the slice borrows `self` mutably, so
        // nothing else can reach the pages while it lives.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// tmpfs's magic number in `statfs`'s `f_type`.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Whether `SEEK_DATA` is cheap on `file`'s file system. tmpfs answers it
/// by walking the file's pages from the offset on, under the inode's lock:
/// asked once per window of a mostly sparse 3 GiB target, that made a
/// restore quadratic (17 s, 31 s of system time, against 0.4 s on disk).
/// Reading a tmpfs window is as cheap as the question, so none is asked.
fn seeks_holes_cheaply(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes one `statfs` into the buffer we own (zeroed,
    // so every field is initialised whatever it fills) and reads nothing.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    // SAFETY: the buffer was zero-initialised, a valid `statfs`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // i64 with glibc, u64 with musl
    let on_tmpfs = rc == 0 && st.f_type as u64 == TMPFS_MAGIC;
    !on_tmpfs
}

/// `path` opened again with `O_DIRECT`, for writing (`write`) or reading,
/// if its file system allows it; `AULA_NO_DIRECT=1` turns this off (every
/// read and write through the page cache), to compare the two on a given
/// machine or virtual disk.
///
/// Writing: whole aligned windows go to the disk without being copied
/// into the page cache: on a 2-core VM a restore's buffered writes cost
/// 1.4–2.2 CPU seconds per 1.7 GiB (page cache copies, and the two workers
/// contending for the file's lock), direct ones 0.3–0.45.
///
/// Reading: a create reads its source once, so the page cache only costs
/// it: on a 2-core VM, reading 1.6 GiB cold through it took 2.5 s of
/// system time (page allocation, read-ahead, the copy out), directly
/// 0.07 s, and a create of the NTFS bench volume spent 0.4 s less system
/// time. A direct read waits for the disk, so create reads ahead of its
/// workers on threads of their own.
fn open_direct(path: &Path, write: bool) -> Option<File> {
    if no_direct() {
        return None;
    }
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// `AULA_NO_DIRECT=1`: no `O_DIRECT` at all, every read and write through
/// the page cache.
fn no_direct() -> bool {
    std::env::var_os("AULA_NO_DIRECT").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether `buf` at `offset` may be read or written with `O_DIRECT`.
fn direct_aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
        && buf.len().is_multiple_of(DIRECT_ALIGN)
}

/// Hint that `[offset, offset+len)` of `file` will be read soon (`len`
/// 0: to its end), so the kernel starts reading it. Best effort.
pub(crate) fn will_need(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only takes the descriptor and plain integers;
    // it never touches memory we own.
    let _ = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
}

thread_local! {
    /// Each writing thread's page-aligned copy of what it writes directly.
    static BOUNCE: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::new(0));
}

/// Write `buf` (length a multiple of [`DIRECT_ALIGN`]) at `offset` through
/// the `O_DIRECT` handle, from a page-aligned copy when `buf` itself is not
/// page-aligned.
fn write_direct(f: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    if (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
        return f.write_all_at(buf, offset);
    }
    BOUNCE.with(|b| {
        let mut b = b.try_borrow_mut().map_err(io::Error::other)?;
        if b.len() < buf.len() {
            *b = AlignedBuf::new(buf.len());
        }
        let aligned = &mut b[..buf.len()];
        aligned.copy_from_slice(buf);
        f.write_all_at(aligned, offset)
    })
}

/// Creates the file `path` (which must not exist yet) holding `bytes`,
/// and fsyncs it. Its page-aligned head goes to the disk with `O_DIRECT`
/// (from a page-aligned copy), its tail of under a page through the page
/// cache; where the file system refuses `O_DIRECT` (or with
/// `AULA_NO_DIRECT=1`) everything goes through the page cache. A create
/// stores each chunk this way: copying its frames into fresh page-cache
/// pages cost about 7 % of a create's CPU on a 2-core VM, and the file is
/// fsynced at once anyway, so the cached copy only cost time.
pub(crate) fn write_new_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new().write(true).create_new(true).open(path)?;
    let head = bytes.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    let mut done = 0;
    if head > 0 {
        if let Some(d) = open_direct(path, true) {
            if write_direct(&d, &bytes[..head], 0).is_ok() {
                done = head;
            }
        }
    }
    // Whatever was not written directly (all of it after a refusal, which
    // may have written part of the head: written again here).
    f.write_all_at(&bytes[done..], done as u64)?;
    f.sync_all()
}

/// How to open a device.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenMode {
    /// Open read-write.
    pub write: bool,
    /// For regular files: create it when missing (size set by the caller).
    pub create: bool,
    /// For block devices: open with O_EXCL so the kernel refuses when a
    /// partition is mounted or otherwise held.
    pub exclusive: bool,
}

impl Device {
    /// Open a source read-only.
    pub fn open_read(path: &Path) -> io::Result<Device> {
        Self::open(path, OpenMode::default())
    }

    /// Open with the given mode, reading size and sector size from the
    /// kernel for block devices.
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<Device> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(mode.write);
        if mode.create {
            opts.create(true);
        }
        if mode.exclusive {
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts.open(path)?;
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let (kind, size, ss, pss) = if ft.is_block_device() {
            let fd = file.as_fd();
            let size = ioctl::block_size_bytes(fd)?;
            let ss = ioctl::logical_sector_size(fd)?;
            let pss = ioctl::physical_sector_size(fd).unwrap_or(ss);
            (DeviceKind::Block, size, ss, pss)
        } else if ft.is_file() {
            (DeviceKind::File, meta.len(), 512, 512)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        let seek_holes = kind == DeviceKind::File && seeks_holes_cheaply(&file);
        Ok(Device {
            file,
            path: path.to_path_buf(),
            kind,
            size,
            sector_size: ss,
            physical_sector_size: pss,
            writable: mode.write,
            direct: if mode.write {
                open_direct(path, true)
            } else {
                None
            },
            direct_refused: std::sync::atomic::AtomicBool::new(false),
            direct_read: if mode.write {
                None
            } else {
                open_direct(path, false)
            },
            seek_holes,
            own_writes: AtomicU64::new(0),
        })
    }

    /// An upper bound of the 512-byte sectors the kernel's write counters
    /// (`/sys/block/*/stat`) can show for the writes made through this
    /// handle so far: buffered writes are counted in whole pages (writeback
    /// writes at most the pages a write dirtied), `BLKZEROOUT` exactly.
    /// Restore records compare it with the counters to tell whether anyone
    /// else wrote to the disk during a restore.
    pub fn own_write_sectors(&self) -> u64 {
        self.own_writes.load(Ordering::Relaxed)
    }

    /// Aligned writes still go through the `O_DIRECT` handle.
    fn direct_ok(&self) -> bool {
        self.direct.is_some() && !self.direct_refused.load(Ordering::Relaxed)
    }

    fn count_write(&self, offset: u64, len: u64, exact: bool) {
        let sectors = if exact {
            len.div_ceil(512)
        } else {
            let page = page_size();
            let first = offset / page * page;
            let end = offset
                .saturating_add(len)
                .div_ceil(page)
                .saturating_mul(page);
            (end - first) / 512
        };
        self.own_writes.fetch_add(sectors, Ordering::Relaxed);
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// File or block device.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Logical sector size (512 for regular files unless overridden).
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }
    /// Physical sector size.
    pub fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }
    /// Treat a regular file as having this logical sector size (disk image
    /// files carry no sector size of their own).
    pub fn set_sector_size(&mut self, ss: u32) {
        if self.kind == DeviceKind::File {
            self.sector_size = ss;
            self.physical_sector_size = ss;
        }
    }
    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Grow a regular file to `len` bytes (sparse). Block devices cannot grow.
    pub fn grow_to(&mut self, len: u64) -> io::Result<()> {
        if self.kind != DeviceKind::File {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cannot resize a block device",
            ));
        }
        if len > self.size {
            self.file.set_len(len)?;
            self.size = len;
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`, refusing to write past the end.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        if end > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write of {} bytes at {offset} past the end ({})",
                    buf.len(),
                    self.size
                ),
            ));
        }
        self.count_write(offset, buf.len() as u64, false);
        let aligned = offset.is_multiple_of(DIRECT_ALIGN as u64)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && !buf.is_empty();
        if let Some(d) = self.direct.as_ref().filter(|_| aligned && self.direct_ok()) {
            match write_direct(d, buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Alignment this file system or device will not take:
                    // buffered writes from now on.
                    tracing::debug!(
                        "{}: O_DIRECT write refused ({e}); writing through the page cache",
                        self.path.display()
                    );
                    self.direct_refused.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(buf, offset)
    }

    /// Make a range read back as zeros, cheaply where the kernel can
    /// (hole punching on files, BLKZEROOUT on block devices).
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let aligned = offset.is_multiple_of(512) && len.is_multiple_of(512);
        match self.kind {
            DeviceKind::File => {
                use std::os::fd::AsRawFd;
                let r = nix::fcntl::fallocate(
                    self.file.as_raw_fd(),
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    offset as i64,
                    len as i64,
                );
                if r.is_ok() {
                    return Ok(());
                }
            }
            DeviceKind::Block if aligned && offset.is_multiple_of(self.sector_size as u64) => {
                // Counted first: a failed ioctl may have zeroed part of it.
                self.count_write(offset, len, true);
                if ioctl::zero_out(self.file.as_fd(), offset, len).is_ok() {
                    return Ok(());
                }
            }
            DeviceKind::Block => {}
        }
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// For regular files: true when `[offset, offset+len)` is entirely a
    /// hole (reads as zeros without touching the data). Always false for
    /// block devices.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        if self.kind != DeviceKind::File || !self.seek_holes || len == 0 {
            return false;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a descriptor we own; SEEK_DATA only queries, and we
        // never rely on the file position (all I/O is positional).
        let next = unsafe {
            libc::lseek(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                libc::SEEK_DATA,
            )
        };
        if next < 0 {
            // ENXIO: no data at or after offset.
            return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        next as u64 >= offset + len
    }

    /// Ask the kernel to re-read a block device's partition table, retrying
    /// a few times while the device is busy. Regular files: nothing to do.
    pub fn reread_partition_table(&self) -> io::Result<()> {
        if self.kind != DeviceKind::Block {
            return Ok(());
        }
        let mut delay = std::time::Duration::from_millis(100);
        for attempt in 1..=5 {
            match ioctl::reread_partition_table(self.file.as_fd()) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 5 => {
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                other => return other,
            }
        }
        Ok(())
    }

    /// Hint that `[offset, offset+len)` will be read soon, so the kernel
    /// starts reading it in the background. Best effort.
    /// Ranges that will be read directly are not: the hint would fill the
    /// page cache the direct read passes by.
    pub fn will_need(&self, offset: u64, len: u64) {
        let direct = self.direct_read.is_some()
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && len.is_multiple_of(DIRECT_ALIGN as u64);
        if !direct {
            will_need(&self.file, offset, len);
        }
    }

    /// Flush written data to stable storage. An error here is fatal for the
    /// job: a failed fsync may have dropped the dirty pages.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

impl ReadAt for Device {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(eof());
        }
        if let Some(d) = self
            .direct_read
            .as_ref()
            .filter(|_| direct_aligned(buf, offset))
        {
            match d.read_exact_at(buf, offset) {
                // A refusal (EINVAL: an alignment the device does not
                // take) falls back to the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                r => return r,
            }
        }
        self.file.read_exact_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn will_need(&self, offset: u64, len: u64) {
        Device::will_need(self, offset, len)
    }
}

/// A byte range of a device: a whole device, or one partition of it.
#[derive(Debug, Clone)]
pub struct Region {
    dev: Arc<Device>,
    offset: u64,
    len: u64,
}

impl Region {
    /// The whole device.
    pub fn whole(dev: Arc<Device>) -> Region {
        let len = dev.size();
        Region {
            dev,
            offset: 0,
            len,
        }
    }

    /// A sub-range; an error when it does not fit the device.
    pub fn new(dev: Arc<Device>, offset: u64, len: u64) -> io::Result<Region> {
        if offset.checked_add(len).is_none_or(|e| e > dev.size()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} does not fit {} ({} bytes)",
                    dev.path().display(),
                    dev.size()
                ),
            ));
        }
        Ok(Region { dev, offset, len })
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }
    /// Start on the device, in bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, n: usize) -> io::Result<u64> {
        match offset.checked_add(n as u64) {
            Some(end) if end <= self.len => Ok(self.offset + offset),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "access of {n} bytes at {offset} outside a region of {} bytes",
                    self.len
                ),
            )),
        }
    }

    /// Write inside the region (bounds checked).
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let at = self.check(offset, buf.len())?;
        self.dev.write_all_at(buf, at)
    }

    /// Zero a range inside the region.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let at = self.check(offset, len as usize)?;
        self.dev.zero_range(at, len)
    }

    /// Read-ahead hint for a range inside the region.
    pub fn will_need(&self, offset: u64, len: u64) {
        if let Ok(at) = self.check(offset, len.min(self.len.saturating_sub(offset)) as usize) {
            self.dev.will_need(at, len.min(self.len - offset));
        }
    }

    /// True when the range is a hole of a regular file.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.check(offset, len as usize)
            .map(|at| self.dev.is_hole(at, len))
            .unwrap_or(false)
    }
}

impl ReadAt for Region {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let at = self.check(offset, buf.len())?;
        self.dev.read_exact_at(buf, at)
    }
    fn size(&self) -> u64 {
        self.len
    }
    fn will_need(&self, offset: u64, len: u64) {
        Region::will_need(self, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `p` opened read-write.
    fn open_rw(p: &Path) -> Device {
        Device::open(
            p,
            OpenMode {
                write: true,
                ..Default::default()
            },
        )
        .expect("open")
    }

    #[test]
    fn region_bounds_are_enforced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![7u8; 8192]).expect("write");
        let dev = Arc::new(open_rw(&p));
        assert_eq!(dev.kind(), DeviceKind::File);
        let r = Region::new(dev.clone(), 4096, 2048).expect("region");
        let mut b = [0u8; 2048];
        r.read_exact_at(&mut b, 0).expect("read");
        assert!(r.read_exact_at(&mut b, 1).is_err());
        assert!(r.write_all_at(&[1, 2, 3], 2046).is_err());
        r.write_all_at(&[1, 2], 2046).expect("write at end");
        assert!(Region::new(dev, 8000, 200).is_err());
    }

    #[test]
    fn aligned_writes_go_direct_and_read_back_with_buffered_ones_around_them() {
        // A disk-backed directory (tmpfs may refuse O_DIRECT).
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![7u8; 64 << 10]).expect("write");
        let dev = open_rw(&p);
        assert!(dev.direct_ok(), "a file on disk takes O_DIRECT");
        // Cached first (buffered), then overwritten directly: the direct
        // write must win over the page cache's copy.
        dev.write_all_at(&[1u8; 100], 8192).expect("buffered");
        let mut expect = vec![7u8; 64 << 10];
        expect[8192..8292].fill(1);
        let mut back = vec![0u8; 64 << 10];
        dev.read_exact_at(&mut back, 0).expect("read");
        assert!(back == expect);
        // An aligned window from an unaligned slice (bounced), one from an
        // aligned one, and a short tail that goes buffered.
        let data: Vec<u8> = (0..(16 << 10) + 1).map(|i| (i % 251) as u8).collect();
        let unaligned = &data[1..];
        assert!(!(unaligned.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        dev.write_all_at(unaligned, 4096).expect("bounced");
        expect[4096..4096 + (16 << 10)].copy_from_slice(unaligned);
        let mut page = vec![0u8; 2 * DIRECT_ALIGN];
        let off = page.as_ptr().align_offset(DIRECT_ALIGN);
        page[off..off + DIRECT_ALIGN].fill(9);
        dev.write_all_at(&page[off..off + DIRECT_ALIGN], 32 << 10)
            .expect("aligned");
        expect[32 << 10..(32 << 10) + DIRECT_ALIGN].fill(9);
        dev.write_all_at(&[5u8; 10], 40 << 10).expect("tail");
        expect[40 << 10..(40 << 10) + 10].fill(5);
        assert!(dev.direct_ok(), "no direct write was refused");
        dev.sync().expect("sync");
        dev.read_exact_at(&mut back, 0).expect("read");
        assert!(back == expect, "what was written reads back");
        drop(dev);
        assert!(std::fs::read(&p).expect("reread") == expect);
    }

    /// Whether no page of `[off, off+len)` of `f` is in the page cache
    /// (`mincore` on a mapping of it, which reads nothing in).
    fn uncached(f: &File, off: u64, len: usize) -> bool {
        use std::os::fd::AsRawFd;
        let page = DIRECT_ALIGN as u64;
        let start = off / page * page;
        let span = (off + len as u64).div_ceil(page) * page - start;
        // SAFETY: a fresh read-only shared mapping of the file's range; no
        // Rust reference to it is ever made, and it is unmapped below.
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                start as libc::off_t,
            )
        };
        assert!(
            m != libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        let mut vec = vec![0u8; (span / page) as usize];
        // SAFETY: `m` maps `span` bytes; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(m, span as usize, vec.as_mut_ptr()) };
        // SAFETY: the mapping made above, of that length, unused after.
        unsafe { libc::munmap(m, span as usize) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().all(|&b| b & 1 == 0)
    }

    #[test]
    fn a_read_only_device_reads_aligned_ranges_past_the_page_cache() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let p = dir.path().join("src.img");
        let data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 241) as u8).collect();
        std::fs::write(&p, &data).expect("write");
        let f = File::open(&p).expect("open");
        f.sync_all().expect("sync");
        // SAFETY: posix_fadvise takes the descriptor and integers only.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        assert!(uncached(&f, 0, 256 << 10), "evicted");
        let dev = Device::open_read(&p).expect("open");
        assert!(
            dev.direct_read.is_some(),
            "a file on disk takes O_DIRECT reads"
        );
        // Aligned buffer, offset and length: read directly, still uncached.
        let mut buf = AlignedBuf::new(64 << 10);
        dev.read_exact_at(&mut buf, 64 << 10).expect("direct read");
        assert!(buf[..] == data[64 << 10..128 << 10]);
        assert!(uncached(&f, 64 << 10, 64 << 10), "read past the page cache");
        // A hint for an aligned range does not fill the cache either.
        dev.will_need(128 << 10, 64 << 10);
        assert!(
            uncached(&f, 128 << 10, 64 << 10),
            "no read-ahead for direct reads"
        );
        // Unaligned: through the page cache.
        let mut v = vec![0u8; 1000];
        dev.read_exact_at(&mut v, 4096 * 50 + 3)
            .expect("buffered read");
        assert!(v[..] == data[4096 * 50 + 3..4096 * 50 + 1003]);
        assert!(
            !uncached(&f, 4096 * 50, 1000),
            "an unaligned read is cached"
        );
    }

    #[test]
    fn new_files_go_to_disk_direct_but_for_their_tail_and_read_back_whole() {
        for base in ["/var/tmp", "/dev/shm"] {
            let dir = tempfile::tempdir_in(base).expect("tempdir");
            for len in [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, (1 << 20) + 5] {
                let p = dir.path().join(format!("f{len}"));
                let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
                // From an unaligned slice too: the head is bounced.
                write_new_synced(&p, &data).expect("write");
                if base == "/var/tmp" && len > DIRECT_ALIGN {
                    let f = File::open(&p).expect("open");
                    let head = len / DIRECT_ALIGN * DIRECT_ALIGN;
                    assert!(uncached(&f, 0, DIRECT_ALIGN), "{len}: the head went direct");
                    assert!(
                        !uncached(&f, head as u64, len - head),
                        "{len}: the tail is cached"
                    );
                }
                assert!(std::fs::read(&p).expect("read") == data, "{base} {len}");
                let e = write_new_synced(&p, b"other").expect_err("exists");
                assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
                assert!(std::fs::read(&p).expect("read") == data, "left as it was");
            }
        }
    }

    #[test]
    fn holes_are_not_sought_on_tmpfs_where_seeking_them_is_slow() {
        // A hole of a file on disk is one; on tmpfs none is reported (the
        // window is read instead: SEEK_DATA there walks page by page).
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let p = dir.path().join("sparse.img");
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(8 << 20))
            .expect("sparse file");
        assert!(open_rw(&p).is_hole(1 << 20, 1 << 20), "a hole on disk");
        let shm = std::path::Path::new("/dev/shm");
        let Ok(f) = std::fs::File::open(shm) else {
            return;
        };
        if seeks_holes_cheaply(&f) {
            return; // /dev/shm is not tmpfs here
        }
        let dir = tempfile::tempdir_in(shm).expect("tempdir");
        let p = dir.path().join("sparse.img");
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(8 << 20))
            .expect("sparse file");
        assert!(
            !open_rw(&p).is_hole(1 << 20, 1 << 20),
            "no hole sought on tmpfs"
        );
    }

    #[test]
    fn zero_range_and_hole_detection_on_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![0xaau8; 1 << 20]).expect("write");
        let dev = open_rw(&p);
        assert!(!dev.is_hole(0, 65536));
        dev.zero_range(65536, 65536).expect("zero");
        let mut b = vec![1u8; 65536];
        dev.read_exact_at(&mut b, 65536).expect("read");
        assert!(b.iter().all(|&x| x == 0));
    }
}

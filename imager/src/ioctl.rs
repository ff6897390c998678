//! The only place that talks to the kernel through raw ioctls.
//!
//! Each wrapper takes a borrowed file descriptor, so the descriptor is open for
//! the whole call, and returns `std::io::Error` with the OS error intact.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

// Linux <linux/fs.h>: _IOR(0x12, 114, size_t), _IO(0x12, 104), _IO(0x12, 123),
// _IO(0x12, 95), _IO(0x12, 127), _IO(0x12, 97).
nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_sszget, 0x1268, libc::c_int);
nix::ioctl_read_bad!(blk_pbszget, 0x127b, libc::c_uint);
nix::ioctl_none!(blk_rrpart, 0x12, 95);
nix::ioctl_write_ptr!(blk_zeroout, 0x12, 127, [u64; 2]);
nix::ioctl_none!(blk_flsbuf, 0x12, 97);

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Size of a block device in bytes (BLKGETSIZE64).
pub fn block_size_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: `fd` is a live descriptor for the duration of the call and
    // `size` is a valid, writable u64 that the kernel fills in.
    unsafe { blk_getsize64(fd.as_raw_fd(), &mut size) }.map_err(errno)?;
    Ok(size)
}

/// Logical sector size of a block device (BLKSSZGET).
pub fn logical_sector_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: live descriptor; `v` is a valid int for the kernel to write.
    unsafe { blk_sszget(fd.as_raw_fd(), &mut v) }.map_err(errno)?;
    u32::try_from(v).map_err(|_| io::Error::other("negative sector size"))
}

/// Physical sector size of a block device (BLKPBSZGET).
pub fn physical_sector_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: live descriptor; `v` is a valid unsigned int for the kernel to write.
    unsafe { blk_pbszget(fd.as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v)
}

/// Ask the kernel to re-read the partition table (BLKRRPART). EBUSY: a
/// partition is in use (or another opener holds the disk exclusively);
/// EINVAL: the kernel does not partition this device (e.g. a loop device
/// without partition scanning, or no partition-table support).
pub fn reread_partition_table(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: live descriptor; BLKRRPART takes no argument.
    unsafe { blk_rrpart(fd.as_raw_fd()) }.map_err(errno)?;
    Ok(())
}

/// Zero a byte range of a block device (BLKZEROOUT). Offset and length must
/// be multiples of the logical sector size.
pub fn zero_out(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: live descriptor; `range` is a valid [u64; 2] read by the kernel.
    unsafe { blk_zeroout(fd.as_raw_fd(), &range) }.map_err(errno)?;
    Ok(())
}

/// Write back and drop the kernel's buffer cache of a block device
/// (BLKFLSBUF), so reads through this node see what was written through
/// another (a partition node).
pub fn flush_buffers(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: live descriptor; BLKFLSBUF takes no argument.
    unsafe { blk_flsbuf(fd.as_raw_fd()) }.map_err(errno)?;
    Ok(())
}

// Linux <linux/fs.h>: FS_IOC_GETFLAGS _IOR('f', 1, long), FS_IOC_SETFLAGS
// _IOW('f', 2, long); the kernel reads and writes an int at the pointer.
nix::ioctl_read!(fs_ioc_getflags, b'f', 1, libc::c_long);
nix::ioctl_write_ptr!(fs_ioc_setflags, b'f', 2, libc::c_long);

/// `FS_IMMUTABLE_FL`: efivarfs sets it on variables whose removal could
/// harm the machine (every `Boot####`, `BootOrder`, …).
pub const FS_IMMUTABLE_FL: u32 = 0x0000_0010;

/// The inode flags of an open file (FS_IOC_GETFLAGS, as `lsattr` reads them).
pub fn file_flags(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut v: libc::c_long = 0;
    // SAFETY: live descriptor; `v` is a valid, zeroed long, at least as wide
    // as the int the kernel writes at its address.
    unsafe { fs_ioc_getflags(fd.as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v as u32)
}

/// Sets the inode flags of an open file (FS_IOC_SETFLAGS, as `chattr`).
pub fn set_file_flags(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    let v = libc::c_long::from(flags);
    // SAFETY: live descriptor; `v` is a valid long the kernel only reads
    // (its first int, which holds `flags` on little-endian machines and
    // the kernel's int-sized read on every Linux ABI this builds for).
    unsafe { fs_ioc_setflags(fd.as_raw_fd(), &v) }.map_err(errno)?;
    Ok(())
}

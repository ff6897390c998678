//! ext2 / ext3 / ext4: superblock parsing and the used-block map from the
//! block-group bitmaps.
//!
//! Layout facts used here (from the ext4 on-disk format documentation):
//!
//! * The superblock sits at byte 1024 whatever the block size. Blocks are
//!   `1024 << s_log_block_size` bytes (1 KiB to 64 KiB). With 1 KiB blocks
//!   `s_first_data_block` is 1: block 0 is the boot block, outside every
//!   group, and is always kept here.
//! * Group `g` starts at block `s_first_data_block + g * s_blocks_per_group`;
//!   the last group may be shorter. Each group's descriptor (32 bytes, or
//!   `s_desc_size` with the `64bit` feature) gives the location of its block
//!   bitmap, inode bitmap and inode table, which `flex_bg` may place in any
//!   group.
//! * The descriptor table follows the superblock (and its backups). With
//!   `meta_bg` the table beyond `s_first_meta_bg` blocks is split: the
//!   descriptor block for meta-group `m` lives in the first group of `m`
//!   (after that group's superblock backup, if any), with copies in the
//!   second and last groups.
//! * With a group-descriptor checksum (`uninit_bg` = `gdt_csum`, or
//!   `metadata_csum`) a group flagged `BLOCK_UNINIT` has no initialised
//!   bitmap; its used blocks are exactly its metadata: superblock backup,
//!   descriptor blocks (and reserved descriptor blocks), and its own block
//!   bitmap, inode bitmap and inode table wherever they live. This is the
//!   same set e2fsprogs marks when it loads the bitmaps, so the counts agree
//!   with partclone (which loads them through libext2fs).
//! * Superblock backups: every group without `sparse_super`; with it,
//!   groups 0, 1 and powers of 3, 5 and 7; with `sparse_super2`, group 0
//!   and the (up to) two groups named in `s_backup_bgs`.
//!
//! # Bounds
//!
//! The walker reads only the superblock, the group descriptors and the block
//! bitmaps (no inode or extent tree is walked). What the superblock says is
//! held to:
//!
//! | value | bound | why |
//! |---|---|---|
//! | block size | 1 KiB ..= 64 KiB | the format's range |
//! | blocks per group | [`MIN_BLOCKS_PER_GROUP`] (256, mke2fs's own lower limit) ..= 8 × block size, a multiple of 8 | one bitmap block per group; without the lower bound a crafted superblock made a group of one block and a descriptor table of GiBs |
//! | inodes per group | 1 ..= 8 × block size | one inode bitmap block |
//! | inode size | 128 ..= block size, a power of two | |
//! | descriptor size | 32 ..= block size, a power of two (≥ 64 with `64bit`) | |
//! | block count × block size | no overflow, ≤ the region | every offset fits |
//! | descriptors | read in windows of at most 1 MiB ([`DESC_WINDOW`]) as the walk reaches them | memory does not grow with the group count |
//! | groups | `(blocks − first data block) / blocks per group`, so ≤ region / 256 KiB | the loop is proportional to the region |
//! | bitmap reads | batches of ≤ 8 MiB | |
//! | metadata outside `BLOCK_UNINIT` groups | merged as it is collected | |
//! | used map | [`crate::extent::MAX_EXTENTS`] extents | see `extent` |

use crate::device::ReadAt;
use crate::extent::ExtentMap;

use super::bits::{for_each_set_run, set_range};
use super::{le16, le32, FsError, FsMeta, MapOptions};

const MAGIC: u16 = 0xEF53;

// s_feature_compat
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

// s_feature_incompat
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
/// Incompatible features that do not change where used blocks are recorded.
const INCOMPAT_SUPPORTED: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;
/// What ext3 understands; anything beyond makes blkid call it ext4.
const INCOMPAT_EXT3: u32 = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG;

// s_feature_ro_compat
const RO_SPARSE_SUPER: u32 = 0x1;
const RO_LARGE_FILE: u32 = 0x2;
const RO_BTREE_DIR: u32 = 0x4;
const RO_GDT_CSUM: u32 = 0x10;
const RO_BIGALLOC: u32 = 0x200;
const RO_METADATA_CSUM: u32 = 0x400;
const RO_ORPHAN_PRESENT: u32 = 0x10000;
/// Every read-only-compatible feature defined today (bigalloc is refused
/// separately: its bitmaps count clusters, not blocks).
const RO_KNOWN: u32 = 0x1_FFFF;
const RO_EXT3: u32 = RO_SPARSE_SUPER | RO_LARGE_FILE | RO_BTREE_DIR;

// s_state
const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;

// bg_flags
const BG_BLOCK_UNINIT: u16 = 0x2;

/// Largest single read of consecutive bitmap blocks.
const MAX_BATCH_BYTES: u64 = 8 << 20;

/// Fewest blocks per group accepted (`mke2fs` refuses fewer).
pub const MIN_BLOCKS_PER_GROUP: u64 = 256;

/// Largest piece of the descriptor table held in memory.
pub const DESC_WINDOW: u64 = 1 << 20;

/// `extra` ranges collected before they are merged.
const EXTRA_MERGE: usize = 1 << 16;

/// The parsed superblock: the few fields the walker needs.
#[derive(Debug, Clone)]
pub(super) struct Super {
    fstype: &'static str,
    block_size: u64,
    blocks_count: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    inodes_per_group: u64,
    inode_size: u64,
    desc_size: u64,
    reserved_gdt_blocks: u64,
    first_meta_bg: u64,
    backup_bgs: [u32; 2],
    state: u16,
    compat: u32,
    incompat: u32,
    ro_compat: u32,
    uuid: [u8; 16],
    label: String,
}

/// Reads and checks the superblock; `Ok(None)` when there is no ext magic.
pub(super) fn probe(src: &dyn ReadAt) -> Result<Option<Super>, FsError> {
    if src.size() < 2048 {
        return Ok(None);
    }
    let mut sb = [0u8; 1024];
    src.read_exact_at(&mut sb, 1024)?;
    if le16(&sb, 0x38) != MAGIC {
        return Ok(None);
    }
    let compat = le32(&sb, 0x5C);
    let incompat = le32(&sb, 0x60);
    let ro_compat = le32(&sb, 0x64);
    let fstype = if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        "jbd"
    } else if incompat & !INCOMPAT_EXT3 != 0 || ro_compat & !RO_EXT3 != 0 {
        "ext4"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    let corrupt = |why: String| FsError::Corrupt { fs: fstype, why };

    let log_bs = le32(&sb, 0x18);
    if log_bs > 6 {
        return Err(corrupt(format!(
            "block size 1024 << {log_bs} is out of range"
        )));
    }
    let block_size = 1024u64 << log_bs;
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let mut blocks_count = u64::from(le32(&sb, 0x04));
    if is64 {
        blocks_count |= u64::from(le32(&sb, 0x150)) << 32;
    }
    let rev = le32(&sb, 0x4C);
    let inode_size = if rev == 0 {
        128
    } else {
        u64::from(le16(&sb, 0x58))
    };
    let desc_size = if is64 { u64::from(le16(&sb, 0xFE)) } else { 32 };
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[0x68..0x78]);
    let s = Super {
        fstype,
        block_size,
        blocks_count,
        first_data_block: u64::from(le32(&sb, 0x14)),
        blocks_per_group: u64::from(le32(&sb, 0x20)),
        inodes_per_group: u64::from(le32(&sb, 0x28)),
        inode_size,
        desc_size,
        reserved_gdt_blocks: u64::from(le16(&sb, 0xCE)),
        first_meta_bg: u64::from(le32(&sb, 0x104)),
        backup_bgs: [le32(&sb, 0x24C), le32(&sb, 0x250)],
        state: le16(&sb, 0x3A),
        compat,
        incompat,
        ro_compat,
        uuid,
        label: super::trim_label(&String::from_utf8_lossy(super::until_nul(&sb[0x78..0x88]))),
    };
    if s.fstype == "jbd" {
        // An external journal: no groups to check.
        return Ok(Some(s));
    }
    // With bigalloc the bitmaps count clusters, so a group may hold more
    // blocks than a bitmap block has bits (the walker refuses bigalloc).
    let bigalloc = ro_compat & RO_BIGALLOC != 0;
    if s.blocks_per_group < MIN_BLOCKS_PER_GROUP
        || !s.blocks_per_group.is_multiple_of(8)
        || (!bigalloc && s.blocks_per_group > 8 * block_size)
    {
        return Err(corrupt(format!(
            "{} blocks per group (mke2fs makes {MIN_BLOCKS_PER_GROUP} to {}, multiples of 8)",
            s.blocks_per_group,
            8 * block_size
        )));
    }
    if s.first_data_block >= s.blocks_count {
        return Err(corrupt(format!(
            "first data block {} is not below the block count {}",
            s.first_data_block, s.blocks_count
        )));
    }
    if s.inode_size < 128 || s.inode_size > block_size || !s.inode_size.is_power_of_two() {
        return Err(corrupt(format!("inode size {}", s.inode_size)));
    }
    if s.inodes_per_group == 0 || s.inodes_per_group > 8 * block_size {
        return Err(corrupt(format!("{} inodes per group", s.inodes_per_group)));
    }
    if s.desc_size < 32
        || s.desc_size > block_size
        || !s.desc_size.is_power_of_two()
        || (is64 && s.desc_size < 64)
    {
        return Err(corrupt(format!("group descriptor size {}", s.desc_size)));
    }
    Ok(Some(s))
}

impl Super {
    /// Manifest metadata.
    pub(super) fn meta(&self) -> FsMeta {
        FsMeta {
            fstype: self.fstype.to_string(),
            label: (!self.label.is_empty()).then(|| self.label.clone()),
            uuid: (self.uuid != [0u8; 16]).then(|| format_uuid(&self.uuid)),
            block_size: u32::try_from(self.block_size).ok(),
            fs_size: self.blocks_count.checked_mul(self.block_size),
        }
    }

    fn group_count(&self) -> u64 {
        (self.blocks_count - self.first_data_block).div_ceil(self.blocks_per_group)
    }

    fn desc_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }

    fn gdt_blocks(&self) -> u64 {
        self.group_count().div_ceil(self.desc_per_block())
    }

    fn inode_table_blocks(&self) -> u64 {
        (self.inodes_per_group * self.inode_size).div_ceil(self.block_size)
    }

    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn group_block_count(&self, g: u64) -> u64 {
        (self.blocks_count - self.group_first_block(g)).min(self.blocks_per_group)
    }

    fn has_feature_meta_bg(&self) -> bool {
        self.incompat & INCOMPAT_META_BG != 0
    }

    /// Whether group `g` carries a superblock backup.
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return g == u64::from(self.backup_bgs[0]) || g == u64::from(self.backup_bgs[1]);
        }
        if g <= 1 || self.ro_compat & RO_SPARSE_SUPER == 0 {
            return true;
        }
        if g.is_multiple_of(2) {
            return false;
        }
        is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7)
    }

    /// Number of descriptor blocks stored in the classic layout (right after
    /// a superblock copy).
    fn old_desc_blocks(&self) -> u64 {
        if self.has_feature_meta_bg() {
            self.first_meta_bg + self.reserved_gdt_blocks
        } else {
            self.gdt_blocks() + self.reserved_gdt_blocks
        }
    }

    /// Block number holding descriptor block `i` (primary copy).
    fn desc_block(&self, i: u64) -> u64 {
        if !self.has_feature_meta_bg() || i < self.first_meta_bg {
            self.first_data_block + 1 + i
        } else {
            let g = i * self.desc_per_block();
            self.group_first_block(g) + u64::from(self.has_super(g))
        }
    }

    /// The blocks a group's own "base" metadata occupies: superblock backup
    /// and descriptor copies, as `(first block, count)` ranges.
    fn base_meta(&self, g: u64, out: &mut Vec<(u64, u64)>) {
        let first = self.group_first_block(g);
        let has_super = self.has_super(g);
        if has_super {
            out.push((first, 1));
        }
        let dpb = self.desc_per_block();
        if !self.has_feature_meta_bg() || g / dpb < self.first_meta_bg {
            if has_super {
                let start = first + 1;
                let n = self
                    .old_desc_blocks()
                    .min(self.blocks_count.saturating_sub(start));
                out.push((start, n));
            }
        } else {
            let r = g % dpb;
            if r == 0 || r == 1 || r == dpb - 1 {
                out.push((first + u64::from(has_super), 1));
            }
        }
    }

    fn fs_err_unsupported(&self, feature: String) -> FsError {
        FsError::Unsupported {
            fs: self.fstype,
            feature,
        }
    }

    fn corrupt(&self, why: String) -> FsError {
        FsError::Corrupt {
            fs: self.fstype,
            why,
        }
    }

    /// Refuses what the walker does not understand, and unclean filesystems
    /// unless forced.
    fn check(&self, src: &dyn ReadAt, opts: MapOptions) -> Result<(), FsError> {
        if self.fstype == "jbd" {
            return Err(self.fs_err_unsupported("external journal device (journal_dev)".into()));
        }
        if self.ro_compat & RO_BIGALLOC != 0 {
            return Err(self.fs_err_unsupported("bigalloc".into()));
        }
        if self.incompat & INCOMPAT_COMPRESSION != 0 {
            return Err(self.fs_err_unsupported("compression".into()));
        }
        let unknown = self.incompat & !INCOMPAT_SUPPORTED;
        if unknown != 0 {
            return Err(self.fs_err_unsupported(format!("incompatible feature bits {unknown:#x}")));
        }
        let unknown = self.ro_compat & !RO_KNOWN;
        if unknown != 0 {
            return Err(
                self.fs_err_unsupported(format!("read-only-compatible feature bits {unknown:#x}"))
            );
        }
        let fs_size = self
            .blocks_count
            .checked_mul(self.block_size)
            .ok_or_else(|| self.corrupt("block count overflows".into()))?;
        if fs_size > src.size() {
            return Err(self.corrupt(format!(
                "filesystem spans {fs_size} bytes but the region holds only {}",
                src.size()
            )));
        }
        if !opts.force {
            let mut why = Vec::new();
            if self.state & STATE_VALID == 0 {
                why.push("not cleanly unmounted");
            }
            if self.state & STATE_ERROR != 0 {
                why.push("errors recorded");
            }
            if self.incompat & INCOMPAT_RECOVER != 0 {
                why.push("journal needs recovery");
            }
            if self.ro_compat & RO_ORPHAN_PRESENT != 0 {
                why.push("orphan inodes present");
            }
            if !why.is_empty() {
                return Err(FsError::Unclean {
                    fs: self.fstype,
                    why: why.join(", "),
                });
            }
        }
        Ok(())
    }

    /// A reader of the descriptor table that holds at most
    /// [`DESC_WINDOW`] bytes of it at a time.
    fn descriptors(&self) -> Descs<'_> {
        Descs {
            sb: self,
            first: 0,
            blocks: 0,
            raw: Vec::new(),
        }
    }

    /// Builds the used-byte map.
    pub(super) fn used_map(
        &self,
        src: &dyn ReadAt,
        opts: MapOptions,
    ) -> Result<ExtentMap, FsError> {
        self.check(src, opts)?;
        let mut descs = self.descriptors();
        let bs = self.block_size;
        let csum = self.ro_compat & (RO_GDT_CSUM | RO_METADATA_CSUM) != 0;
        let itb = self.inode_table_blocks();
        let groups = self.group_count();

        let mut map = ExtentMap::new();
        // The boot block(s) before the first group (1 KiB blocks).
        map.add(0, self.first_data_block * bs);
        // Metadata of BLOCK_UNINIT groups that lives outside the group.
        let mut extra: Vec<(u64, u64)> = Vec::new();
        let mut scratch: Vec<(u64, u64)> = Vec::new();
        let mut group_bits = vec![0u8; (self.blocks_per_group as usize).div_ceil(8)];
        let mut batch: Vec<u8> = Vec::new();

        let mut g = 0u64;
        while g < groups {
            let d = descs.get(src, g)?;
            if csum && d.flags & BG_BLOCK_UNINIT != 0 {
                // Synthesise the bitmap from the group's metadata.
                group_bits.fill(0);
                let first = self.group_first_block(g);
                let count = self.group_block_count(g);
                scratch.clear();
                self.base_meta(g, &mut scratch);
                for (blk, n) in [
                    (d.block_bitmap, 1),
                    (d.inode_bitmap, 1),
                    (d.inode_table, itb),
                ] {
                    if blk != 0 {
                        scratch.push((blk, n));
                    }
                }
                for &(blk, n) in &scratch {
                    let end = blk.saturating_add(n);
                    if end > self.blocks_count {
                        return Err(self.corrupt(format!(
                            "group {g} metadata at block {blk}+{n} lies beyond the filesystem"
                        )));
                    }
                    // Part inside the group goes into its bitmap.
                    let s = blk.max(first);
                    let e = end.min(first + count);
                    if s < e {
                        set_range(&mut group_bits, s - first, e - s);
                    }
                    if blk < first {
                        extra.push((blk * bs, (end.min(first) - blk) * bs));
                    }
                    if end > first + count {
                        let s = blk.max(first + count);
                        extra.push((s * bs, (end - s) * bs));
                    }
                }
                if extra.len() > EXTRA_MERGE {
                    // flex_bg puts these side by side: they merge well.
                    let mut m = ExtentMap::from_ranges(extra.drain(..));
                    m.coarsen(crate::extent::MAX_EXTENTS);
                    extra.extend(m.extents().iter().map(|e| (e.start, e.len)));
                }
                add_group_runs(&mut map, &group_bits, first, count, bs);
                g += 1;
                continue;
            }
            // Initialised group(s): read a batch of consecutive bitmap blocks.
            let first_bm = d.block_bitmap;
            let mut n = 1u64;
            while g + n < groups && n * bs < MAX_BATCH_BYTES {
                let next = descs.get(src, g + n)?;
                if (csum && next.flags & BG_BLOCK_UNINIT != 0)
                    || Some(next.block_bitmap) != first_bm.checked_add(n)
                {
                    break;
                }
                n += 1;
            }
            if first_bm < self.first_data_block
                || first_bm
                    .checked_add(n)
                    .is_none_or(|e| e > self.blocks_count)
            {
                return Err(self.corrupt(format!(
                    "group {g} block bitmap at block {first_bm} lies outside the filesystem"
                )));
            }
            batch.resize((n * bs) as usize, 0);
            src.read_exact_at(&mut batch, first_bm * bs)?;
            for k in 0..n {
                let gg = g + k;
                let bm = &batch[(k * bs) as usize..((k + 1) * bs) as usize];
                add_group_runs(
                    &mut map,
                    bm,
                    self.group_first_block(gg),
                    self.group_block_count(gg),
                    bs,
                );
            }
            g += n;
        }
        if !extra.is_empty() {
            map = map.union(&ExtentMap::from_ranges(extra));
        }
        map.clip(self.blocks_count * bs);
        Ok(map)
    }
}

/// The descriptor table, read window by window as the walk reaches it.
struct Descs<'a> {
    sb: &'a Super,
    /// Index of the first descriptor block held in `raw`.
    first: u64,
    /// Descriptor blocks held in `raw`.
    blocks: u64,
    raw: Vec<u8>,
}

impl Descs<'_> {
    /// Descriptor of group `g` (`g` below the group count).
    fn get(&mut self, src: &dyn ReadAt, g: u64) -> Result<Desc, FsError> {
        let sb = self.sb;
        let dpb = sb.desc_per_block();
        let i = g / dpb;
        if i < self.first || i >= self.first + self.blocks {
            self.load(src, i)?;
        }
        let ds = sb.desc_size as usize;
        let at = ((i - self.first) * sb.block_size) as usize + (g % dpb) as usize * ds;
        let d = &self.raw[at..at + ds];
        let is64 = sb.incompat & INCOMPAT_64BIT != 0;
        let hi = |o: usize| if is64 { u64::from(le32(d, o)) << 32 } else { 0 };
        Ok(Desc {
            block_bitmap: u64::from(le32(d, 0x0)) | hi(0x20),
            inode_bitmap: u64::from(le32(d, 0x4)) | hi(0x24),
            inode_table: u64::from(le32(d, 0x8)) | hi(0x28),
            flags: le16(d, 0x12),
        })
    }

    /// Reads descriptor block `i` and the blocks that follow it on disk,
    /// up to [`DESC_WINDOW`] bytes.
    fn load(&mut self, src: &dyn ReadAt, i: u64) -> Result<(), FsError> {
        let sb = self.sb;
        let bs = sb.block_size;
        let total = sb.gdt_blocks();
        let first = sb.desc_block(i);
        let mut n = 1;
        while i + n < total && (n + 1) * bs <= DESC_WINDOW && sb.desc_block(i + n) == first + n {
            n += 1;
        }
        if first.checked_add(n).is_none_or(|e| e > sb.blocks_count) {
            return Err(sb.corrupt(format!(
                "descriptor block {first} lies beyond the filesystem"
            )));
        }
        self.raw.resize((n * bs) as usize, 0);
        src.read_exact_at(&mut self.raw, first * bs)?;
        self.first = i;
        self.blocks = n;
        Ok(())
    }
}

/// One group descriptor (the fields the walker uses).
#[derive(Debug, Clone, Copy)]
struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u16,
}

fn add_group_runs(map: &mut ExtentMap, bitmap: &[u8], first_block: u64, count: u64, bs: u64) {
    for_each_set_run(bitmap, count, |s, n| {
        map.add((first_block + s) * bs, n * bs)
    });
}

fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n.is_multiple_of(base) {
        n /= base;
    }
    n == 1
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase, as blkid prints it.
pub(super) fn format_uuid(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_backup_groups_are_0_1_and_powers_of_3_5_7() {
        let s = Super {
            fstype: "ext4",
            block_size: 4096,
            blocks_count: 1 << 30,
            first_data_block: 0,
            blocks_per_group: 32768,
            inodes_per_group: 8192,
            inode_size: 256,
            desc_size: 64,
            reserved_gdt_blocks: 0,
            first_meta_bg: 0,
            backup_bgs: [1, 0],
            state: 1,
            compat: 0,
            incompat: INCOMPAT_64BIT,
            ro_compat: RO_SPARSE_SUPER,
            uuid: [0; 16],
            label: String::new(),
        };
        let with: Vec<u64> = (0..400).filter(|&g| s.has_super(g)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125, 243, 343]);
        let mut s2 = s.clone();
        s2.compat = COMPAT_SPARSE_SUPER2;
        s2.backup_bgs = [1, 300];
        let with: Vec<u64> = (0..400).filter(|&g| s2.has_super(g)).collect();
        assert_eq!(with, vec![0, 1, 300]);
        let mut s3 = s;
        s3.ro_compat = 0;
        assert!((0..50).all(|g| s3.has_super(g)));
    }

    #[test]
    fn uuid_is_formatted_like_blkid() {
        let u = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(format_uuid(&u), "12345678-9abc-def0-0123-456789abcdef");
    }
}

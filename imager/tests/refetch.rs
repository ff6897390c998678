//! A repository that may corrupt (a network) gets a chunk that fails
//! verification fetched again, both for the windows written as they come and
//! for the crash-safe restore's held windows at each end; one that may not
//! (a local disk) fails at once with the chunk named, and nothing corrupt
//! reaches the target.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use aula_imager::chunk::ChunkId;
use aula_imager::device::{Device, OpenMode, Region};
use aula_imager::progress::Progress;
use aula_imager::repo::{LocalRepo, Repository};
use aula_imager::restore::{restore_partition, RestoreOptions};
use support::*;

const CHUNK: usize = 64 << 10;

/// Hands out each chunk corrupted the first time it is asked for.
struct FlakyOnce {
    repo: LocalRepo,
    attempts: u32,
    seen: Mutex<HashSet<ChunkId>>,
    invalid: Mutex<Vec<ChunkId>>,
}

impl Repository for FlakyOnce {
    repository_passthrough!(repo);
    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> aula_imager::Result<()> {
        self.repo.put_chunk(id, frame)
    }
    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> aula_imager::Result<()> {
        self.repo.get_chunk(id, out)?;
        if self.seen.lock().expect("seen").insert(*id) {
            let mid = out.len() / 2;
            out[mid] ^= 0x5a;
        }
        Ok(())
    }
    fn invalid(&self, id: &ChunkId) {
        self.invalid.lock().expect("invalid").push(*id);
    }
    fn fetch_attempts(&self) -> u32 {
        self.attempts
    }
}

fn target(p: &std::path::Path, len: usize) -> Region {
    std::fs::write(p, vec![0u8; len]).expect("target");
    let dev = Device::open(
        p,
        OpenMode {
            write: true,
            ..Default::default()
        },
    )
    .expect("open target");
    Region::whole(Arc::new(dev))
}

#[test]
fn a_chunk_corrupt_in_transit_is_fetched_again_at_the_ends_and_between_and_a_disk_repo_fails_at_once(
) {
    let t = Tmp::new();
    // 48 windows of random data: the first and last 16 are the crash-safe
    // restore's held windows, the 16 between are written as they come.
    let data = pseudo_random(29, 48 * CHUNK);
    let src = t.p("src.img");
    std::fs::write(&src, &data).expect("source");
    imager_ok(&[
        "create",
        &src.display().to_string(),
        "--repo",
        &t.s("repo"),
        "--name",
        "r",
        "--raw",
        "--chunk-kib",
        "64",
    ]);
    let m = manifest(&t.p("repo"), "r");
    let frames: u64 = m
        .unique_chunks()
        .iter()
        .map(|(id, _)| {
            LocalRepo::open(&t.p("repo"), false)
                .expect("repo")
                .chunk_size_stored(id)
                .expect("size")
                .expect("stored")
        })
        .sum();

    let flaky = |attempts| FlakyOnce {
        repo: LocalRepo::open(&t.p("repo"), false).expect("repo"),
        attempts,
        seen: Mutex::default(),
        invalid: Mutex::default(),
    };
    let restore = |repo: &FlakyOnce, out: &std::path::Path| {
        restore_partition(
            &m,
            &target(out, data.len()),
            repo,
            &RestoreOptions {
                threads: 3,
                ..Default::default()
            },
            &Progress::new(),
        )
    };

    // Two attempts: every chunk fails once, then restores.
    let flaky2 = flaky(2);
    let out = t.p("out.img");
    let stats = restore(&flaky2, &out).expect("a second fetch heals each chunk");
    assert!(
        std::fs::read(&out).expect("out") == data,
        "restored bytes differ"
    );
    let unique = m.unique_chunks().len();
    assert_eq!(unique, 48);
    let mut invalid = flaky2.invalid.lock().expect("invalid").clone();
    invalid.sort();
    invalid.dedup();
    assert_eq!(invalid.len(), unique, "every chunk was refused once");
    assert_eq!(stats.chunks_fetched, unique as u64);
    assert_eq!(
        stats.bytes_fetched,
        2 * frames,
        "each frame was fetched twice and counted twice"
    );
    assert_eq!(stats.bytes_from_server, stats.bytes_fetched);

    // One attempt (a disk repository): the first corrupt chunk ends the
    // restore, named, and neither end of the target holds anything.
    let disk_like = flaky(1);
    let out2 = t.p("out2.img");
    let err = restore(&disk_like, &out2).expect_err("a corrupt chunk with no second attempt fails");
    let msg = err.to_string();
    let named = disk_like.invalid.lock().expect("invalid").clone();
    assert!(!named.is_empty());
    assert!(
        named.iter().any(|id| msg.contains(&id.to_string())),
        "the error names the chunk: {msg}"
    );
    let got = std::fs::read(&out2).expect("out2");
    let end = 16 * CHUNK;
    assert!(got[..end].iter().all(|&b| b == 0), "head written");
    assert!(
        got[got.len() - end..].iter().all(|&b| b == 0),
        "tail written"
    );
}

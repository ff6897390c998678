//! A restore driven by a [`Feed`] (what the swarm plugs in): the feed's
//! order is followed, a corrupt frame from a "peer" is fetched again from
//! the repository before anything is written, a chunk that several windows
//! hold is fetched once and written to each, and the delta check runs before
//! anything is handed out.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aula_imager::chunk::ChunkId;
use aula_imager::device::{Device, OpenMode, Region};
use aula_imager::progress::Progress;
use aula_imager::repo::{LocalRepo, Repository};
use aula_imager::restore::{restore_partition, Feed, Placed, RestoreOptions, Ticket};
use support::*;

const CHUNK: u64 = 64 << 10;

/// Hands the needed chunks out last first; the first frame it hands out is
/// corrupted and said to come from peer "evil".
#[derive(Debug)]
struct Backwards {
    repo: LocalRepo,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    begun: Vec<(Vec<ChunkId>, Vec<Placed>)>,
    queue: Vec<ChunkId>,
    handed: Vec<ChunkId>,
    refetched: Vec<(ChunkId, Option<String>)>,
    done: Vec<(ChunkId, Vec<Placed>)>,
    corrupted: bool,
}

impl Feed for Backwards {
    fn begin(&self, need: &[ChunkId], placed: Vec<Placed>) -> aula_imager::Result<()> {
        let mut s = self.state.lock().expect("state");
        s.queue = need.to_vec();
        s.begun.push((need.to_vec(), placed));
        Ok(())
    }

    fn next(&self, out: &mut Vec<u8>) -> aula_imager::Result<Option<Ticket>> {
        let (id, corrupt) = {
            let mut s = self.state.lock().expect("state");
            let Some(id) = s.queue.pop() else {
                return Ok(None);
            };
            s.handed.push(id);
            let corrupt = !s.corrupted;
            s.corrupted = true;
            (id, corrupt)
        };
        self.repo.get_chunk(&id, out)?;
        if corrupt {
            let mid = out.len() / 2;
            out[mid] ^= 0xff;
        }
        Ok(Some(Ticket {
            id,
            peer: corrupt.then(|| "evil".to_string()),
            local: false,
        }))
    }

    fn refetch(&self, t: &mut Ticket, _why: &str, out: &mut Vec<u8>) -> aula_imager::Result<()> {
        self.state
            .lock()
            .expect("state")
            .refetched
            .push((t.id, t.peer.take()));
        self.repo.get_chunk(&t.id, out)
    }

    fn done(&self, t: Ticket, _frame: &mut Vec<u8>, placed: Vec<Placed>) {
        self.state.lock().expect("state").done.push((t.id, placed));
    }
}

#[test]
fn a_fed_restore_follows_the_feed_refetches_a_corrupt_frame_and_writes_each_window_once() {
    let t = Tmp::new();
    // 48 windows (3 MiB): the first and last MiB (16 windows each) are the
    // crash-safe restore's held windows, fetched through the feed after the
    // rest (a second `begin`, nothing placed) and written last; the 16
    // between go through the feed first: random ones, zero ones, and one
    // window repeated twice.
    let w = CHUNK as usize;
    let mut data = pseudo_random(11, 48 * w);
    data[19 * w..21 * w].fill(0);
    let copy = data[23 * w..24 * w].to_vec();
    data[27 * w..28 * w].copy_from_slice(&copy);
    data[30 * w..31 * w].copy_from_slice(&copy);
    let src = t.p("src.img");
    std::fs::write(&src, &data).expect("source");
    imager_ok(&[
        "create",
        &src.display().to_string(),
        "--repo",
        &t.s("repo"),
        "--name",
        "f",
        "--raw",
        "--chunk-kib",
        "64",
    ]);
    let m = manifest(&t.p("repo"), "f");
    let repo = LocalRepo::open(&t.p("repo"), false).expect("repo");

    // A plain restore, for its counts.
    let plain = t.p("plain.img");
    std::fs::File::create(&plain)
        .and_then(|f| f.set_len(data.len() as u64))
        .expect("plain target");
    let open = |p: &std::path::Path| {
        Arc::new(
            Device::open(
                p,
                OpenMode {
                    write: true,
                    ..Default::default()
                },
            )
            .expect("open"),
        )
    };
    let reference = restore_partition(
        &m,
        &Region::whole(open(&plain)),
        &repo,
        &RestoreOptions::default(),
        &Progress::new(),
    )
    .expect("plain restore");

    // The fed restore, onto a target that already holds window 17.
    let target = t.p("target.img");
    let mut pre = vec![0u8; data.len()];
    pre[17 * w..18 * w].copy_from_slice(&data[17 * w..18 * w]);
    std::fs::write(&target, &pre).expect("target");
    let feed = Arc::new(Backwards {
        repo: LocalRepo::open(&t.p("repo"), false).expect("repo"),
        state: Mutex::new(State::default()),
    });
    let opts = RestoreOptions {
        threads: 3,
        feed: Some(feed.clone()),
        ..Default::default()
    };
    let stats = restore_partition(
        &m,
        &Region::whole(open(&target)),
        &repo,
        &opts,
        &Progress::new(),
    )
    .expect("fed restore");
    assert!(
        std::fs::read(&target).expect("read") == data,
        "the fed restore differs from the source"
    );

    let s = feed.state.lock().expect("state");
    assert_eq!(s.begun.len(), 2, "the windows between, then the held ones");
    let (need, placed) = &s.begun[0];
    // The held windows: every distinct chunk of the first and last 16
    // windows, once, with nothing to serve from the target yet.
    let (held, held_placed) = &s.begun[1];
    assert!(held_placed.is_empty());
    let mut want_held: Vec<ChunkId> = Vec::new();
    for c in m.chunks.iter().filter(|c| c.index < 16 || c.index >= 32) {
        if let Some(id) = c.id {
            if !want_held.contains(&id) {
                want_held.push(id);
            }
        }
    }
    let mut sorted_held = held.clone();
    sorted_held.sort();
    want_held.sort();
    assert_eq!(sorted_held, want_held);
    // The delta check ran first: window 17 is in place (and offered to serve),
    // zero windows are not chunks, the repeated window is needed once.
    let id_of = |k: usize| {
        m.chunks
            .iter()
            .find(|c| c.index == k as u64)
            .and_then(|c| c.id)
    };
    let w1 = id_of(17).expect("window 17");
    assert_eq!(placed.iter().map(|p| p.id).collect::<Vec<_>>(), vec![w1]);
    assert_eq!(placed[0].offset, 17 * CHUNK);
    assert!(!need.contains(&w1));
    let dup = id_of(23).expect("window 23");
    assert_eq!(need.iter().filter(|&&id| id == dup).count(), 1);
    let distinct: std::collections::HashSet<_> = need.iter().collect();
    assert_eq!(distinct.len(), need.len());
    assert_eq!(
        need.len(),
        16 - 2 - 2 - 1,
        "16 fed windows, 2 zero, 2 repeats, 1 in place"
    );
    // Handed out last first, every needed chunk exactly once, the held
    // ones after the others.
    let mut order = need.clone();
    order.reverse();
    assert_eq!(s.handed.len(), need.len() + held.len());
    let mut sorted_handed = s.handed[..need.len()].to_vec();
    sorted_handed.sort();
    let mut sorted_need = need.clone();
    sorted_need.sort();
    let mut late = s.handed[need.len()..].to_vec();
    late.sort();
    assert_eq!(late, sorted_held);
    assert_eq!(sorted_handed, sorted_need);
    assert_eq!(s.handed[0], order[0]);
    // The corrupt frame was refetched, blaming its peer.
    assert_eq!(s.refetched, vec![(order[0], Some("evil".to_string()))]);
    // The repeated chunk was written to its three windows.
    let windows: HashMap<ChunkId, Vec<u64>> = s
        .done
        .iter()
        .map(|(id, p)| (*id, p.iter().map(|p| p.offset / CHUNK).collect()))
        .collect();
    assert_eq!(windows[&dup], vec![23, 27, 30]);
    // Each window written once: the counts are the plain restore's, less
    // the window already in place; the corrupt frame was fetched twice.
    assert_eq!(stats.chunks_skipped, reference.chunks_skipped + 1);
    assert_eq!(stats.bytes_written + CHUNK, reference.bytes_written);
    // The feed's chunks, and the 32 held windows.
    assert_eq!(stats.chunks_fetched as usize, need.len() + 32);
    assert_eq!(
        stats.chunks_from_peers, 0,
        "the only peer frame was corrupt"
    );
    assert!(stats.bytes_from_peers > 0);
    assert_eq!(
        stats.bytes_from_server + stats.bytes_from_peers,
        stats.bytes_fetched
    );
}

//! A tiny scoped worker pool: N threads pull item indices from a shared
//! counter (or ask a source for work until it has none); the first error
//! (or a cancel) stops everyone at the next item.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::progress::Progress;

/// Default worker count: one per CPU.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Run `work(&mut state, item)` for every item in `0..items` on `threads`
/// threads, each with its own state from `init`.
pub fn for_each<S, I, F>(
    threads: usize,
    items: usize,
    progress: &Progress,
    init: I,
    work: F,
) -> Result<()>
where
    I: Fn() -> Result<S> + Sync,
    F: Fn(&mut S, usize) -> Result<()> + Sync,
{
    let next = AtomicUsize::new(0);
    run(threads.clamp(1, items.max(1)), progress, init, |state| {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= items {
            return Ok(false);
        }
        work(state, i)?;
        Ok(true)
    })
}

/// Run `step(&mut state)` on `threads` threads, each with its own state
/// from `init`, until every thread's `step` has returned `Ok(false)` (no
/// more work), one fails, or the job is cancelled. For work whose items
/// are not known up front (the swarm hands chunks out as they become
/// available).
pub fn run<S, I, F>(threads: usize, progress: &Progress, init: I, step: F) -> Result<()>
where
    I: Fn() -> Result<S> + Sync,
    F: Fn(&mut S) -> Result<bool> + Sync,
{
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        stop.store(true, Ordering::SeqCst);
        if let Ok(mut slot) = first_err.lock() {
            if slot.is_none() {
                *slot = Some(e);
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut state = match init() {
                    Ok(st) => st,
                    Err(e) => return fail(e),
                };
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if progress.is_cancelled() {
                        return fail(Error::Cancelled);
                    }
                    match step(&mut state) {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => return fail(e),
                    }
                }
            });
        }
    });
    match first_err.into_inner() {
        Ok(Some(e)) => Err(e),
        Ok(None) => Ok(()),
        Err(_) => Err(Error::Invalid("worker pool state poisoned".into())),
    }
}

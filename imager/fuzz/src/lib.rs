//! Shared by every fuzz target: an allocator that turns any single
//! allocation above [`LIMIT`] into a crash, so a size read from the input
//! and allocated unchecked is found even when the machine could satisfy it
//! (libFuzzer's own `-malloc_limit_mb` needs a sanitizer's allocator; this
//! works with `--sanitizer none` too). `-rss_limit_mb` still bounds the
//! total.

use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation a target may make (the parsers' own bounds
/// are far below: a 64 MiB lzop block, a 64 MiB partclone strip).
pub const LIMIT: usize = 256 << 20;

struct Capped;

fn check(size: usize) {
    if size > LIMIT {
        let msg = b"aula-fuzz: an allocation above the 256 MiB limit\n";
        // SAFETY: write(2) of a static buffer to stderr; no memory of ours
        // is handed over beyond the call.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
        }
        std::process::abort();
    }
}

// SAFETY: every method checks the size and forwards to the system
// allocator with the caller's arguments unchanged.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

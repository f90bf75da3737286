//! Heap accounting: a global allocator that counts live and peak bytes per component
//! (weights, KV cache, activations, runtime, other) and per rank, so that the memory
//! ledger's `measured` column is the allocator's own count rather than arithmetic.
//!
//! How it attributes: every thread carries a tag (a [`Component`] and a rank), set with
//! [`scope`] around the work it names (a rank thread loading its shard runs under
//! `Weights`, its passes under `Activations`; the server's threads under `Runtime`).
//! [`CountingAlloc`] writes the tag of the allocating thread into a 16-byte header in
//! front of each block and reads it back when the block is freed, so a tensor allocated
//! in a pass and freed by another thread later is still taken off the component that
//! made it. Untagged work counts as [`Component::Other`].
//!
//! Why a wrapper of our own over the system allocator rather than jemalloc's statistics:
//! jemalloc counts per arena or per size class, not per purpose, and putting each
//! component in its own arena would still leave the attribution to us; it would also
//! add a C build to a tree that avoids one. The wrapper is a few atomic additions per
//! allocation and 16 bytes per block (large blocks, the only ones that matter to the
//! figures, come from the same `mmap`s as before). Its speed cost is measured in
//! docs/results.md.
//!
//! The binary installs it (`#[global_allocator]` in `src/main.rs`); a program without it
//! still runs every engine path, and [`installed`] is false, so callers know the counts
//! are not there rather than reading zeros as measurements.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// What a heap block is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Component {
    /// Nothing named it.
    Other = 0,
    /// Model weights (and their packed forms), from load until the model is dropped.
    Weights = 1,
    /// The KV cache's blocks.
    KvCache = 2,
    /// The working set of forward passes.
    Activations = 3,
    /// The server, tokenizer, scheduler and sampler bookkeeping.
    Runtime = 4,
}

impl Component {
    pub const ALL: [Component; 5] = [
        Component::Other,
        Component::Weights,
        Component::KvCache,
        Component::Activations,
        Component::Runtime,
    ];

    #[cfg(test)]
    fn from_bits(b: u8) -> Component {
        match b & 7 {
            1 => Component::Weights,
            2 => Component::KvCache,
            3 => Component::Activations,
            4 => Component::Runtime,
            _ => Component::Other,
        }
    }
}

/// Ranks counted apart; higher ranks share the last slot.
pub const MAX_RANKS: usize = 16;
const NCOMP: usize = 5;

/// The header in front of every block: the tag sits in its last byte.
const HEADER: usize = 16;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ROW: [AtomicU64; NCOMP] = [ZERO; NCOMP];

static LIVE: [[AtomicU64; NCOMP]; MAX_RANKS] = [ROW; MAX_RANKS];
static PEAK: [[AtomicU64; NCOMP]; MAX_RANKS] = [ROW; MAX_RANKS];
static BLOCKS: AtomicU64 = ZERO;
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's tag: `rank << 3 | component`.
    static TAG: Cell<u8> = const { Cell::new(0) };
}

fn tag_bits(component: Component, rank: usize) -> u8 {
    ((rank.min(MAX_RANKS - 1) as u8) << 3) | component as u8
}

fn current_tag() -> u8 {
    // A const-initialised Cell without a destructor: readable for the thread's whole life.
    TAG.with(Cell::get)
}

fn add(tag: u8, bytes: usize) {
    let (rank, comp) = ((tag >> 3) as usize, (tag & 7) as usize % NCOMP);
    let live = LIVE[rank][comp].fetch_add(bytes as u64, Relaxed) + bytes as u64;
    let peak = &PEAK[rank][comp];
    if live > peak.load(Relaxed) {
        peak.fetch_max(live, Relaxed);
    }
}

fn sub(tag: u8, bytes: usize) {
    let (rank, comp) = ((tag >> 3) as usize, (tag & 7) as usize % NCOMP);
    LIVE[rank][comp].fetch_sub(bytes as u64, Relaxed);
}

/// The global allocator: the system's, with a tag per block and counts per tag.
pub struct CountingAlloc;

impl CountingAlloc {
    /// The layout of the block that holds `layout` behind a header, and the header's size
    /// (at least 16, a multiple of the alignment, so the caller's pointer stays aligned).
    #[inline]
    fn outer(layout: Layout) -> Option<(Layout, usize)> {
        let head = HEADER.max(layout.align());
        let size = layout.size().checked_add(head)?;
        Some((Layout::from_size_align(size, layout.align()).ok()?, head))
    }

    /// A block of `layout` from `system` (the system's `alloc` or `alloc_zeroed`) behind a
    /// header carrying this thread's tag, counted.
    #[inline]
    unsafe fn serve(layout: Layout, system: unsafe fn(&System, Layout) -> *mut u8) -> *mut u8 {
        if !INSTALLED.load(Relaxed) {
            INSTALLED.store(true, Relaxed);
        }
        let Some((outer, head)) = Self::outer(layout) else {
            return std::ptr::null_mut();
        };
        let base = system(&System, outer);
        if base.is_null() {
            return base;
        }
        let size = layout.size();
        let tag = current_tag();
        let user = base.add(head);
        user.sub(1).write(tag);
        add(tag, size);
        BLOCKS.fetch_add(1, Relaxed);
        user
    }
}

// SAFETY: every block handed out is the system allocator's block of the outer layout,
// offset by the header; dealloc and realloc undo the offset with the same layout
// arithmetic before calling the system allocator.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::serve(layout, <System as GlobalAlloc>::alloc)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::serve(layout, <System as GlobalAlloc>::alloc_zeroed)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // The layout was valid when the block was made, so `outer` succeeds again.
        let Some((outer, head)) = Self::outer(layout) else {
            return;
        };
        sub(ptr.sub(1).read(), layout.size());
        BLOCKS.fetch_sub(1, Relaxed);
        System.dealloc(ptr.sub(head), outer);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some((outer, head)) = Self::outer(layout) else {
            return std::ptr::null_mut();
        };
        let Some(new_outer) = new_size.checked_add(head) else {
            return std::ptr::null_mut();
        };
        // The block keeps the tag it was made with; the system's realloc moves the
        // header with the data.
        let tag = ptr.sub(1).read();
        let base = System.realloc(ptr.sub(head), outer, new_outer);
        if base.is_null() {
            return base;
        }
        if new_size >= layout.size() {
            add(tag, new_size - layout.size());
        } else {
            sub(tag, layout.size() - new_size);
        }
        base.add(head)
    }
}

/// Whether [`CountingAlloc`] is this program's allocator (it has served an allocation).
pub fn installed() -> bool {
    INSTALLED.load(Relaxed)
}

/// Restores the thread's previous tag when dropped.
#[must_use = "the tag holds only while the guard lives"]
pub struct Scope {
    previous: u8,
}

impl Drop for Scope {
    fn drop(&mut self) {
        TAG.with(|t| t.set(self.previous));
    }
}

/// Count this thread's allocations as `component` of its current rank until the guard
/// drops.
pub fn scope(component: Component) -> Scope {
    Tag((current_tag() & !7) | component as u8).enter()
}

/// Count this thread's allocations as `component` of `rank` until the guard drops.
pub fn rank_scope(component: Component, rank: usize) -> Scope {
    Tag(tag_bits(component, rank)).enter()
}

/// Run `f` with this thread's allocations counted as `component` of `rank`; its result,
/// and the peak of that component on that rank above where it stood before (a forward
/// pass's working set, for `Activations`).
pub fn measure<R>(component: Component, rank: usize, f: impl FnOnce() -> R) -> (R, u64) {
    let meter = PassMeter::start(component, rank);
    let out = {
        let _scope = rank_scope(component, rank);
        f()
    };
    (out, meter.finish().0)
}

/// A thread's tag, to carry into work another thread runs on its behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag(u8);

impl Tag {
    /// The calling thread's tag.
    pub fn current() -> Tag {
        Tag(current_tag())
    }

    /// Count this thread's allocations under `self` until the guard drops.
    pub fn enter(self) -> Scope {
        let previous = current_tag();
        TAG.with(|t| t.set(self.0));
        Scope { previous }
    }
}

/// Count this thread's allocations as `component` of `rank` from now on (a thread that
/// works for one component all its life: the server's, a rank's).
pub fn tag_thread(component: Component, rank: usize) {
    TAG.with(|t| t.set(tag_bits(component, rank)));
}

/// Live bytes of `component` on `rank` (0 when the allocator is not installed).
pub fn live(component: Component, rank: usize) -> u64 {
    LIVE[rank.min(MAX_RANKS - 1)][component as usize].load(Relaxed)
}

/// Live bytes of `component` over every rank.
pub fn live_all_ranks(component: Component) -> u64 {
    (0..MAX_RANKS).map(|r| live(component, r)).sum()
}

/// Largest live bytes of `component` on `rank` since start, or since the last
/// [`PassMeter`] of that rank and component began.
fn peak(component: Component, rank: usize) -> u64 {
    PEAK[rank.min(MAX_RANKS - 1)][component as usize].load(Relaxed)
}

/// Live blocks, and the bytes their headers add (part of the heap the counts leave out).
pub fn header_bytes() -> u64 {
    BLOCKS.load(Relaxed) * HEADER as u64
}

/// The peak, above its starting level, of one component on one rank over a stretch of
/// work: a forward pass's working set is `PassMeter::start(Activations, rank)` before it
/// and `finish()` after.
pub struct PassMeter {
    component: Component,
    rank: usize,
    base: u64,
}

impl PassMeter {
    /// Reset the component's peak on `rank` to its live bytes and remember them.
    pub fn start(component: Component, rank: usize) -> PassMeter {
        let rank = rank.min(MAX_RANKS - 1);
        let base = live(component, rank);
        PEAK[rank][component as usize].store(base, Relaxed);
        PassMeter {
            component,
            rank,
            base,
        }
    }

    /// Peak bytes above the start, and bytes still live above it (blocks the work kept).
    pub fn finish(self) -> (u64, u64) {
        let (peak, live) = (
            peak(self.component, self.rank),
            live(self.component, self.rank),
        );
        (
            peak.saturating_sub(self.base),
            live.saturating_sub(self.base),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_pack_rank_and_component() {
        for c in Component::ALL {
            for r in [0, 1, 7, MAX_RANKS - 1, MAX_RANKS + 3] {
                let t = tag_bits(c, r);
                assert_eq!(Component::from_bits(t), c);
                assert_eq!((t >> 3) as usize, r.min(MAX_RANKS - 1));
            }
        }
    }

    #[test]
    fn the_outer_layout_keeps_alignment_and_room_for_the_tag() {
        for (size, align) in [(1, 1), (24, 8), (100, 32), (4096, 4096), (0, 64)] {
            let l = Layout::from_size_align(size, align).unwrap();
            let (outer, head) = CountingAlloc::outer(l).unwrap();
            assert!(head >= HEADER && head % align == 0, "{size} {align}");
            assert_eq!(outer.size(), size + head);
            assert_eq!(outer.align(), align);
        }
        let huge = Layout::from_size_align(isize::MAX as usize - 8, 8).unwrap();
        assert!(CountingAlloc::outer(huge).is_none());
    }

    #[test]
    fn scopes_nest_and_restore() {
        let _r = rank_scope(Component::Other, 3);
        assert_eq!(current_tag(), tag_bits(Component::Other, 3));
        {
            let _w = scope(Component::Weights);
            assert_eq!(current_tag(), tag_bits(Component::Weights, 3));
            let _k = rank_scope(Component::KvCache, 1);
            assert_eq!(current_tag(), tag_bits(Component::KvCache, 1));
        }
        assert_eq!(current_tag(), tag_bits(Component::Other, 3));
    }
}

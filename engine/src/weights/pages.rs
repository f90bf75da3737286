//! 2 MiB pages under the weights (Linux transparent huge pages).
//!
//! A decode step streams every weight once, hundreds of megabytes per token. llmem copies
//! the weights out of the model file into buffers of its own at load (repacked,
//! dequantized or checked), and anonymous memory comes in 4 KiB pages unless a program
//! asks for more (transparent huge pages in `madvise` mode, a common default): a TLB
//! entry and a page walk per 4 KiB streamed. After loading, [`back_with_huge_pages`]
//! asks the kernel to move them into 2 MiB pages: `madvise(MADV_HUGEPAGE)`, then
//! `MADV_COLLAPSE` (Linux 6.1), which copies them there now rather than leaving it to
//! `khugepaged`'s slow background scan. Only
//! the whole 2 MiB windows that weights cover are touched (buffers a few bytes apart,
//! as the allocator places them, count as one span), so no free memory becomes
//! resident. Best effort: a kernel without THP, or with no free 2 MiB page, leaves the
//! weights where they were, and the report says how many bytes moved.
//!
//! The cost is at load: the kernel copies the weights and may first compact memory to
//! find free 2 MiB pages, which on a machine whose memory is mostly page cache took 0.3 to
//! 2.4 ms per MiB here. A library caller opts in ([`use_by_default`]; the `llmem` binary
//! does); `LLMEM_HUGE_PAGES=1` or `0` decides either way. The effect on decode speed and
//! on load time is in docs/results.md.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

/// Bytes of a huge page.
const HUGE: usize = 2 << 20;

/// Ranges at most this far apart are one span: the allocator's headers between
/// consecutive buffers (llmem's heap counter adds 16 bytes, glibc 16 more).
const JOIN_GAP: usize = 4096;

/// What [`back_with_huge_pages`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct HugePages {
    /// Bytes of weights now in 2 MiB pages (those already there included).
    pub collapsed_bytes: u64,
    /// Bytes of whole 2 MiB windows the kernel did not move (no THP, no free huge page).
    pub refused_bytes: u64,
    /// Time the kernel took, in milliseconds.
    pub ms: f64,
}

static BY_DEFAULT: AtomicBool = AtomicBool::new(false);

/// Make CPU loads move their weights into huge pages unless `LLMEM_HUGE_PAGES=0` (the
/// `llmem` binary calls this at start-up; a library caller need not).
pub fn use_by_default() {
    BY_DEFAULT.store(true, Relaxed);
}

/// `LLMEM_HUGE_PAGES`: `Some(true)` for `1`, `Some(false)` for `0`, `None` unset; any
/// other value is an error naming it.
fn setting() -> Result<Option<bool>, String> {
    match std::env::var("LLMEM_HUGE_PAGES") {
        Err(_) => Ok(None),
        Ok(v) if v == "1" => Ok(Some(true)),
        Ok(v) if v == "0" => Ok(Some(false)),
        Ok(v) => Err(format!(
            "LLMEM_HUGE_PAGES={v:?} is not understood: 1 puts the weights in 2 MiB pages, 0 does not"
        )),
    }
}

/// `LLMEM_HUGE_PAGES`, when set, is `0` or `1`; anything else is an error naming it.
pub fn check_env() -> Result<(), String> {
    setting().map(|_| ())
}

/// Whether a CPU load moves its weights into huge pages: `LLMEM_HUGE_PAGES=1` or `0`
/// when set, else whether [`use_by_default`] was called (also for a value
/// [`check_env`] rejects, which the binary stops on at start-up).
pub fn enabled() -> bool {
    setting()
        .ok()
        .flatten()
        .unwrap_or_else(|| BY_DEFAULT.load(Relaxed))
}

/// The whole 2 MiB windows inside the spans that `ranges` (address, length) cover, the
/// ranges within [`JOIN_GAP`] of each other joined first: (start, length), each start
/// and length a multiple of 2 MiB.
pub(crate) fn huge_windows(ranges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut sorted: Vec<(usize, usize)> = ranges
        .iter()
        .filter(|r| r.1 > 0)
        .map(|&(a, len)| (a, a.saturating_add(len)))
        .collect();
    sorted.sort_unstable();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (a, b) in sorted {
        match spans.last_mut() {
            Some(last) if a <= last.1.saturating_add(JOIN_GAP) => last.1 = last.1.max(b),
            _ => spans.push((a, b)),
        }
    }
    spans
        .into_iter()
        .filter_map(|(a, b)| {
            let start = a.checked_next_multiple_of(HUGE)?;
            let end = b - b % HUGE;
            (end > start).then(|| (start, end - start))
        })
        .collect()
}

/// Move the whole 2 MiB windows of the heap buffers `ranges` (address, length) into huge
/// pages, as far as the kernel agrees. The buffers must stay allocated during the call;
/// their contents do not change.
pub fn back_with_huge_pages(ranges: &[(usize, usize)]) -> HugePages {
    let start = Instant::now();
    let mut report = HugePages::default();
    for (addr, len) in huge_windows(ranges) {
        if advise(addr, len) {
            report.collapsed_bytes += len as u64;
        } else {
            report.refused_bytes += len as u64;
        }
    }
    report.ms = start.elapsed().as_secs_f64() * 1e3;
    report
}

/// Where a dense CPU tensor's storage lies, (address, length); `None` on a GPU or for a
/// dtype weights do not come in.
pub(crate) fn tensor_range(t: &candle_core::Tensor) -> Option<(usize, usize)> {
    use candle_core::{CpuStorage, Storage};
    let (storage, _) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let (p, bytes) = match cpu {
        CpuStorage::F32(v) => (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice())),
        CpuStorage::F16(v) => (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice())),
        CpuStorage::BF16(v) => (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice())),
        _ => return None,
    };
    Some((p, bytes))
}

/// `madvise(MADV_HUGEPAGE)` then `madvise(MADV_COLLAPSE)` on a 2 MiB-aligned window of
/// anonymous memory; true when both succeed.
#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize) -> bool {
    // Not in the libc crate for every target it supports; Linux's value since 6.1.
    const MADV_COLLAPSE: libc::c_int = 25;
    // Safety: the window lies inside live heap buffers the caller holds (whole pages of
    // them, as `huge_windows` cuts them); neither advice changes their contents, and
    // a refusal leaves the memory as it was.
    unsafe {
        let p = addr as *mut libc::c_void;
        libc::madvise(p, len, libc::MADV_HUGEPAGE) == 0 && libc::madvise(p, len, MADV_COLLAPSE) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: usize = HUGE;

    #[test]
    fn windows_are_the_whole_huge_pages_inside_joined_spans() {
        // One buffer from 1.5 to 6.5 huge pages: the window from 2 to 6.
        assert_eq!(huge_windows(&[(M + M / 2, 5 * M)]), vec![(2 * M, 4 * M)]);
        // Two buffers 32 bytes apart, neither holding a whole huge page: one span that does.
        assert_eq!(
            huge_windows(&[(3 * M + 32, M), (M + M / 2, 3 * M / 2)]),
            vec![(2 * M, 2 * M)]
        );
        // Too far apart to join: the gap stays out, and so does each short piece.
        assert!(huge_windows(&[(M + M / 2, M), (3 * M + M / 2, M)]).is_empty());
        // Empty and unaligned-small ranges give nothing.
        assert!(huge_windows(&[(5, 0), (M + 1, M - 2)]).is_empty());
        assert!(huge_windows(&[]).is_empty());
    }

    #[test]
    fn backing_keeps_the_contents() {
        let data: Vec<u64> = (0..(3 * M / 8) as u64)
            .map(|i| i.wrapping_mul(0x9E37))
            .collect();
        let want = data.clone();
        let bytes = data.len() * 8;
        let report = back_with_huge_pages(&[(data.as_ptr() as usize, bytes)]);
        // At least one whole window lies inside 6 MiB, whatever its alignment.
        let windows = (report.collapsed_bytes + report.refused_bytes) as usize;
        assert!(windows >= M && windows <= bytes, "{report:?}");
        assert!(data == want, "contents changed");
    }
}

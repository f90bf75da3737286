//! What /proc says about this process and this machine: resident set, physical and
//! used memory. Linux only; every reader returns `None` where /proc cannot tell.

/// A `key:   1234 kB` field of a /proc file, in bytes.
pub fn proc_kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| {
        l.strip_prefix(key)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let mut words = line[key.len() + 1..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => kib.checked_mul(1024),
        Some(_) => None,
    }
}

/// This process's resident set, if /proc says.
pub fn process_rss_bytes() -> Option<u64> {
    process_resident().map(|r| r.rss)
}

/// This process's resident set split as /proc/self/status splits it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resident {
    pub rss: u64,
    /// Anonymous pages: the heap, thread stacks, anonymous maps.
    pub anon: u64,
    /// File-backed pages: the binary, shared libraries, mapped files.
    pub file: u64,
    pub shmem: u64,
}

/// [`Resident`] of this process, if /proc says.
pub fn process_resident() -> Option<Resident> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(Resident {
        rss: proc_kib_field(&text, "VmRSS")?,
        anon: proc_kib_field(&text, "RssAnon").unwrap_or(0),
        file: proc_kib_field(&text, "RssFile").unwrap_or(0),
        shmem: proc_kib_field(&text, "RssShmem").unwrap_or(0),
    })
}

/// Resident bytes of the mappings of files whose name ends with one of `suffixes`
/// (weight files mapped with mmap), summed over /proc/self/smaps.
pub fn mapped_files_resident_bytes(suffixes: &[&str]) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
    Some(mapped_resident_in(&text, suffixes))
}

fn mapped_resident_in(smaps: &str, suffixes: &[&str]) -> u64 {
    let mut total = 0u64;
    let mut counting = false;
    for line in smaps.lines() {
        // A mapping's header: "start-end perms offset dev inode [path]".
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let path = line.split_whitespace().nth(5).unwrap_or("");
            counting = suffixes.iter().any(|s| path.ends_with(s));
        } else if counting {
            if let Some(b) = proc_kib_field(line, "Rss") {
                total += b;
            }
        }
    }
    total
}

/// Bytes glibc's malloc holds free in its arenas (`mallinfo2().fordblks`): memory the
/// process freed but the allocator kept. `None` off glibc.
pub fn allocator_free_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Blocks up to this size come from malloc's heap, not from a fresh `mmap` each.
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory at the top of malloc's heap kept for reuse, up to this size.
pub const TRIM_THRESHOLD: usize = 128 << 20;

/// Tune glibc's malloc for a forward pass's tensors (a no-op elsewhere). With glibc's
/// defaults (a threshold of 128 KiB that moves as blocks are freed) a pass's large
/// tensors kept coming from fresh `mmap`s, unmapped when freed, so their pages faulted
/// in and were zeroed by the kernel on every pass: 6-7% of a 512-token prefill's profile.
/// Blocks up to [`MMAP_THRESHOLD`] now come from the heap, and up to [`TRIM_THRESHOLD`]
/// of free heap is kept for the next pass (docs/results.md section 13 has the measured
/// prefill). What is kept is counted: it is the ledger's allocator free memory
/// ([`allocator_free_bytes`]).
pub fn keep_freed_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets the allocator's parameters; called before threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
        }
    }
}

/// Machine memory in use (`MemTotal - MemAvailable`), if /proc says.
pub fn machine_used_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total = proc_kib_field(&text, "MemTotal")?;
    let avail = proc_kib_field(&text, "MemAvailable")?;
    Some(total.saturating_sub(avail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_in_bytes() {
        let status = "Name:\tllmem\nVmPeak:\t  200 kB\nVmRSS:\t   1234 kB\nVmRSSx: 9 kB\n";
        assert_eq!(proc_kib_field(status, "VmRSS"), Some(1234 * 1024));
        assert_eq!(proc_kib_field(status, "VmSwap"), None);
        assert_eq!(proc_kib_field("VmRSS: many kB\n", "VmRSS"), None);
        assert_eq!(proc_kib_field("VmRSS: 5 MB\n", "VmRSS"), None);
    }

    #[test]
    fn mapped_weight_files_are_summed_from_smaps() {
        let smaps = "\
7f00-7f10 r--p 00000000 08:01 12 /models/a.gguf
Size:                 64 kB
Rss:                  40 kB
7f10-7f20 r-xp 00000000 08:01 13 /usr/lib/libc.so.6
Rss:                 100 kB
7f20-7f30 r--p 00000000 00:00 0
Rss:                   8 kB
7f30-7f40 r--p 00000000 08:01 14 /models/b.safetensors
Rss:                  20 kB
";
        let got = mapped_resident_in(smaps, &[".gguf", ".safetensors"]);
        assert_eq!(got, 60 * 1024);
        assert_eq!(mapped_resident_in(smaps, &[".bin"]), 0);
    }

    #[test]
    fn this_process_has_a_resident_split() {
        let r = process_resident().unwrap();
        assert!(r.rss > 0 && r.anon + r.file + r.shmem <= r.rss + 4096 * 64);
    }
}

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
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    proc_kib_field(&text, "VmRSS")
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
}

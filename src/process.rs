//! What this process uses, read from /proc (Linux): CPU time and resident memory. For `stpm bench`
//! reports and the `process_*` series of `/metrics`; `None`/0 where /proc is not there.

/// Seconds of CPU time this process has used (user + system), from /proc/self/stat.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Peak resident set size in MiB (VmHWM).
pub fn peak_rss_mb() -> f64 {
    status_kb("VmHWM:").map_or(0.0, |kb| kb / 1024.0)
}

/// Current resident set size in bytes (VmRSS).
pub fn rss_bytes() -> f64 {
    status_kb("VmRSS:").map_or(0.0, |kb| kb * 1024.0)
}

/// A `kB` field of /proc/self/status.
fn status_kb(field: &str) -> Option<f64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_and_memory_is_read() {
        let before = cpu_seconds().expect("/proc/self/stat");
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(150) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = cpu_seconds().expect("/proc/self/stat");
        assert!(after >= before + 0.05, "{before} -> {after}");
        let (rss, peak) = (rss_bytes() / 1048576.0, peak_rss_mb());
        assert!(rss > 1.0 && peak >= rss, "rss {rss} MiB, peak {peak} MiB");
    }
}

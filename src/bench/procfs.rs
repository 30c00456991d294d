//! Reading CPU time and memory of a process from `/proc/<pid>/stat` and
//! `/proc/<pid>/status` (Linux). Used for the broker (`--broker-pid`) and for
//! the tool itself.

use super::BenchError;

/// Clock ticks per second of the times in `/proc/<pid>/stat`: the kernel
/// reports them in USER_HZ, which is 100 on every architecture this runs on.
pub const CLOCK_TICKS_PER_SEC: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcSample {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// VmRSS in kB.
    pub rss_kb: u64,
    /// VmHWM (peak RSS) in kB.
    pub hwm_kb: u64,
}

impl ProcSample {
    pub fn of_pid(pid: u32) -> Result<ProcSample, BenchError> {
        Self::read(&pid.to_string())
    }

    pub fn of_self() -> Result<ProcSample, BenchError> {
        Self::read("self")
    }

    fn read(pid: &str) -> Result<ProcSample, BenchError> {
        let err = |file: &str, detail: String| BenchError::Proc {
            pid: pid.to_string(),
            file: file.to_string(),
            detail,
        };
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| err("stat", e.to_string()))?;
        let cpu_ticks = parse_stat_cpu_ticks(&stat).ok_or_else(|| err("stat", "unexpected format".into()))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| err("status", e.to_string()))?;
        let rss_kb = parse_status_kb(&status, "VmRSS").ok_or_else(|| err("status", "no VmRSS".into()))?;
        let hwm_kb = parse_status_kb(&status, "VmHWM").ok_or_else(|| err("status", "no VmHWM".into()))?;
        Ok(ProcSample { cpu_ticks, rss_kb, hwm_kb })
    }

    /// CPU time between two samples, in microseconds.
    pub fn cpu_us_since(&self, earlier: &ProcSample) -> u64 {
        self.cpu_ticks.saturating_sub(earlier.cpu_ticks) * (1_000_000 / CLOCK_TICKS_PER_SEC)
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command
/// name (field 2) is in parentheses and may itself hold spaces or ')', so
/// fields are counted from the last ')'.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state): utime is field 14 -> index 11.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// The value in kB of a `Key:   123 kB` line of `/proc/<pid>/status`.
pub fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.split_ascii_whitespace().next()?.parse().ok()
    })
}

/// The soft limit on open files from the text of `/proc/<pid>/limits`
/// (None when absent or "unlimited").
pub fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_ascii_whitespace().next()?.parse().ok()
}

/// This process's soft limit on open files, if it can be read.
pub fn open_files_limit() -> Option<u64> {
    parse_open_files_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// CPU used between two samples as a percentage of one core over `wall_s`.
pub fn cpu_percent(before: &ProcSample, after: &ProcSample, wall_s: f64) -> f64 {
    if wall_s <= 0.0 {
        return 0.0;
    }
    after.cpu_us_since(before) as f64 / 1e6 / wall_s * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 \
                    123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(325));
        assert_eq!(parse_stat_cpu_ticks("12 (x) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn parses_status_lines() {
        let status = "Name:\tmosquitto\nVmPeak:\t  20000 kB\nVmHWM:\t   15800 kB\nVmRSS:\t    8600 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS"), Some(8600));
        assert_eq!(parse_status_kb(status, "VmHWM"), Some(15800));
        assert_eq!(parse_status_kb(status, "VmSwap"), None);
        assert_eq!(parse_status_kb("VmRSSX: 5 kB", "VmRSS"), None);
    }

    #[test]
    fn parses_the_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             unlimited            unlimited            processes \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_open_files_limit(limits), Some(20000));
        assert_eq!(parse_open_files_limit("Max open files  unlimited unlimited files"), None);
        assert_eq!(parse_open_files_limit(""), None);
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }

    #[test]
    fn samples_the_test_process_itself() {
        let pid = std::process::id();
        let first = ProcSample::of_pid(pid).expect("own /proc entry is readable");
        assert!(first.rss_kb > 0);
        assert!(first.hwm_kb >= first.rss_kb);
        // Burn some CPU until the kernel's tick accounting moves (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        let mut later = first;
        while later.cpu_ticks == first.cpu_ticks && std::time::Instant::now() < deadline {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            later = ProcSample::of_self().expect("own /proc entry is readable");
        }
        std::hint::black_box(x);
        assert!(later.cpu_ticks > first.cpu_ticks, "CPU time never advanced");
        assert!(later.cpu_us_since(&first) >= 10_000);
        assert!(cpu_percent(&first, &later, 0.01) > 0.0);
        assert!(ProcSample::of_pid(u32::MAX).is_err());
    }
}

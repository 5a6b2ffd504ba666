//! What the benchmark examples share.

/// `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat`.
const USER_HZ: f64 = 100.0;

/// User plus system CPU time of this process, in seconds (10 ms resolution).
pub(crate) fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The command name may hold spaces; the fields after it are plain numbers. utime and stime
    // are fields 14 and 15, the 12th and 13th after the name.
    let rest = &stat[stat.rfind(')').expect("a name") + 2..];
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    fields.iter().sum::<u64>() as f64 / USER_HZ
}

//! What the benchmarks read about a process from `/proc`.

use std::process::Command;

/// A process's CPU time so far (user + system, from `/proc/PID/stat`), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_user_system(pid);
    user + system
}

/// A process's CPU time so far in user space and in the kernel (`utime`, `stime` of
/// `/proc/PID/stat`), in seconds.
pub fn cpu_user_system(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let hz = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    let hz: f64 = String::from_utf8(hz.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ticks = |i: usize| fields[i].parse::<f64>().unwrap() / hz;
    (ticks(11), ticks(12))
}

/// A process's resident memory (`VmRSS`), in MB.
pub fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024.0
}

//! Threads: pinning, priority, and CPU time read from the scheduler's own clocks.

use std::time::Duration;

/// The pid of `ksoftirqd/<cpu>`: softirq work the kernel defers from the context that raised
/// it (after 2 ms or 10 rounds in one go) runs there.
pub fn ksoftirqd(cpu: usize) -> Option<i32> {
    let want = format!("ksoftirqd/{cpu}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == want).then_some(pid)
    })
}

/// Pins thread `pid` (0: the calling thread) to `cpu`.
pub fn pin(pid: i32, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Puts this process in a session of its own and raises that session's scheduling priority.
///
/// With the kernel's autogroups (on here), CPU time is shared fairly between sessions first and
/// by nice value only within one, so a build running in another session takes half of the
/// generator's CPU whatever the generator's nice value. A new session gets a new autogroup,
/// whose nice value is then raised; the caller's own session is left as it was. Leaving the
/// session also leaves the terminal's process group: Ctrl-C reaches cargo, not this process,
/// so it asks for SIGTERM when its parent dies.
pub fn own_autogroup(nice: i32) -> Result<(), String> {
    // SAFETY: plain syscalls without pointers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() == 1 {
            libc::raise(libc::SIGTERM);
        }
        if libc::setsid() < 0 {
            return Err(format!("setsid: {}", std::io::Error::last_os_error()));
        }
    }
    if std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
        .is_ok_and(|s| s.trim() == "0")
    {
        return Ok(());
    }
    std::fs::write("/proc/self/autogroup", nice.to_string())
        .map_err(|e| format!("/proc/self/autogroup: {e}"))
}

/// Sets the calling thread's nice value (on Linux a thread has its own).
pub fn renice_self(nice: i32) -> std::io::Result<()> {
    // SAFETY: plain syscalls; gettid has no preconditions.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time consumed so far by process/thread `pid` (the scheduler's precise runtime, which
/// on this kernel also holds the softirq work done in that thread's context).
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: out-pointer to a local.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    thread_clock(clock)
}

/// CPU time of the calling thread so far.
pub fn own_cpu_time() -> Duration {
    thread_clock(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or_default()
}

fn thread_clock(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: out-pointer to a local.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// CPU time (user + system) of this process (`libc::RUSAGE_SELF`: all its threads, with the
/// softirq work done in their context) or of its reaped children (`libc::RUSAGE_CHILDREN`).
pub fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: a zeroed rusage is a valid out-buffer; getrusage only writes it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: out-pointer to a local.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

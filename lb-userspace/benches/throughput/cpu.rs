//! Busy CPU time of the whole machine, from /proc/stat (not namespaced): user, nice, system,
//! irq and softirq time of every CPU. The benchmark's own figures come from the scheduler's
//! per-thread clocks instead (see `threads`); this says how much else ran on the machine
//! meanwhile (a build next to the benchmark shares its two CPUs and caches).
//!
//! The kernel here samples /proc/stat at its tick (CONFIG_TICK_CPU_ACCOUNTING, HZ=250), so over
//! a second or two it is an estimate to a few percent of a CPU.

use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct Stat {
    /// Busy clock ticks (USER_HZ) of the `cpu` total line.
    busy: u64,
}

impl Stat {
    pub fn read() -> Stat {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let busy = text.lines().find(|l| l.starts_with("cpu ")).map_or(0, |l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let get = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal (guest time is inside user).
            get(0) + get(1) + get(2) + get(5) + get(6)
        });
        Stat { busy }
    }

    /// Busy CPU time since `earlier`, all CPUs together.
    pub fn busy_since(&self, earlier: &Stat) -> Duration {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = if hz > 0 { hz as f64 } else { 100.0 };
        Duration::from_secs_f64(self.busy.saturating_sub(earlier.busy) as f64 / hz)
    }
}

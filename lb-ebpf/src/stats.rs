//! Per-CPU counters: plain increments, no atomics needed.

use aya_ebpf::maps::PerCpuArray;
use lb_common::{DecapReason, Reason, Traffic};

use crate::maps::{DECAP_STATS, REASON_STATS};

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(counter) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count_decap(reason: DecapReason) {
    if let Some(counter) = DECAP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: as above.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count_traffic(map: &PerCpuArray<Traffic>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(t) = map.get_ptr_mut(index) {
        // SAFETY: as above.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
            (*t).flows += u64::from(new_flow);
        }
    }
}

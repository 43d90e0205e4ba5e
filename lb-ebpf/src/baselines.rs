//! Baseline XDP programs for the benchmark, built and measured with the balancer:
//! 1. drop everything (the fixed cost of running a program at all);
//! 2. swap MACs and transmit (the floor for anything that forwards);
//! 3. parse Ethernet/IPv4/TCP, one hash lookup on the 5-tuple, swap MACs, transmit (the floor
//!    for a balancer with a connection table).
#![no_std]
#![no_main]

#[path = "parse.rs"]
#[allow(
    dead_code,
    reason = "the baselines read only part of what the parser offers"
)]
mod parse;

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::HashMap, programs::XdpContext,
};
use lb_common::FlowKeyV4;
use network_types::eth::EthHdr;

/// The 5-tuples baseline 3 looks up; the benchmark fills it like the balancer's table.
#[map]
static BASELINE_FLOWS: HashMap<FlowKeyV4, u32> = HashMap::with_max_entries(1 << 20, 0);

#[xdp]
pub fn baseline_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn baseline_swap_tx(ctx: XdpContext) -> u32 {
    if swap_macs(&ctx) {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_PASS
    }
}

#[xdp]
pub fn baseline_lookup_tx(ctx: XdpContext) -> u32 {
    let Ok(pkt) = parse::parse_ipv4(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { BASELINE_FLOWS.get(pkt.flow) }.is_none() {
        return xdp_action::XDP_PASS;
    }
    if swap_macs(&ctx) {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_PASS
    }
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> bool {
    let Some(eth) = parse::ptr_at_mut::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { core::mem::swap(&mut (*eth).src_addr, &mut (*eth).dst_addr) };
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

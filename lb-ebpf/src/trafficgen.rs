//! Programs for the throughput benchmark (`cargo bench --bench throughput`), one object:
//! - `trafficgen`: run in the kernel's live-frames mode (`BPF_PROG_TEST_RUN` with
//!   `BPF_F_TEST_XDP_LIVE_FRAMES`) on a client namespace's interface. Each run gives the frame
//!   the benchmark's template frame, then the next flow's source address and port with the
//!   checksums updated (and, to spread them over several hosts, its destination MAC), and
//!   returns `XDP_TX`, which the kernel turns into a real transmit on that interface: many
//!   distinct flows at a rate a socket could not reach.
//! - `sink`: on a backend's interface, counts the benchmark's datagrams and drops them (other
//!   traffic, such as the balancer's health checks, passes).
//! - `fwd`: the floor for any XDP forwarder on this test bed: rewrite the Ethernet addresses to
//!   one of a few next hops, chosen by the source port (spread like a balancer's flows), and
//!   `XDP_TX`, nothing else (no lookup, no state).
//! - `wire`: `XDP_PASS`, on the far end of a veth the generator transmits into (frames sent into
//!   a veth with `XDP_TX`/redirect are only received when the peer runs an XDP program).
//! - `uplink`: on the client's switch port, hands frames for a middlebox straight to that
//!   middlebox's port (`XDP_REDIRECT`), so it receives a raw frame as from a NIC's driver
//!   instead of an skb the bridge made; other frames pass to the bridge.
#![no_std]
#![no_main]

// The balancer's bounds-checked accessors and parser; this object uses only part of them.
#[path = "parse.rs"]
#[allow(
    dead_code,
    reason = "the balancer's parser; only part of it is used here"
)]
mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::PROTO_UDP;

/// What the generator writes into each frame. Host byte order; set by the benchmark.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenConfig {
    /// Distinct flows; frame `n` (per CPU) is flow `n % flows`.
    flows: u32,
    /// Source ports per source address: flow `f` is address `base_addr + f / ports_per_addr`,
    /// port `base_port + f % ports_per_addr`.
    ports_per_addr: u32,
    base_addr: u32,
    base_port: u32,
}

#[map]
static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);

/// Length of the generator's frames: the 64-byte Ethernet minimum less the FCS.
const FRAME_LEN: usize = 60;
/// The frame every run starts from, as 32-bit words (checksums valid for its own source).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Template([u32; FRAME_LEN / 4]);

#[map]
static GEN_TEMPLATE: Array<Template> = Array::with_max_entries(1, 0);

/// Per CPU: [0] frames generated (the next flow's sequence number), [1] frames the generator
/// could not rewrite (no template, or not IPv4 UDP/TCP): aborted, never sent.
#[map]
static GEN_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// The UDP destination port (host order) the sink counts.
#[map]
static SINK_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Per CPU: [0] datagrams counted and dropped by the sink.
#[map]
static SINK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Most hosts the generator and the forwarder spread frames over.
const MAX_HOPS: u32 = 4;

/// Where the generator's frames go: `[0]`, how many hosts (0: the template's destination for
/// every frame); `[1..]`, their MACs. Flow `f` goes to `[1 + f % n]`, as a balancer spreads
/// its flows over backends. MACs are in the low six bytes, in wire order.
#[map]
static GEN_HOPS: Array<u64> = Array::with_max_entries(1 + MAX_HOPS, 0);

/// The minimal forwarder's Ethernet addresses: `[0]`, its own (the source); `[1]`, how many
/// next hops; `[2..]`, their MACs, as in `GEN_HOPS`.
#[map]
static FWD_MACS: Array<u64> = Array::with_max_entries(2 + MAX_HOPS, 0);

// Offsets in the benchmark's template: untagged Ethernet, IPv4 without options, then UDP or TCP.
const IP: usize = 14;
const IP_PROTO: usize = IP + 9;
const IP_CHECK: usize = IP + 10;
const IP_SRC: usize = IP + 12;
const L4: usize = IP + 20;
const UDP_CHECK: usize = L4 + 6;
const TCP_CHECK: usize = L4 + 16;
const PROTO_TCP: u8 = 6;
const ETH_P_IP: u16 = 0x0800;

#[xdp]
pub fn trafficgen(ctx: XdpContext) -> u32 {
    let ok = next_flow(&ctx).is_some();
    bump(&GEN_STATS, if ok { 0 } else { 1 });
    if ok {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_ABORTED
    }
}

#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    let Ok(pkt) = parse::parse_ipv4(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let Some(port) = SINK_CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if pkt.flow.proto != PROTO_UDP || u32::from(u16::from_be(pkt.flow.dport)) != *port {
        return xdp_action::XDP_PASS;
    }
    bump(&SINK_STATS, 0);
    xdp_action::XDP_DROP
}

#[xdp]
pub fn fwd(ctx: XdpContext) -> u32 {
    forward(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// `fwd`: an IPv4 frame to the next hop its source port picks (`FWD_MACS`).
#[inline(always)]
fn forward(ctx: &XdpContext) -> Option<u32> {
    let own = *FWD_MACS.get(0)?;
    #[expect(
        clippy::manual_clamp,
        reason = "clamp's check of its bounds leaves a panic branch the verifier refuses"
    )]
    let hops = (*FWD_MACS.get(1)? as u32).min(MAX_HOPS).max(1);
    let ether_type: *const u16 = parse::ptr_at(ctx, 12)?;
    // The benchmark's frames: IPv4 without options, then the port.
    let sport: *const u16 = parse::ptr_at(ctx, L4)?;
    // SAFETY (both): bounds checked by ptr_at.
    if unsafe { *ether_type } != ETH_P_IP.to_be() {
        return None;
    }
    let hop = *FWD_MACS.get(2 + u32::from(unsafe { *sport }) % hops)?;
    set_mac(ctx, 0, hop)?;
    set_mac(ctx, 6, own)?;
    Some(xdp_action::XDP_TX)
}

/// Writes a MAC (the low six bytes of `mac`, wire order) at `offset` of the frame.
#[inline(always)]
fn set_mac(ctx: &XdpContext, offset: usize, mac: u64) -> Option<()> {
    let at: *mut [u8; 6] = parse::ptr_at_mut(ctx, offset)?;
    let b = mac.to_le_bytes();
    // SAFETY: bounds checked by ptr_at_mut; a byte array has no alignment.
    unsafe { *at = [b[0], b[1], b[2], b[3], b[4], b[5]] };
    Some(())
}

#[xdp]
pub fn wire(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// `uplink`'s destinations: a middlebox's MAC (in the low six bytes, wire order) → the ifindex
/// of the switch port towards it.
#[map]
static UPLINK_MACS: HashMap<u64, u32> = HashMap::with_max_entries(16, 0);

/// The ports of `UPLINK_MACS`, by ifindex (in the switch's namespace).
#[map]
static UPLINK_PORTS: DevMapHash = DevMapHash::with_max_entries(16, 0);

#[xdp]
pub fn uplink(ctx: XdpContext) -> u32 {
    let Some(dst) = parse::ptr_at::<[u8; 6]>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let mut mac = [0u8; 8];
    // SAFETY: bounds checked by ptr_at.
    mac[..6].copy_from_slice(unsafe { &*dst });
    // SAFETY: the value is copied out at once.
    match unsafe { UPLINK_MACS.get(u64::from_le_bytes(mac)) } {
        Some(&port) => UPLINK_PORTS
            .redirect(port, 0)
            .unwrap_or(xdp_action::XDP_PASS),
        None => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// Restores the template, then rewrites source address and port to the next flow's and updates
/// the checksums incrementally (RFC 1624).
///
/// The whole frame is written on every run because live-frames mode recycles its pages
/// without restoring them, and what happened downstream stays in them: frames come back with
/// the balancer's MAC rewrite (they would then bypass it), or NAT's address rewrite and a
/// decremented TTL.
#[inline(always)]
fn next_flow(ctx: &XdpContext) -> Option<()> {
    let template = GEN_TEMPLATE.get(0)?;
    let frame: *mut Template = parse::ptr_at_mut(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut; the packet has no alignment guarantee.
    unsafe { core::ptr::write_unaligned(frame, *template) };

    let cfg = GEN_CONFIG.get(0)?;
    let seq = GEN_STATS.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot; read before `bump` increments it.
    let n = unsafe { *seq };
    // `max(1)`: no division by zero (and no panic branch for the verifier to reject).
    let flow = (n % u64::from(cfg.flows.max(1))) as u32;
    let per_addr = cfg.ports_per_addr.max(1);
    let addr = cfg.base_addr.wrapping_add(flow / per_addr).to_be();
    let port = (cfg.base_port.wrapping_add(flow % per_addr) as u16).to_be();
    let hops = *GEN_HOPS.get(0)? as u32;
    if hops > 0 {
        set_mac(ctx, 0, *GEN_HOPS.get(1 + flow % hops.min(MAX_HOPS))?)?;
    }

    let proto: *const u8 = parse::ptr_at(ctx, IP_PROTO)?;
    // SAFETY (all accesses below): each pointer comes from ptr_at/ptr_at_mut, which checked
    // the bounds.
    let l4_check = match unsafe { *proto } {
        PROTO_UDP => UDP_CHECK,
        PROTO_TCP => TCP_CHECK,
        _ => return None,
    };
    let ip_check: *mut u16 = parse::ptr_at_mut(ctx, IP_CHECK)?;
    let src: *mut u32 = parse::ptr_at_mut(ctx, IP_SRC)?;
    let sport: *mut u16 = parse::ptr_at_mut(ctx, L4)?;
    let check: *mut u16 = parse::ptr_at_mut(ctx, l4_check)?;

    // One's-complement sums do not depend on byte order as long as every word is taken the
    // same way, so the words are used as they lie in memory.
    let old_addr = unsafe { *src };
    let old_port = unsafe { *sport };
    let addr_diff = word_diff(old_addr as u16, addr as u16)
        + word_diff((old_addr >> 16) as u16, (addr >> 16) as u16);
    unsafe {
        *src = addr;
        *sport = port;
        *ip_check = apply(*ip_check, addr_diff);
        let l4 = *check;
        // A UDP checksum of 0 means "none": leave it so. A computed 0 is sent as 0xffff.
        if l4_check == TCP_CHECK || l4 != 0 {
            let c = apply(l4, addr_diff + word_diff(old_port, port));
            *check = if c == 0 && l4_check == UDP_CHECK {
                0xffff
            } else {
                c
            };
        }
    }
    Some(())
}

/// `~old + new` for one 16-bit word (RFC 1624, eqn. 3).
#[inline(always)]
fn word_diff(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// `~(~check + diff)`, folded to 16 bits.
#[inline(always)]
fn apply(check: u16, diff: u32) -> u16 {
    let mut sum = u32::from(!check) + diff;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! XDP entry points. Read top-down: parse → select → forward; every exit is counted by reason.
#![no_std]
#![no_main]
// The atomic add on shared flow counters (see select.rs).
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "core::intrinsics::atomic_xadd for BPF's atomic add"
)]

mod decap;
mod flows;
mod forward;
mod hc;
mod maps;
mod parse;
mod select;
mod stats;

use aya_ebpf::bindings::xdp_md;
use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use flows::Tracked;
use forward::{
    Inner,
    route::{Sent, pack, unpack},
};
use lb_common::{
    DecapReason, FORWARD_DSR, FORWARD_FULLNAT, FORWARD_GUE, FORWARD_IPIP, FORWARD_NAT, FlowKeyV4,
    FlowKeyV6, Reason, Service, ServiceKeyV4, ServiceKeyV6, VIP_FILTER_PLAIN, vip_filter_place,
};
use parse::{L3, TCP_ACK, TCP_SYN};
use select::{Chosen, FlowKey};

/// Set to non-zero by the loader (`lb daemon --debug-packets`) to log each forwarding decision.
/// A read-only global: the verifier sees its value at load time and removes the logging code
/// from the hot path when it is zero.
#[unsafe(no_mangle)]
static LB_DEBUG: u32 = 0;

/// The balancer: TCP/UDP services on IPv4 and IPv6 VIPs, forwarded by each service's mode.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let Sent { reason, action } = balance(&ctx).unwrap_or_else(|reason| Sent {
        reason,
        action: verdict(reason),
    });
    stats::count_reason(reason);
    action
}

/// Stands in for the wire on the far end of a veth: frames sent into a veth with XDP_TX are only
/// received when the peer runs an XDP program (test beds attach this to the bridge port).
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// On backends (`lb decap`): strips the outer IP-in-IP or GUE headers of packets the balancer
/// encapsulated to this host and passes the inner packet to the stack (see decap.rs).
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let reason = match decap::decap(&ctx) {
        Ok(kind) => kind,
        Err(reason) => reason,
    };
    stats::count_decap(reason);
    decap_verdict(reason)
}

/// tc egress on the balancer's interface: steers VIP-addressed health checks (see hc.rs).
#[classifier]
pub fn lb_hc_egress(ctx: TcContext) -> i32 {
    hc::steer(&ctx)
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<Sent, Reason> {
    // Not zeroed first: LLVM makes that a call to a byte-by-byte memset.
    let mut step = core::mem::MaybeUninit::<Step>::uninit();
    let (done, inner) = match parse::l2(ctx)? {
        L3::V4(l3) => (
            balance_family::<FlowKeyV4>(ctx, l3, &mut step),
            Inner { l3, v6: false },
        ),
        L3::V6(l3) => (
            balance_family::<FlowKeyV6>(ctx, l3, &mut step),
            Inner { l3, v6: true },
        ),
    };
    // SAFETY: `balance_family` wrote the whole step when it returned `Ok`.
    let step = || unsafe { step.assume_init_ref() };
    match done {
        Ok(()) if step().kind == STEP_DSR => {
            let step = step();
            count(ctx, step.service, step.backend, step.has(STEP_F_PLACED));
            Ok(Sent {
                reason: forwarded(step.has(STEP_F_UNTRACKED)),
                action: xdp_action::XDP_TX,
            })
        }
        Ok(()) if step().kind == STEP_ENCAP => encapsulate(ctx, step(), l3_arg(inner)),
        Ok(()) => unpack(lb_nat(
            ctx.ctx,
            l3_arg(inner),
            step().service,
            step().backend,
            step().hash,
        )),
        // Checked here, not in lb_nat_reply: the call alone cost ~20 ns per passed packet.
        Err(Reason::PassNotVip) if forward::nat::enabled() => {
            unpack(lb_nat_reply(ctx.ctx, l3_arg(inner)))
        }
        Err(Reason::PassNotTcpUdp) => unpack(lb_unparsed(ctx.ctx, l3_arg(inner), 0)),
        Err(Reason::PassFragment) => unpack(lb_unparsed(ctx.ctx, l3_arg(inner), 1)),
        Err(reason) => Err(reason),
    }
}

/// What a family's balancing step did, for `balance` to finish: rewrote the packet for L2 DSR
/// (`balance` counts it), has an ipip/gue packet to encapsulate, or found a nat/fullnat service
/// whose translation runs next in a subprogram of its own.
///
/// Whom to count a packet for is counted by `balance`, not in the family's subprogram: that
/// frame is on the call chain to the scheduler (`lb_pick`), which is near the verifier's
/// 512-byte limit.
///
/// Plain words, written through a pointer by `balance_family`, which returns a scalar. Not a
/// Rust enum: LLVM writes an enum's variant whole, the bytes a smaller variant leaves as
/// padding taken from whatever register is at hand, and the verifier refuses a part of a
/// pointer spilled to the stack; not a returned struct: LLVM may leave the pointer to the
/// caller's copy in r0 at the exit, which the verifier refuses ("cannot return stack pointer
/// to the caller").
struct Step {
    /// `STEP_DSR`, `STEP_ENCAP` or `STEP_NAT`.
    kind: u32,
    /// The backend (dsr, encap), or the service's ring (nat).
    backend: u32,
    /// The service's id.
    service: u32,
    /// The flow hash (encap: the outer source and GUE port), or the service's forward |
    /// scheduler << 8 (nat).
    hash: u32,
    /// `STEP_F_*` bits.
    flags: u32,
}

const STEP_DSR: u32 = 0;
const STEP_ENCAP: u32 = 1;
const STEP_NAT: u32 = 2;
/// The flow was placed by this packet (not found in the connection table).
const STEP_F_PLACED: u32 = 1;
/// Counted as `ForwardedUntracked` (the SYN-flood guard).
const STEP_F_UNTRACKED: u32 = 2;
/// encap: GUE, not IP-in-IP.
const STEP_F_GUE: u32 = 4;

impl Step {
    #[inline(always)]
    fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

// One BPF subprogram per family, one per family for NAT (forward and replies), and one for the
// packets they do not balance (`unparsed`), each called from `balance`, not from each other:
// inlined together, these paths shared one stack frame the size of all of them, and with the
// encapsulation and NAT steps called on top of it the chain exceeded the verifier's 512
// bytes. The NAT steps parse the packet again (a few ns, off the DSR path).

// The order of the lookups: the VIP filter (an array word) sends most packets that are not for
// a service on their way at once; then, unless only nat/fullnat services have the filter slot
// (their flows are in tables of their own), the connection table, whose entry and the
// backend's (which names its service and mode) are all an established flow needs; the service
// map only for the rest: new flows, nat/fullnat, and packets whose slot another key set. The
// service lookup was a quarter of an established packet's cost.

/// What `balance_family` (and the ICMP errors about a flow) need of an address family: its
/// parser, connection table (`Tracked`) and service map.
pub(crate) trait Family: FlowKey + Tracked + Sized + 'static {
    const V6: bool;
    fn parse(ctx: &XdpContext, l3: usize) -> Result<parse::Packet<Self>, Reason>;
    /// The service the flow's destination, port and protocol name, if any.
    fn service(&self) -> Option<Service>;
}

impl Family for FlowKeyV4 {
    const V6: bool = false;
    #[inline(always)]
    fn parse(ctx: &XdpContext, l3: usize) -> Result<parse::Packet<Self>, Reason> {
        parse::ipv4(ctx, l3)
    }
    #[inline(always)]
    fn service(&self) -> Option<Service> {
        let key = ServiceKeyV4 {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            _pad: 0,
        };
        // SAFETY: the value is copied out at once; userspace replaces entries whole.
        unsafe { maps::SERVICES.get(key) }.copied()
    }
}

impl Family for FlowKeyV6 {
    const V6: bool = true;
    #[inline(always)]
    fn parse(ctx: &XdpContext, l3: usize) -> Result<parse::Packet<Self>, Reason> {
        parse::ipv6(ctx, l3)
    }
    #[inline(always)]
    fn service(&self) -> Option<Service> {
        let key = ServiceKeyV6 {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            _pad: 0,
        };
        // SAFETY: as for IPv4.
        unsafe { maps::SERVICES_V6.get(key) }.copied()
    }
}

/// One family's balancing step, into `step`; a subprogram per family (see above).
#[inline(never)]
fn balance_family<K: Family>(
    ctx: &XdpContext,
    l3: usize,
    step: &mut core::mem::MaybeUninit<Step>,
) -> Result<(), Reason> {
    step.write(balance_step::<K>(ctx, l3)?);
    Ok(())
}

#[inline(always)]
fn balance_step<K: Family>(ctx: &XdpContext, l3: usize) -> Result<Step, Reason> {
    let pkt = K::parse(ctx, l3)?;
    let filter = vip_filter(pkt.flow.vip_filter_bit());
    if filter == 0 {
        return Err(Reason::PassNotVip);
    }
    let now = select::clock();
    let plain = filter & VIP_FILTER_PLAIN != 0;
    let syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // The connection table's set and seal: its own hash, cheaper than the flow hash.
    let slot = pkt.flow.table_hash();
    if plain
        && !syn
        && let Some(found) = established(&pkt, slot, now)
    {
        return send(ctx, &found, &pkt.flow);
    }
    let service = pkt.flow.service().ok_or(Reason::PassNotVip)?;
    if is_nat(service.forward) {
        return Ok(Step {
            kind: STEP_NAT,
            backend: service.ring,
            service: service.id,
            hash: u32::from(service.forward) | u32::from(service.scheduler) << 8,
            flags: 0,
        });
    }
    // A SYN opens a connection, so a hashing scheduler places it without a look in the table
    // (the look was a third of a new flow's cost with the kernel's LRU table): a retransmitted
    // SYN gets the same backend unless the ring changed in between, and then the half-open
    // connection moves. The counting schedulers look first: a retransmitted SYN must not be
    // placed and counted twice. Past the SYN-flood guard's limit, a hashing scheduler's SYN
    // is looked up too (an entry it finds still holds), but never entered: the connection's
    // next packet makes the entry.
    let hashed = select::trusts_syn(service.scheduler);
    let guarded = syn && hashed && !select::syn_guard_admits(now);
    if syn
        && plain
        && (!hashed || guarded)
        && let Some(found) = established(&pkt, slot, now)
    {
        return send(ctx, &found, &pkt.flow);
    }
    let backend = select::place_new(&service, &pkt, slot, now, !guarded)?;
    send(ctx, &backend, &pkt.flow)
}

/// The flow's backend from the connection table, unless it is a nat/fullnat one: the service
/// changed mode in place, and its flows are placed again in the NAT tables.
#[inline(always)]
fn established<K: Family>(pkt: &parse::Packet<K>, slot: u32, now: u32) -> Option<Chosen> {
    let entry = flows::established(&pkt.flow, slot, pkt.tcp_flags, now)?;
    let backend = entry.backend;
    if is_nat(backend.forward) {
        return None;
    }
    Some(Chosen {
        id: entry.id,
        mac: backend.mac,
        service: backend.service,
        forward: backend.forward,
        placed: false,
        untracked: false,
        nat_port: 0,
    })
}

/// The reason a balanced packet is counted under: `ForwardedUntracked` for a SYN the SYN-flood
/// guard sent on without a connection-table entry.
#[inline(always)]
fn forwarded(untracked: bool) -> Reason {
    if untracked {
        Reason::ForwardedUntracked
    } else {
        Reason::Forwarded
    }
}

/// The VIP filter's bits (`VIP_FILTER_PLAIN`, `VIP_FILTER_NAT`) in `slot`: 0 when no service
/// has that slot.
#[inline(always)]
fn vip_filter(slot: u32) -> u64 {
    let (word, shift) = vip_filter_place(slot);
    maps::VIP_FILTER.get(word).map_or(0, |w| (w >> shift) & 3)
}

/// Sends a packet of `flow` to its chosen backend by the mode of the backend's service (dsr
/// here; for ipip and gue, says what to encapsulate: `balance` does it) and counts it.
#[inline(always)]
fn send<K: FlowKey>(ctx: &XdpContext, backend: &Chosen, flow: &K) -> Result<Step, Reason> {
    let flags = if backend.placed { STEP_F_PLACED } else { 0 }
        | if backend.untracked {
            STEP_F_UNTRACKED
        } else {
            0
        };
    match backend.forward {
        FORWARD_DSR => {
            forward::dsr::rewrite(ctx, &backend.mac)?;
            Ok(Step {
                kind: STEP_DSR,
                backend: backend.id,
                service: backend.service,
                hash: 0,
                flags,
            })
        }
        FORWARD_IPIP | FORWARD_GUE => Ok(Step {
            kind: STEP_ENCAP,
            backend: backend.id,
            service: backend.service,
            hash: flow.flow_hash(),
            flags: flags
                | if backend.forward == FORWARD_GUE {
                    STEP_F_GUE
                } else {
                    0
                },
        }),
        _ => Err(Reason::DropInternal),
    }
}

/// Encapsulates an ipip/gue `step` and sends it (`l3` as `l3_arg`); counts the packet unless
/// it was answered "too big" instead. A subprogram, so its results stay out of `balance`'s
/// frame, which every chain includes.
#[inline(never)]
fn encapsulate(ctx: &XdpContext, step: &Step, l3: u32) -> Result<Sent, Reason> {
    let e = forward::encap::Encap {
        inner: Inner {
            l3: (l3 & 0xff) as usize,
            v6: l3 & 0x100 != 0,
        },
        id: step.backend,
        hash: step.hash,
        gue: step.has(STEP_F_GUE),
        reply: true,
        reason: forwarded(step.has(STEP_F_UNTRACKED)),
    };
    let sent = forward::encap::send(ctx, &e)?;
    if sent.reason != Reason::IcmpTooBig {
        count(ctx, step.service, step.backend, step.has(STEP_F_PLACED));
    }
    Ok(sent)
}

#[inline(always)]
fn is_nat(forward: u8) -> bool {
    forward == FORWARD_NAT || forward == FORWARD_FULLNAT
}

/// Counts a packet sent to a backend in its service's and backend's traffic.
#[inline(always)]
fn count(ctx: &XdpContext, service: u32, backend: u32, placed: bool) {
    let len = (ctx.data_end() - ctx.data()) as u64;
    stats::count_traffic(&maps::SERVICE_STATS, service, len, placed);
    stats::count_traffic(&maps::BACKEND_STATS, backend, len, placed);
    // SAFETY: a read of a plain u32 global.
    if unsafe { core::ptr::read_volatile(&LB_DEBUG) } != 0 {
        log_forwarded(ctx, service, backend, placed);
    }
}

/// `--debug-packets`: logs a forwarding decision. A subprogram: the logger's arguments and
/// its call take stack of their own, which inlined went into every caller's frame.
#[inline(never)]
fn log_forwarded(ctx: &XdpContext, service: u32, backend: u32, placed: bool) {
    debug!(
        ctx,
        "service {} -> backend {} (new flow: {})",
        service,
        backend,
        u8::from(placed)
    );
}

/// The IP header's offset and family as one argument of the global functions below.
#[inline(always)]
fn l3_arg(inner: Inner) -> u32 {
    inner.l3 as u32 | u32::from(inner.v6) << 8
}

/// `l3_arg` back, bounded for the verifier (a global function knows nothing of its
/// arguments): the IP header follows Ethernet and at most one VLAN tag.
#[inline(always)]
fn l3_of(arg: u32) -> Result<Inner, Reason> {
    // One of two constants, not a range: with a range every header offset after it is a range
    // too, and the verifier keeps many more states apart.
    let l3 = match arg & 0xff {
        14 => 14,
        18 => 18,
        _ => return Err(Reason::DropInternal),
    };
    Ok(Inner {
        l3,
        v6: arg & 0x100 != 0,
    })
}

// The paths off the main one (NAT, NAT replies, ICMP errors, fragments) are global BPF
// functions: the verifier checks each once, on its own, instead of again for every state of
// the balancer that reaches it (which took the program past the verifier's budget of 1M
// instructions), and each has its own stack frame. They take the context and scalars, and
// return a packed result (`route::pack`).

/// A packet of a nat/fullnat service (`fs`: forward | scheduler << 8).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_nat(ctx: *mut xdp_md, l3: u32, id: u32, ring: u32, fs: u32) -> i64 {
    let ctx = XdpContext::new(ctx);
    let service = Service {
        id,
        ring,
        forward: fs as u8,
        scheduler: (fs >> 8) as u8,
        flags: 0,
        _pad: 0,
    };
    pack(l3_of(l3).and_then(|inner| {
        let (sent, backend) = if inner.v6 {
            let mut pkt = parse::ipv6(&ctx, inner.l3)?;
            // Without extension headers only: with them, every header length is a state of
            // its own for the rest of the path, past the verifier's budget.
            if pkt.l4 != inner.l3 + 40 {
                return Err(Reason::PassNotTcpUdp);
            }
            pkt.l4 = inner.l3 + 40;
            forward::nat::forward(&ctx, inner.l3, &pkt, &service)?
        } else {
            let pkt = parse::ipv4(&ctx, inner.l3)?;
            forward::nat::forward(&ctx, inner.l3, &pkt, &service)?
        };
        count(&ctx, service.id, backend.id, backend.placed);
        Ok(sent)
    }))
}

/// A packet to no VIP: a backend's reply in a nat/fullnat flow, or `PassNotVip`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_nat_reply(ctx: *mut xdp_md, l3: u32) -> i64 {
    let ctx = XdpContext::new(ctx);
    pack(l3_of(l3).and_then(|inner| {
        if inner.v6 {
            let pkt = parse::ipv6(&ctx, inner.l3)?;
            forward::nat::reply(&ctx, inner.l3, &pkt)
        } else {
            let pkt = parse::ipv4(&ctx, inner.l3)?;
            forward::nat::reply(&ctx, inner.l3, &pkt)
        }
    }))
}

/// A packet the parser does not balance (`fragment` 0: not TCP/UDP, 1: a fragment): ICMP
/// errors about a VIP's flows (icmp.rs) and fragments of services that take them
/// (fragment.rs) are still forwarded; everything else keeps the parser's reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_unparsed(ctx: *mut xdp_md, l3: u32, fragment: u32) -> i64 {
    let ctx = XdpContext::new(ctx);
    pack(l3_of(l3).and_then(|inner| match (fragment != 0, inner.v6) {
        (false, false) => forward::icmp::error_v4(&ctx, inner.l3),
        (false, true) => forward::icmp::error_v6(&ctx, inner.l3),
        (true, false) => forward::fragment::v4(&ctx, inner.l3),
        (true, true) => forward::fragment::v6(&ctx, inner.l3),
    }))
}

#[inline(always)]
fn verdict(reason: Reason) -> u32 {
    match reason {
        // Sent packets carry their own action (`Sent`); these arms are for completeness.
        Reason::Forwarded
        | Reason::ForwardedUntracked
        | Reason::IcmpTooBig
        | Reason::IcmpForwarded
        | Reason::NatReply => xdp_action::XDP_TX,
        Reason::PassToKernel | Reason::PassIcmpNoFlow => xdp_action::XDP_PASS,
        Reason::DropNoRoute | Reason::DropTooBig | Reason::DropNatNoPort => xdp_action::XDP_DROP,
        Reason::PassNotIp
        | Reason::PassNotTcpUdp
        | Reason::PassNotVip
        | Reason::PassFragment
        | Reason::PassShortL2 => xdp_action::XDP_PASS,
        Reason::DropMalformedIp
        | Reason::DropMalformedL4
        | Reason::DropNoBackend
        | Reason::DropInternal => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn decap_verdict(reason: DecapReason) -> u32 {
    match reason {
        DecapReason::DropMalformedOuter
        | DecapReason::DropMalformedGue
        | DecapReason::DropMalformedInner
        | DecapReason::DropInternal => xdp_action::XDP_DROP,
        DecapReason::Ipip4in4
        | DecapReason::Ipip6in4
        | DecapReason::Ipip4in6
        | DecapReason::Ipip6in6
        | DecapReason::Gue4in4
        | DecapReason::Gue6in4
        | DecapReason::Gue4in6
        | DecapReason::Gue6in6
        | DecapReason::PassNotIp
        | DecapReason::PassNotEncap
        | DecapReason::PassNotLocal
        | DecapReason::PassFragment => xdp_action::XDP_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! ICMP on the balancer: "too big" answers for packets that would not fit the route to their
//! backend once encapsulated, and ICMP errors about a VIP's packets, forwarded to the backend
//! that sent them.
//!
//! Too big: the balancer never fragments. An IPv4 packet with DF gets ICMP "fragmentation
//! needed" (type 3 code 4), an IPv6 packet ICMPv6 "packet too big" (type 2), with the MTU the
//! route leaves for the inner packet, from the VIP to the client, out of the interface the
//! packet came in on (MACs swapped, VLAN tag kept). The reply quotes a fixed number of bytes of
//! the packet, as Katran does: 84 for IPv4 (a 112-byte datagram), 248 for IPv6 (296 bytes,
//! well inside IPv6's 1280-byte minimum MTU); a packet shorter than that (only possible on
//! links with MTUs below ~130 bytes) is dropped. An IPv4 packet without DF is dropped.
//!
//! ICMP errors to a VIP (IPv4 destination unreachable and time exceeded; ICMPv6 destination
//! unreachable, packet too big, time exceeded) whose quoted packet was sent from that VIP
//! (VIP:vport → client:cport) belong to the flow client:cport → VIP:vport: they go to that
//! flow's backend (from the connection table) by the service's mode, so its stack learns the
//! path MTU or the failure. Only dsr/ipip/gue services: nat/fullnat flows are not in the
//! connection table, and such errors pass to the kernel (`PassIcmpNoFlow`), as do errors for
//! unknown flows or backends gone. The ICMPv6 header must follow the fixed IPv6 header, and the
//! quoted IPv6 packet must carry TCP/UDP right after its fixed header.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_ALIVE, FORWARD_DSR, FORWARD_GUE, FORWARD_IPIP, FlowKeyV4, FlowKeyV6, PROTO_TCP,
    PROTO_UDP, Reason,
};

use super::{
    Inner,
    encap::{ETH_HLEN, EthWire, IP_DF, IPV4_HLEN, IPV6_HLEN, fold, ipv4_check},
    route::Sent,
};
use crate::{
    Family, flows,
    parse::{IP_MF, IP_OFFSET, Ipv4Wire, Ipv6Wire, ptr_at, ptr_at_mut},
};

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const ICMP_HLEN: usize = 8;
/// Bytes of the offending packet quoted in a "too big" reply (see the module docs).
const QUOTE4: usize = 84;
const QUOTE6: usize = 248;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const REPLY_TTL: u8 = 64;

/// An ICMP/ICMPv6 header: type, code, checksum, and the 4 bytes that depend on the type
/// (for "too big": unused + next-hop MTU in ICMP, the MTU in ICMPv6).
#[repr(C)]
struct IcmpWire {
    kind: u8,
    code: u8,
    check: u16,
    rest: u32,
}

/// Answers the packet at `inner` with "too big" for a path that leaves `mtu` bytes for it. A
/// subprogram of its own (see `encap::send`).
#[inline(never)]
pub fn too_big(ctx: &XdpContext, inner: Inner, mtu: u16) -> Result<Sent, Reason> {
    // The offset came through memory, where the verifier loses its bound: Ethernet and at
    // most one VLAN tag.
    if inner.l3 > super::encap::ETH_HLEN + 4 {
        return Err(Reason::DropInternal);
    }
    let inner = Inner {
        l3: inner.l3 & 0x1f,
        v6: inner.v6,
    };
    if inner.v6 {
        too_big6(ctx, inner.l3, mtu)
    } else {
        too_big4(ctx, inner.l3, mtu)
    }
}

#[inline(always)]
fn too_big4(ctx: &XdpContext, l3: usize, mtu: u16) -> Result<Sent, Reason> {
    let ip: *const Ipv4Wire = ptr_at(ctx, l3).ok_or(Reason::DropInternal)?;
    // SAFETY (all packet reads and writes here): pointers from ptr_at(_mut), bounds checked
    // after the last adjustment of the frame.
    let (frags, client, vip) = unsafe { ((*ip).frags, (*ip).src, (*ip).dst) };
    if u16::from_be(frags) & IP_DF == 0 {
        return Err(Reason::DropTooBig);
    }
    reshape(ctx, l3, QUOTE4, IPV4_HLEN + ICMP_HLEN)?;
    let mut h = Ipv4Wire {
        vihl: 0x45,
        tos: 0,
        tot_len: ((IPV4_HLEN + ICMP_HLEN + QUOTE4) as u16).to_be(),
        id: 0,
        frags: 0,
        ttl: REPLY_TTL,
        proto: PROTO_ICMP,
        check: 0,
        src: vip,
        dst: client,
    };
    h.check = ipv4_check(&h);
    let ip: *mut Ipv4Wire = ptr_at_mut(ctx, l3).ok_or(Reason::DropInternal)?;
    unsafe { *ip = h };
    let icmp: *mut IcmpWire = ptr_at_mut(ctx, l3 + IPV4_HLEN).ok_or(Reason::DropInternal)?;
    unsafe {
        *icmp = IcmpWire {
            kind: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            check: 0,
            // Bytes 4-5 unused, 6-7 the next-hop MTU.
            rest: (u32::from(mtu)).to_be(),
        };
    }
    let msg: *mut [u8; ICMP_HLEN + QUOTE4] =
        ptr_at_mut(ctx, l3 + IPV4_HLEN).ok_or(Reason::DropInternal)?;
    let sum = csum(msg.cast(), (ICMP_HLEN + QUOTE4) as u32)?;
    unsafe { (*icmp).check = fold(sum) };
    Ok(Sent {
        reason: Reason::IcmpTooBig,
        action: xdp_action::XDP_TX,
    })
}

#[inline(always)]
fn too_big6(ctx: &XdpContext, l3: usize, mtu: u16) -> Result<Sent, Reason> {
    let ip: *const Ipv6Wire = ptr_at(ctx, l3).ok_or(Reason::DropInternal)?;
    // SAFETY: as in too_big4.
    let (client, vip) = unsafe { ((*ip).src, (*ip).dst) };
    reshape(ctx, l3, QUOTE6, IPV6_HLEN + ICMP_HLEN)?;
    let len = (ICMP_HLEN + QUOTE6) as u32;
    let ip: *mut Ipv6Wire = ptr_at_mut(ctx, l3).ok_or(Reason::DropInternal)?;
    unsafe {
        *ip = Ipv6Wire {
            vtc_flow: (6u32 << 28).to_be(),
            payload_len: (len as u16).to_be(),
            next_hdr: PROTO_ICMPV6,
            hop_limit: REPLY_TTL,
            src: vip,
            dst: client,
        };
    }
    let icmp: *mut IcmpWire = ptr_at_mut(ctx, l3 + IPV6_HLEN).ok_or(Reason::DropInternal)?;
    unsafe {
        *icmp = IcmpWire {
            kind: ICMPV6_PKT_TOOBIG,
            code: 0,
            check: 0,
            rest: u32::from(mtu).to_be(),
        };
    }
    let msg: *mut [u8; ICMP_HLEN + QUOTE6] =
        ptr_at_mut(ctx, l3 + IPV6_HLEN).ok_or(Reason::DropInternal)?;
    // The pseudo-header: both addresses, the upper-layer length and the next header, as
    // native-order words like the rest of the sum.
    let mut sum = csum(msg.cast(), len)?;
    for i in 0..4 {
        sum += u64::from(vip[i]) + u64::from(client[i]);
    }
    sum += u64::from(len.to_be()) + u64::from(u32::from(PROTO_ICMPV6).to_be());
    unsafe { (*icmp).check = fold(sum) };
    Ok(Sent {
        reason: Reason::IcmpTooBig,
        action: xdp_action::XDP_TX,
    })
}

/// Turns the frame into L2 header + `push` bytes of room + the first `quote` bytes of the
/// packet at `l3`: cuts the tail, grows the head, and moves the L2 header (MACs swapped, VLAN
/// tag kept) to the front again.
#[inline(always)]
fn reshape(ctx: &XdpContext, l3: usize, quote: usize, push: usize) -> Result<(), Reason> {
    let len = ctx.data_end() - ctx.data();
    let keep = l3 + quote;
    if len < keep {
        return Err(Reason::DropTooBig);
    }
    let eth: *const EthWire = ptr_at(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: bounds checked by ptr_at; read before the adjustments invalidate the pointers.
    let old = unsafe { *eth };
    let tagged = l3 > ETH_HLEN;
    let tag = if tagged {
        let t: *const u32 = ptr_at(ctx, ETH_HLEN).ok_or(Reason::DropInternal)?;
        unsafe { *t }
    } else {
        0
    };
    // SAFETY: helper calls on the context the kernel passed in.
    if len > keep && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - keep) as i32)) } != 0 {
        return Err(Reason::DropInternal);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(push as i32)) } != 0 {
        return Err(Reason::DropInternal);
    }
    let eth: *mut EthWire = ptr_at_mut(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: bounds checked by ptr_at_mut after the adjustments.
    unsafe {
        *eth = EthWire {
            dst: old.src,
            src: old.dst,
            ether_type: old.ether_type,
        };
    }
    if tagged {
        let t: *mut u32 = ptr_at_mut(ctx, ETH_HLEN).ok_or(Reason::DropInternal)?;
        unsafe { *t = tag };
    }
    Ok(())
}

/// The 32-bit partial sum of `len` bytes of the packet at `p` (a multiple of 4, at most 512).
#[inline(always)]
fn csum(p: *mut u32, len: u32) -> Result<u64, Reason> {
    // SAFETY: `p` points at `len` bytes inside the frame (checked by the caller's ptr_at).
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p, len, 0) };
    if sum < 0 {
        return Err(Reason::DropInternal);
    }
    Ok(sum as u64)
}

/// An ICMP error to an IPv4 VIP about one of its packets: forwarded to the flow's backend.
/// `Err(PassNotTcpUdp)` for any other ICMP (or other protocol), as before.
#[inline(always)]
pub fn error_v4(ctx: &XdpContext, l3: usize) -> Result<Sent, Reason> {
    let ip: *const Ipv4Wire = ptr_at(ctx, l3).ok_or(Reason::PassNotTcpUdp)?;
    // SAFETY (reads): pointers from ptr_at, which checked the bounds.
    let (vihl, proto, frags, to) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).frags, (*ip).dst) };
    if proto != PROTO_ICMP {
        return Err(Reason::PassNotTcpUdp);
    }
    if u16::from_be(frags) & (IP_MF | IP_OFFSET) != 0 {
        return Err(Reason::PassFragment);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let icmp: *const IcmpWire = ptr_at(ctx, l3 + ihl).ok_or(Reason::PassNotTcpUdp)?;
    let kind = unsafe { (*icmp).kind };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return Err(Reason::PassNotTcpUdp);
    }
    let quoted = l3 + ihl + ICMP_HLEN;
    let q: *const Ipv4Wire = ptr_at(ctx, quoted).ok_or(Reason::PassNotTcpUdp)?;
    let (qvihl, qproto, qsrc, qdst) = unsafe { ((*q).vihl, (*q).proto, (*q).src, (*q).dst) };
    let qihl = ((qvihl & 0x0f) as usize) * 4;
    if (qproto != PROTO_TCP && qproto != PROTO_UDP) || qsrc != to || qihl < IPV4_HLEN {
        return Err(Reason::PassNotTcpUdp);
    }
    let ports: *const [u16; 2] = ptr_at(ctx, quoted + qihl).ok_or(Reason::PassNotTcpUdp)?;
    let [vport, cport] = unsafe { *ports };
    let flow = FlowKeyV4 {
        src: qdst,
        dst: qsrc,
        sport: cport,
        dport: vport,
        proto: qproto,
        _pad0: 0,
        _pad1: 0,
    };
    forward(ctx, flow, l3)
}

/// `error_v4` for ICMPv6 to an IPv6 VIP.
#[inline(always)]
pub fn error_v6(ctx: &XdpContext, l3: usize) -> Result<Sent, Reason> {
    let ip: *const Ipv6Wire = ptr_at(ctx, l3).ok_or(Reason::PassNotTcpUdp)?;
    // SAFETY (reads): as in error_v4.
    let (next, to) = unsafe { ((*ip).next_hdr, (*ip).dst) };
    if next != PROTO_ICMPV6 {
        return Err(Reason::PassNotTcpUdp);
    }
    let icmp: *const IcmpWire = ptr_at(ctx, l3 + IPV6_HLEN).ok_or(Reason::PassNotTcpUdp)?;
    let kind = unsafe { (*icmp).kind };
    if kind != ICMPV6_DEST_UNREACH && kind != ICMPV6_PKT_TOOBIG && kind != ICMPV6_TIME_EXCEED {
        return Err(Reason::PassNotTcpUdp);
    }
    let quoted = l3 + IPV6_HLEN + ICMP_HLEN;
    let q: *const Ipv6Wire = ptr_at(ctx, quoted).ok_or(Reason::PassNotTcpUdp)?;
    let (qproto, qsrc, qdst) = unsafe { ((*q).next_hdr, (*q).src, (*q).dst) };
    if (qproto != PROTO_TCP && qproto != PROTO_UDP) || qsrc != to {
        return Err(Reason::PassNotTcpUdp);
    }
    let ports: *const [u16; 2] = ptr_at(ctx, quoted + IPV6_HLEN).ok_or(Reason::PassNotTcpUdp)?;
    let [vport, cport] = unsafe { *ports };
    let flow = FlowKeyV6 {
        src: qdst,
        dst: qsrc,
        sport: cport,
        dport: vport,
        proto: qproto,
        _pad0: 0,
        _pad1: 0,
    };
    forward(ctx, flow, l3)
}

/// Sends the ICMP error (its IP header at `l3`) to the backend of `flow` (client → VIP) by the
/// mode of the flow's service.
#[inline(always)]
fn forward<K: Family>(ctx: &XdpContext, flow: K, l3: usize) -> Result<Sent, Reason> {
    let mode = flow.service().ok_or(Reason::PassNotTcpUdp)?.forward;
    let inner = Inner { l3, v6: K::V6 };
    if mode != FORWARD_DSR && mode != FORWARD_IPIP && mode != FORWARD_GUE {
        return Err(Reason::PassIcmpNoFlow);
    }
    let id = match flows::find(&flow, flow.table_hash()) {
        Some(entry) if entry.backend.flags & BACKEND_F_ALIVE != 0 => entry.id,
        _ => return Err(Reason::PassIcmpNoFlow),
    };
    // The flow's own hash: the same outer source and GUE port as the flow's packets, so the
    // backend receives the error on the same queue.
    super::to_backend(
        ctx,
        mode,
        id,
        inner,
        flow.flow_hash(),
        Reason::IcmpForwarded,
        false,
    )
}

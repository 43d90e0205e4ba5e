//! Bounds-checked header access and the IPv4/IPv6 parsers. Rules (documented in the README):
//! not IP → pass; IP that is not TCP/UDP → pass; fragments → pass (never forwarded);
//! a broken IP header or a cut-short TCP/UDP header → drop.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKeyV4, FlowKeyV6, PROTO_TCP, PROTO_UDP, Reason};
use network_types::{eth::EthHdr, vlan::VlanHdr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// IPv4 "more fragments" flag and fragment offset, in the host-order `frags` field.
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

/// The one accessor for packet bytes: a pointer to a `T` at `offset` if it lies inside the frame.
///
/// `data_end` is read afresh (volatile) for every check: otherwise LLVM may drop a check it can
/// prove from earlier ones (say, an IP length already compared with the frame), which the
/// verifier cannot follow, and the program is rejected.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    // SAFETY: ctx.ctx is the context the kernel passed in; data_end is a plain u32 field.
    let end = unsafe { core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) } as usize;
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(|p| p.cast_mut())
}

/// The IPv4 header with multi-byte fields as integers (network order). network-types declares
/// them as byte arrays (alignment 1), so LLVM reads an address one byte at a time and spills
/// the bytes to the stack; word loads from the packet are fine for the verifier on x86.
#[repr(C)]
pub struct Ipv4Wire {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frags: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

/// The fixed IPv6 header, multi-byte fields as integers (network order), as `Ipv4Wire`.
#[repr(C)]
pub struct Ipv6Wire {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

const IPV6_LEN: usize = 40;

/// Extension headers walked before giving up (the walk is a loop the verifier unrolls).
const MAX_EXT_HEADERS: usize = 4;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// A UDP header.
#[repr(C)]
struct UdpWire {
    src: u16,
    dst: u16,
    len: u16,
    check: u16,
}

/// The fixed TCP header. Read whole through `ptr_at`, so one bounds check covers all of it
/// (a separate length check with a variable size lost the verifier's range).
#[repr(C)]
struct TcpWire {
    src: u16,
    dst: u16,
    seq: u32,
    ack: u32,
    data_offset: u8,
    flags: u8,
    window: u16,
    check: u16,
    urgent: u16,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the balancer needs from a TCP/UDP packet: its flow key (`FlowKeyV4` or `FlowKeyV6`)
/// and, for TCP, its flags (0 for UDP).
pub struct Packet<K> {
    pub flow: K,
    pub tcp_flags: u8,
    /// Where the TCP/UDP header starts (the NAT modes rewrite it).
    pub l4: usize,
}

/// The network layer found after the Ethernet header (and one optional VLAN tag).
pub enum L3 {
    V4(usize),
    V6(usize),
}

/// Ethernet and at most one 802.1Q/802.1ad tag: where the IP header starts, and its family.
#[inline(always)]
pub fn l2(ctx: &XdpContext) -> Result<L3, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassShortL2)?;
    // SAFETY (all reads in this file): each pointer comes from ptr_at, which checked bounds.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q.to_be() || ether_type == ETH_P_8021AD.to_be() {
        let vlan: *const VlanHdr = ptr_at(ctx, l3).ok_or(Reason::PassShortL2)?;
        ether_type = unsafe { (*vlan).ether_type };
        l3 += VlanHdr::LEN;
    }
    if ether_type == ETH_P_IP.to_be() {
        Ok(L3::V4(l3))
    } else if ether_type == ETH_P_IPV6.to_be() {
        Ok(L3::V6(l3))
    } else {
        Err(Reason::PassNotIp)
    }
}

/// An IPv4 TCP/UDP packet, from the Ethernet header on (the benchmark programs use this).
#[allow(
    dead_code,
    reason = "used by the baselines and trafficgen objects, not the balancer"
)]
#[inline(always)]
pub fn parse_ipv4(ctx: &XdpContext) -> Result<Packet<FlowKeyV4>, Reason> {
    match l2(ctx)? {
        L3::V4(l3) => ipv4(ctx, l3),
        L3::V6(_) => Err(Reason::PassNotIp),
    }
}

#[inline(always)]
pub fn ipv4(ctx: &XdpContext, l3: usize) -> Result<Packet<FlowKeyV4>, Reason> {
    let ip: *const Ipv4Wire = ptr_at(ctx, l3).ok_or(Reason::DropMalformedIp)?;
    let vihl = unsafe { (*ip).vihl };
    // Masked so the verifier knows the header length is at most 60 bytes.
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be(unsafe { (*ip).tot_len }) as usize;
    if vihl >> 4 != 4 || ihl < size_of::<Ipv4Wire>() || total_len < ihl {
        return Err(Reason::DropMalformedIp);
    }
    if ctx.data() + l3 + total_len > ctx.data_end() {
        return Err(Reason::DropMalformedIp);
    }
    let proto = unsafe { (*ip).proto };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    if u16::from_be(unsafe { (*ip).frags }) & (IP_MF | IP_OFFSET) != 0 {
        return Err(Reason::PassFragment);
    }
    let l4_at = l3 + ihl;
    let (sport, dport, tcp_flags) = l4(ctx, l4_at, proto, total_len - ihl)?;
    Ok(Packet {
        flow: FlowKeyV4 {
            src: unsafe { (*ip).src },
            dst: unsafe { (*ip).dst },
            sport,
            dport,
            proto,
            _pad0: 0,
            _pad1: 0,
        },
        tcp_flags,
        l4: l4_at,
    })
}

/// IPv6, with a bounded walk over extension headers to the TCP/UDP header. Fragments pass (as
/// for IPv4); ESP and other protocols pass; a chain longer than `MAX_EXT_HEADERS` passes.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, l3: usize) -> Result<Packet<FlowKeyV6>, Reason> {
    let ip: *const Ipv6Wire = ptr_at(ctx, l3).ok_or(Reason::DropMalformedIp)?;
    if u32::from_be(unsafe { (*ip).vtc_flow }) >> 28 != 6 {
        return Err(Reason::DropMalformedIp);
    }
    let payload_len = u16::from_be(unsafe { (*ip).payload_len }) as usize;
    if ctx.data() + l3 + IPV6_LEN + payload_len > ctx.data_end() {
        return Err(Reason::DropMalformedIp);
    }
    let mut next = unsafe { (*ip).next_hdr };
    // Bytes of extension headers walked so far (bounded: at most MAX_EXT_HEADERS of 2 KiB).
    let mut ext = 0usize;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match next {
            PROTO_TCP | PROTO_UDP => break,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                let h: *const [u8; 2] =
                    ptr_at(ctx, l3 + IPV6_LEN + ext).ok_or(Reason::DropMalformedIp)?;
                let (nh, hlen) = unsafe { ((*h)[0], (*h)[1] as usize) };
                next = nh;
                if next == IPPROTO_AH {
                    (hlen + 2) * 4
                } else {
                    (hlen + 1) * 8
                }
            }
            IPPROTO_FRAGMENT => return Err(Reason::PassFragment),
            _ => return Err(Reason::PassNotTcpUdp),
        };
        ext += len;
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    if ext > payload_len {
        return Err(Reason::DropMalformedIp);
    }
    let l4_at = l3 + IPV6_LEN + ext;
    let (sport, dport, tcp_flags) = l4(ctx, l4_at, next, payload_len - ext)?;
    Ok(Packet {
        flow: FlowKeyV6 {
            src: unsafe { (*ip).src },
            dst: unsafe { (*ip).dst },
            sport,
            dport,
            proto: next,
            _pad0: 0,
            _pad1: 0,
        },
        tcp_flags,
        l4: l4_at,
    })
}

/// The upper-layer protocol (TCP or UDP) of an IPv6 fragment: the next header of its fragment
/// header, found by the same bounded walk as `ipv6`. `None` without a fragment header in reach
/// or for another protocol.
#[inline(always)]
pub fn ipv6_fragment_proto(ctx: &XdpContext, l3: usize) -> Option<u8> {
    let ip: *const Ipv6Wire = ptr_at(ctx, l3)?;
    let mut next = unsafe { (*ip).next_hdr };
    let mut ext = 0usize;
    for _ in 0..MAX_EXT_HEADERS {
        let h: *const [u8; 2] = ptr_at(ctx, l3 + IPV6_LEN + ext)?;
        let (nh, hlen) = unsafe { ((*h)[0], (*h)[1] as usize) };
        match next {
            IPPROTO_FRAGMENT => {
                return (nh == PROTO_TCP || nh == PROTO_UDP).then_some(nh);
            }
            IPPROTO_AH => ext += (hlen + 2) * 4,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => ext += (hlen + 1) * 8,
            _ => return None,
        }
        next = nh;
    }
    None
}

/// The ports (and TCP flags) at `l4`; the whole fixed header must lie in the frame and within
/// the `room` the IP header leaves for it.
#[inline(always)]
fn l4(ctx: &XdpContext, l4: usize, proto: u8, room: usize) -> Result<(u16, u16, u8), Reason> {
    if proto == PROTO_TCP {
        let tcp: *const TcpWire = ptr_at(ctx, l4).ok_or(Reason::DropMalformedL4)?;
        if size_of::<TcpWire>() > room {
            return Err(Reason::DropMalformedL4);
        }
        Ok(unsafe { ((*tcp).src, (*tcp).dst, (*tcp).flags) })
    } else {
        let udp: *const UdpWire = ptr_at(ctx, l4).ok_or(Reason::DropMalformedL4)?;
        if size_of::<UdpWire>() > room {
            return Err(Reason::DropMalformedL4);
        }
        Ok(unsafe { ((*udp).src, (*udp).dst, 0) })
    }
}

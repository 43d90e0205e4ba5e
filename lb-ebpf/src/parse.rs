//! Bounds-checked header access and the IPv4 parser. Rules (documented in the README):
//! not IPv4 → pass; IPv4 that is not TCP/UDP → pass; fragments → pass (never forwarded);
//! a broken IPv4 header or a cut-short TCP/UDP header → drop.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKeyV4, PROTO_TCP, PROTO_UDP, Reason};
use network_types::{eth::EthHdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// IPv4 "more fragments" flag and fragment offset, in the host-order `frags` field.
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

/// The one accessor for packet bytes: a pointer to a `T` at `offset` if it lies inside the frame.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
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

/// The first word of a UDP header.
#[repr(C)]
struct PortsWire {
    src: u16,
    dst: u16,
}

/// The start of a TCP header, up to the flags.
#[repr(C)]
struct TcpWire {
    src: u16,
    dst: u16,
    seq: u32,
    ack: u32,
    data_offset: u8,
    flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the balancer needs from an IPv4 TCP/UDP packet.
pub struct PacketV4 {
    pub flow: FlowKeyV4,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
}

#[inline(always)]
pub fn parse_ipv4(ctx: &XdpContext) -> Result<PacketV4, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassShortL2)?;
    // SAFETY (all reads below): each pointer comes from ptr_at, which checked the bounds.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q.to_be() || ether_type == ETH_P_8021AD.to_be() {
        let vlan: *const VlanHdr = ptr_at(ctx, l3).ok_or(Reason::PassShortL2)?;
        ether_type = unsafe { (*vlan).ether_type };
        l3 += VlanHdr::LEN;
    }
    if ether_type != ETH_P_IP.to_be() {
        return Err(Reason::PassNotIpv4);
    }

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

    // The whole fixed L4 header must be in the frame and in the IP datagram.
    let l4 = l3 + ihl;
    let l4_len = if proto == PROTO_TCP {
        TcpHdr::LEN
    } else {
        UdpHdr::LEN
    };
    if ctx.data() + l4 + l4_len > ctx.data_end() {
        return Err(Reason::DropMalformedL4);
    }
    if ihl + l4_len > total_len {
        return Err(Reason::DropMalformedL4);
    }
    let (sport, dport, tcp_flags) = if proto == PROTO_TCP {
        let tcp: *const TcpWire = ptr_at(ctx, l4).ok_or(Reason::DropMalformedL4)?;
        unsafe { ((*tcp).src, (*tcp).dst, (*tcp).flags) }
    } else {
        let udp: *const PortsWire = ptr_at(ctx, l4).ok_or(Reason::DropMalformedL4)?;
        unsafe { ((*udp).src, (*udp).dst, 0) }
    };

    Ok(PacketV4 {
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
    })
}

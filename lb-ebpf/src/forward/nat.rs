//! nat and fullnat: the destination becomes the backend's address and port (`Backend::port`);
//! fullnat also replaces the source with `CONFIG.snat4/snat6` and a port from the SNAT pool.
//! Each flow has a forward entry (`NAT_FLOWS`, keyed by the client's 5-tuple) and a reply entry
//! (`NAT_REPLIES`, keyed by the 5-tuple of the backend's replies), made together when the flow
//! is placed; the backend's replies are translated back to VIP → client. The daemon expires
//! both (closed or idle flows); the program never evicts one in use.
//!
//! The packet is routed by the kernel's FIB after the rewrite (`route`): the backend (or the
//! client, for replies) may be behind the interface the packet came in on or another attached
//! one. Checksums are updated incrementally (RFC 1624), never recomputed over the payload.
//!
//! Verifier limits shape the code: the heavy steps (`commit`, `translate_v4/v6`) are BPF
//! subprograms (`inline(never)`) called one after the other, since inlined into the balancer
//! their IPv6 keys, reply entries and FIB parameters overflowed the 512-byte stack (each call
//! gets a frame of its own on top of the balancer's, 288 + 224 bytes at most today); a new
//! flow's reply key and entry are built in a per-CPU scratch value, not on the stack; and the
//! scheduler is a global function (`select::lb_pick`), verified once.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_csum_diff, maps::HashMap, programs::XdpContext,
};
use lb_common::{
    AF_INET, AF_INET6, BACKEND_F_ALIVE, Backend, CONFIG_F_NAT, DataplaneConfig, FLOW_F_CLOSED,
    FORWARD_FULLNAT, FlowKeyV4, FlowKeyV6, FlowState, NatReplyV4, NatReplyV6, PROTO_TCP, Reason,
    SCHED_SOURCE_HASH, Service,
};

use crate::{
    forward::route::{self, Sent},
    maps::{BACKENDS, CONFIG, NAT_FLOWS, NAT_FLOWS_V6, NAT_REPLIES, NAT_REPLIES_V6, NAT_SCRATCH},
    parse::{Ipv4Wire, Ipv6Wire, Packet, TCP_FIN, TCP_RST, TCP_SYN, ptr_at_mut},
    select::{self, Chosen, FlowKey},
};

/// SNAT ports tried for a new fullnat flow before it is dropped (`DropNatNoPort`). Each try is
/// one map insert; a pool where this many neighbouring ports are taken is full in practice.
const PORT_TRIES: u32 = 16;

/// Offset of the checksum in the TCP and UDP headers.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// What nat needs of an address family: its maps, addresses and reply entries.
pub trait NatFlow: FlowKey + 'static {
    type Addr: Copy;
    type Reply: Copy;
    fn flows() -> &'static HashMap<Self, FlowState>;
    fn replies() -> &'static HashMap<Self, Self::Reply>;
    /// The backend's address, when it is of this family.
    fn backend_addr(backend: &Backend) -> Option<Self::Addr>;
    fn snat(cfg: &DataplaneConfig) -> Self::Addr;
    fn src(&self) -> Self::Addr;
    fn sport(&self) -> u16;
    /// Writes the key of the replies of this client flow from the backend (`addr`, `port`) to
    /// `dst` (the client, or the SNAT address) port `dport`, field by field (a whole struct
    /// would be built on the stack first).
    ///
    /// # Safety
    /// `key` must be valid for writes.
    unsafe fn write_reply_key(
        &self,
        key: *mut Self,
        addr: Self::Addr,
        port: u16,
        dst: Self::Addr,
        dport: u16,
    );
    fn set_dport(&mut self, port: u16);
    /// Writes the reply entry of this client flow, placed on backend `id`, field by field.
    ///
    /// # Safety
    /// `reply` must be valid for writes.
    unsafe fn write_reply(&self, reply: *mut Self::Reply, id: u32, generation: u32, now: u32);
    /// This family's reply key and entry in the scratch value.
    fn scratch(s: *mut NatScratch) -> (*mut Self, *mut Self::Reply);
    /// The reply entry was made for this same client flow.
    fn owns(&self, reply: &Self::Reply) -> bool;
    fn touch(reply: &mut Self::Reply, tcp_flags: u8);
    /// Back to the client: source → VIP, destination → client.
    fn back(reply: &Self::Reply) -> Translation<Self::Addr>;
    fn translate(
        ctx: &XdpContext,
        l3: usize,
        pkt: &Packet<Self>,
        to: &Translation<Self::Addr>,
        reason: Reason,
    ) -> Result<Sent, Reason>;
}

/// Per-CPU room for a new flow's reply key and entry (`NAT_SCRATCH`): built in map memory,
/// they stay off the BPF stack, which the balancer's frames share (512 bytes in all). Never
/// read by userspace.
#[repr(C)]
pub struct NatScratch {
    v4_key: FlowKeyV4,
    v4_reply: NatReplyV4,
    v6_key: FlowKeyV6,
    v6_reply: NatReplyV6,
}

/// Whether packets to no VIP may be NAT replies (some service uses nat or fullnat).
#[inline(always)]
pub fn enabled() -> bool {
    CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_F_NAT != 0)
}

/// A client packet of a nat/fullnat service: its flow found (or placed) and the packet sent to
/// the backend.
#[inline(always)]
pub fn forward<K: NatFlow>(
    ctx: &XdpContext,
    l3: usize,
    pkt: &Packet<K>,
    service: &Service,
) -> Result<(Sent, Chosen), Reason> {
    let now = select::clock();
    let chosen = match select::nat_established(pkt, K::flows(), now) {
        Some(chosen) => chosen,
        None => {
            let (id, hash) = pick(service, pkt)?;
            let nat_port = route::unpack(commit(pkt, service, id, hash))?.action as u16;
            let backend = BACKENDS.get(id).ok_or(Reason::DropInternal)?;
            Chosen {
                id,
                mac: backend.mac,
                service: service.id,
                forward: service.forward,
                placed: true,
                untracked: false,
                nat_port,
            }
        }
    };
    let backend = BACKENDS.get(chosen.id).ok_or(Reason::DropInternal)?;
    let cfg = CONFIG.get(0).ok_or(Reason::DropInternal)?;
    let to = Translation {
        src: if service.forward == FORWARD_FULLNAT {
            K::snat(cfg)
        } else {
            pkt.flow.src()
        },
        dst: K::backend_addr(backend).ok_or(Reason::DropInternal)?,
        sport: if service.forward == FORWARD_FULLNAT {
            chosen.nat_port
        } else {
            pkt.flow.sport()
        },
        dport: backend.port,
    };
    Ok((K::translate(ctx, l3, pkt, &to, Reason::Forwarded)?, chosen))
}

/// A packet to no VIP: if it is a backend's reply in a nat/fullnat flow, translated back (source
/// → VIP, destination → client) and sent to the client; otherwise `PassNotVip`.
#[inline(always)]
pub fn reply<K: NatFlow>(ctx: &XdpContext, l3: usize, pkt: &Packet<K>) -> Result<Sent, Reason> {
    if !enabled() {
        return Err(Reason::PassNotVip);
    }
    let entry = K::replies()
        .get_ptr_mut(pkt.flow)
        .ok_or(Reason::PassNotVip)?;
    // SAFETY: a pointer into the map's value, valid for this run of the program.
    let entry = unsafe { &mut *entry };
    K::touch(entry, pkt.tcp_flags);
    let to = K::back(entry);
    K::translate(ctx, l3, pkt, &to, Reason::NatReply)
}

/// A new flow's backend by the service's scheduler, and the flow's hash.
#[inline(always)]
fn pick<K: NatFlow>(service: &Service, pkt: &Packet<K>) -> Result<(u32, u32), Reason> {
    let hash = pkt.flow.flow_hash();
    let scheduler_hash = if service.scheduler == SCHED_SOURCE_HASH {
        pkt.flow.source_hash()
    } else {
        hash
    };
    Ok((select::pick(service, scheduler_hash)?, hash))
}

/// Places a new flow (or one whose backend went away) on backend `id`: its reply entry (under
/// a free SNAT port for fullnat, searched from `hash`), then its forward entry. Nothing is left
/// behind when a step fails. A subprogram returning a packed result (`route::pack`) whose
/// action is the flow's SNAT port (network order; 0 for nat), not a `Result`: see `Step` in
/// main.rs on the BTF of Rust enums.
#[inline(never)]
fn commit<K: NatFlow>(pkt: &Packet<K>, service: &Service, id: u32, hash: u32) -> i64 {
    route::pack(place(pkt, service, id, hash).map(|nat_port| Sent {
        reason: Reason::Forwarded,
        action: u32::from(nat_port),
    }))
}

/// `commit`'s work: the flow's SNAT port (0 for nat).
#[inline(always)]
fn place<K: NatFlow>(
    pkt: &Packet<K>,
    service: &Service,
    id: u32,
    hash: u32,
) -> Result<u16, Reason> {
    let now = select::clock();
    let backend = BACKENDS.get(id).ok_or(Reason::DropInternal)?;
    if backend.flags & BACKEND_F_ALIVE == 0 {
        return Err(Reason::DropNoBackend);
    }
    let cfg = CONFIG.get(0).ok_or(Reason::DropInternal)?;
    let addr = K::backend_addr(backend).ok_or(Reason::DropInternal)?;
    let flow = &pkt.flow;
    let fullnat = service.forward == FORWARD_FULLNAT;
    let (dst, dport) = if fullnat {
        (K::snat(cfg), 0)
    } else {
        (flow.src(), flow.sport())
    };
    let scratch = NAT_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    let (key, reply) = K::scratch(scratch);
    // SAFETY: this CPU's scratch value, used by nothing else while the program runs.
    let (key, reply) = unsafe {
        flow.write_reply_key(key, addr, backend.port, dst, dport);
        flow.write_reply(reply, id, backend.generation, now);
        (&mut *key, &*reply)
    };
    let nat_port = if fullnat {
        snat_port(key, reply, flow, cfg, hash)?
    } else {
        claim(key, reply, flow)?;
        0
    };
    if select::nat_place(K::flows(), pkt, id, backend.generation, now, nat_port).is_err() {
        let _ = K::replies().remove(key);
        return Err(Reason::DropNatNoPort);
    }
    Ok(nat_port)
}

/// Takes the first free SNAT port from a hash-derived place in the pool
/// (`CONFIG.snat_port_min..=snat_port_max`, host order), trying at most `PORT_TRIES` ports.
/// Returns it in network order, with the reply entry inserted under it.
#[inline(always)]
fn snat_port<K: NatFlow>(
    key: &mut K,
    reply: &K::Reply,
    flow: &K,
    cfg: &DataplaneConfig,
    start: u32,
) -> Result<u16, Reason> {
    let (min, max) = (u32::from(cfg.snat_port_min), u32::from(cfg.snat_port_max));
    if min == 0 || max < min {
        return Err(Reason::DropNatNoPort);
    }
    let pool = max - min + 1;
    let start = start.checked_rem(pool).ok_or(Reason::DropNatNoPort)?;
    for i in 0..PORT_TRIES {
        if i >= pool {
            break;
        }
        // start < pool and i < pool: one subtraction wraps around the pool (no division,
        // whose zero check the verifier would meet as a call to a panic).
        let mut offset = start + i;
        if offset >= pool {
            offset -= pool;
        }
        let port = ((min + offset) as u16).to_be();
        key.set_dport(port);
        if claim(key, reply, flow).is_ok() {
            return Ok(port);
        }
    }
    Err(Reason::DropNatNoPort)
}

/// Inserts a reply entry without taking another flow's: `BPF_NOEXIST`, or over an entry this
/// same client flow left (an earlier placement, or another CPU placing the flow right now).
#[inline(always)]
fn claim<K: NatFlow>(key: &K, reply: &K::Reply, flow: &K) -> Result<(), Reason> {
    let replies = K::replies();
    if replies.insert(key, reply, u64::from(BPF_NOEXIST)).is_ok() {
        return Ok(());
    }
    match replies.get_ptr(key) {
        // SAFETY: a pointer into the map's value, read at once.
        Some(old) if flow.owns(unsafe { &*old }) => replies
            .insert(key, reply, 0)
            .map_err(|_| Reason::DropNatNoPort),
        _ => Err(Reason::DropNatNoPort),
    }
}

/// A reply entry's last-seen tick and closed flag (FIN or RST; a SYN reopens the 5-tuple).
#[inline(always)]
fn touch_state(last_seen: &mut u32, flags: &mut u16, tcp_flags: u8) {
    let now = select::clock();
    if *last_seen != now {
        *last_seen = now;
    }
    let closed = *flags & FLOW_F_CLOSED != 0;
    if !closed && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        *flags |= FLOW_F_CLOSED;
    } else if closed && tcp_flags & TCP_SYN != 0 {
        *flags &= !FLOW_F_CLOSED;
    }
}

/// The addresses and ports a packet leaves with (network order). `src` and `dst` are adjacent,
/// as in the IP headers, so one `bpf_csum_diff` covers both IPv6 addresses.
#[repr(C)]
pub struct Translation<A> {
    src: A,
    dst: A,
    sport: u16,
    dport: u16,
}

/// Rewrites an IPv4 packet to `to` and sends it along the kernel's route to its new
/// destination, counted as `reason`.
#[inline(never)]
fn translate_v4(
    ctx: &XdpContext,
    l3: usize,
    pkt: &Packet<FlowKeyV4>,
    to: &Translation<u32>,
    reason: Reason,
) -> Result<Sent, Reason> {
    let ip: *mut Ipv4Wire = ptr_at_mut(ctx, l3).ok_or(Reason::DropInternal)?;
    // Forwarded as a router forwards: the TTL goes down by one, and a packet whose TTL runs
    // out goes to the kernel, which answers "time exceeded".
    // SAFETY (packet reads and writes here): bounds checked by ptr_at_mut.
    let (ttl, proto) = unsafe { ((*ip).ttl, (*ip).proto) };
    if ttl <= 1 {
        return Ok(route::to_kernel());
    }
    let mut header = Delta::default();
    header.word16(
        u16::from_ne_bytes([ttl, proto]),
        u16::from_ne_bytes([ttl - 1, proto]),
    );
    let mut addrs = Delta::default();
    addrs.word32(pkt.flow.src, to.src);
    addrs.word32(pkt.flow.dst, to.dst);
    header.0 += addrs.0;
    let tot_len = unsafe {
        (*ip).ttl = ttl - 1;
        (*ip).check = header.apply((*ip).check);
        (*ip).src = to.src;
        (*ip).dst = to.dst;
        u16::from_be((*ip).tot_len)
    };
    rewrite_l4(ctx, pkt.l4, pkt.flow.proto, addrs, to.sport, to.dport, true)?;
    let route = route::lookup_v4(ctx, to.src, to.dst, tot_len)?;
    route::send(ctx, route, reason)
}

/// `translate_v4` for IPv6.
#[inline(never)]
fn translate_v6(
    ctx: &XdpContext,
    l3: usize,
    pkt: &Packet<FlowKeyV6>,
    to: &Translation<[u32; 4]>,
    reason: Reason,
) -> Result<Sent, Reason> {
    let ip: *mut Ipv6Wire = ptr_at_mut(ctx, l3).ok_or(Reason::DropInternal)?;
    // The eight address words in one helper call: summed by hand they spilled most of the
    // registers and took over 100 bytes of stack.
    // SAFETY: both pointers cover 32 bytes (`src` then `dst`, in the header as in `to`);
    // the helper only reads them.
    let diff = unsafe {
        bpf_csum_diff(
            (&raw mut (*ip).src).cast(),
            32,
            core::ptr::from_ref(to).cast_mut().cast(),
            32,
            0,
        )
    };
    if diff < 0 {
        return Err(Reason::DropInternal);
    }
    let addrs = Delta(diff as u64 & 0xffff_ffff);
    // SAFETY: bounds checked by ptr_at_mut. The hop limit as in translate_v4 (no header
    // checksum in IPv6).
    let hop_limit = unsafe { (*ip).hop_limit };
    if hop_limit <= 1 {
        return Ok(route::to_kernel());
    }
    let payload_len = unsafe {
        (*ip).hop_limit = hop_limit - 1;
        (*ip).src = to.src;
        (*ip).dst = to.dst;
        u16::from_be((*ip).payload_len)
    };
    rewrite_l4(
        ctx,
        pkt.l4,
        pkt.flow.proto,
        addrs,
        to.sport,
        to.dport,
        false,
    )?;
    let tot_len = payload_len.saturating_add(size_of::<Ipv6Wire>() as u16);
    let route = route::lookup_v6(ctx, &to.src, &to.dst, tot_len)?;
    route::send(ctx, route, reason)
}

/// Writes the ports and updates the TCP/UDP checksum for them and for the addresses in the
/// pseudo-header (`addrs`). An IPv4 UDP checksum of 0 means "none" and stays 0; a computed 0
/// is sent as 0xffff (RFC 768).
#[inline(always)]
fn rewrite_l4(
    ctx: &XdpContext,
    l4: usize,
    proto: u8,
    mut delta: Delta,
    sport: u16,
    dport: u16,
    ipv4: bool,
) -> Result<(), Reason> {
    let ports: *mut [u16; 2] = ptr_at_mut(ctx, l4).ok_or(Reason::DropInternal)?;
    let tcp = proto == PROTO_TCP;
    let check: *mut u16 = ptr_at_mut(ctx, l4 + if tcp { TCP_CHECK } else { UDP_CHECK })
        .ok_or(Reason::DropInternal)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        delta.word16((*ports)[0], sport);
        delta.word16((*ports)[1], dport);
        (*ports)[0] = sport;
        (*ports)[1] = dport;
        let old = *check;
        if tcp {
            *check = delta.apply(old);
        } else if !(ipv4 && old == 0) {
            let new = delta.apply(old);
            *check = if new == 0 { 0xffff } else { new };
        }
    }
    Ok(())
}

/// The changes to a checksummed region, as a ones' complement sum (RFC 1624, eqn. 3:
/// HC' = ~(~HC + ~m + m')). Words are taken in memory order, as loaded from the packet: the
/// ones' complement sum commutes with byte swapping, so no conversion is needed.
#[derive(Clone, Copy, Default)]
struct Delta(u64);

impl Delta {
    #[inline(always)]
    fn word32(&mut self, old: u32, new: u32) {
        let old = !old;
        self.0 += u64::from(old & 0xffff)
            + u64::from(old >> 16)
            + u64::from(new & 0xffff)
            + u64::from(new >> 16);
    }

    #[inline(always)]
    fn word16(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    #[inline(always)]
    fn apply(self, check: u16) -> u16 {
        let mut sum = u64::from(!check) + self.0;
        // A few dozen 16-bit words (or 32-bit partial sums) were added: three folds bring
        // any such sum into 16 bits.
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

/// The `NatFlow` methods whose code is the same for both families (the keys and reply entries
/// have the same field names; only the address type differs).
macro_rules! same_fields {
    ($addr:ty, $reply:ty) => {
        #[inline(always)]
        fn src(&self) -> $addr {
            self.src
        }
        #[inline(always)]
        fn sport(&self) -> u16 {
            self.sport
        }
        #[inline(always)]
        unsafe fn write_reply_key(
            &self,
            key: *mut Self,
            addr: $addr,
            port: u16,
            dst: $addr,
            dport: u16,
        ) {
            // SAFETY: the caller's promise.
            unsafe {
                (*key).src = addr;
                (*key).dst = dst;
                (*key).sport = port;
                (*key).dport = dport;
                (*key).proto = self.proto;
                (*key)._pad0 = 0;
                (*key)._pad1 = 0;
            }
        }
        #[inline(always)]
        fn set_dport(&mut self, port: u16) {
            self.dport = port;
        }
        #[inline(always)]
        unsafe fn write_reply(&self, r: *mut $reply, id: u32, generation: u32, now: u32) {
            // SAFETY: the caller's promise.
            unsafe {
                (*r).client = self.src;
                (*r).vip = self.dst;
                (*r).client_port = self.sport;
                (*r).vip_port = self.dport;
                (*r).backend = id;
                (*r).generation = generation;
                (*r).last_seen = now;
                (*r).flags = 0;
                (*r)._pad = 0;
            }
        }
        #[inline(always)]
        fn owns(&self, r: &$reply) -> bool {
            r.client == self.src
                && r.vip == self.dst
                && r.client_port == self.sport
                && r.vip_port == self.dport
        }
        #[inline(always)]
        fn touch(r: &mut $reply, tcp_flags: u8) {
            touch_state(&mut r.last_seen, &mut r.flags, tcp_flags);
        }
        #[inline(always)]
        fn back(r: &$reply) -> Translation<$addr> {
            Translation {
                src: r.vip,
                dst: r.client,
                sport: r.vip_port,
                dport: r.client_port,
            }
        }
    };
}

impl NatFlow for FlowKeyV4 {
    type Addr = u32;
    type Reply = NatReplyV4;
    same_fields!(u32, NatReplyV4);
    #[inline(always)]
    fn flows() -> &'static HashMap<Self, FlowState> {
        &NAT_FLOWS
    }
    #[inline(always)]
    fn replies() -> &'static HashMap<Self, NatReplyV4> {
        &NAT_REPLIES
    }
    #[inline(always)]
    fn backend_addr(backend: &Backend) -> Option<u32> {
        let a = &backend.addr;
        (backend.family == AF_INET).then(|| u32::from_ne_bytes([a[0], a[1], a[2], a[3]]))
    }
    #[inline(always)]
    fn snat(cfg: &DataplaneConfig) -> u32 {
        cfg.snat4
    }
    #[inline(always)]
    fn scratch(s: *mut NatScratch) -> (*mut Self, *mut NatReplyV4) {
        // SAFETY: field addresses of a valid pointer, nothing read.
        unsafe { (&raw mut (*s).v4_key, &raw mut (*s).v4_reply) }
    }
    #[inline(always)]
    fn translate(
        ctx: &XdpContext,
        l3: usize,
        pkt: &Packet<Self>,
        to: &Translation<u32>,
        reason: Reason,
    ) -> Result<Sent, Reason> {
        translate_v4(ctx, l3, pkt, to, reason)
    }
}

impl NatFlow for FlowKeyV6 {
    type Addr = [u32; 4];
    type Reply = NatReplyV6;
    same_fields!([u32; 4], NatReplyV6);
    #[inline(always)]
    fn flows() -> &'static HashMap<Self, FlowState> {
        &NAT_FLOWS_V6
    }
    #[inline(always)]
    fn replies() -> &'static HashMap<Self, NatReplyV6> {
        &NAT_REPLIES_V6
    }
    #[inline(always)]
    fn backend_addr(backend: &Backend) -> Option<[u32; 4]> {
        let a = &backend.addr;
        let word = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        (backend.family == AF_INET6).then(|| [word(0), word(4), word(8), word(12)])
    }
    #[inline(always)]
    fn snat(cfg: &DataplaneConfig) -> [u32; 4] {
        cfg.snat6
    }
    #[inline(always)]
    fn scratch(s: *mut NatScratch) -> (*mut Self, *mut NatReplyV6) {
        // SAFETY: as above.
        unsafe { (&raw mut (*s).v6_key, &raw mut (*s).v6_reply) }
    }
    #[inline(always)]
    fn translate(
        ctx: &XdpContext,
        l3: usize,
        pkt: &Packet<Self>,
        to: &Translation<[u32; 4]>,
        reason: Reason,
    ) -> Result<Sent, Reason> {
        translate_v6(ctx, l3, pkt, to, reason)
    }
}

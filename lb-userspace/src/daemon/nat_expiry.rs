//! Expiry of nat/fullnat state. The program never deletes a NAT entry (an entry still in use
//! must not vanish, so the maps are not LRU); the daemon sweeps them every few seconds.
//!
//! A forward entry (client 5-tuple) and the reply entry made with it (backend's 5-tuple) form a
//! pair: the reply names the client and VIP, so the forward key is rebuilt from it, and it is
//! that flow's own reply when it names the same backend id and generation and the port the flow
//! uses (the SNAT port for fullnat, the client's port for nat). A pair is idle since the later
//! of its two last-seen ticks, and goes as a whole:
//! - closed (a FIN or RST seen either way) and idle `CLOSED_IDLE` ticks (~10 s),
//! - otherwise idle `TCP_IDLE` (~300 s) or `UDP_IDLE` (~30 s).
//!
//! A reply entry that pairs with no forward entry (the flow was placed again on another
//! backend, or its forward entry is gone) goes once idle `CLOSED_IDLE`; a forward entry
//! without its reply goes by the pair rules on its own tick.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use lb_common::{
    FLOW_F_CLOSED, FlowKeyV4, FlowKeyV6, FlowState, NatReplyV4, NatReplyV6, PROTO_TCP,
};

/// Ticks (`FLOW_TICK_SHIFT`, ~1.07 s) a closed flow is kept: late retransmissions and the final
/// ACK still find it.
pub const CLOSED_IDLE: u32 = 10;
/// Ticks an open TCP flow may be idle (~300 s).
pub const TCP_IDLE: u32 = 280;
/// Ticks a UDP flow may be idle (~30 s).
pub const UDP_IDLE: u32 = 28;

/// What pairing and expiry need from a reply entry.
#[derive(Clone, Copy, Debug)]
pub struct ReplyMeta {
    pub backend: u32,
    pub generation: u32,
    pub last_seen: u32,
    pub flags: u16,
    pub client_port: u16,
}

/// A NAT map key of one address family, with the reply entry type of that family.
pub trait NatKey: Copy + Eq + Hash + std::fmt::Debug {
    type Reply: Copy + PartialEq + std::fmt::Debug;
    fn proto(&self) -> u8;
    /// The destination port (network order): in a reply key, the port the client flow uses.
    fn dport(&self) -> u16;
    /// The client's 5-tuple (forward key) the reply entry under this key translates back to.
    fn forward_of(&self, reply: &Self::Reply) -> Self;
    fn meta(reply: &Self::Reply) -> ReplyMeta;
}

/// `NatKey` for a family's key and reply types, whose fields have the same names.
macro_rules! nat_key {
    ($key:ident, $reply:ident) => {
        impl NatKey for $key {
            type Reply = $reply;
            fn proto(&self) -> u8 {
                self.proto
            }
            fn dport(&self) -> u16 {
                self.dport
            }
            fn forward_of(&self, r: &$reply) -> Self {
                $key {
                    src: r.client,
                    dst: r.vip,
                    sport: r.client_port,
                    dport: r.vip_port,
                    proto: self.proto,
                    _pad0: 0,
                    _pad1: 0,
                }
            }
            fn meta(r: &$reply) -> ReplyMeta {
                ReplyMeta {
                    backend: r.backend,
                    generation: r.generation,
                    last_seen: r.last_seen,
                    flags: r.flags,
                    client_port: r.client_port,
                }
            }
        }
    };
}

nat_key!(FlowKeyV4, NatReplyV4);
nat_key!(FlowKeyV6, NatReplyV6);

/// The entries to delete from the forward and reply maps of one family, with the values they
/// had when read (an entry the program rewrote since is left alone).
#[derive(Debug)]
pub struct Expired<K: NatKey> {
    pub flows: Vec<(K, FlowState)>,
    pub replies: Vec<(K, K::Reply)>,
}

impl<K: NatKey> Expired<K> {
    pub fn flow_keys(&self) -> Vec<K> {
        self.flows.iter().map(|(k, _)| *k).collect()
    }
    pub fn reply_keys(&self) -> Vec<K> {
        self.replies.iter().map(|(k, _)| *k).collect()
    }
}

/// Ticks a flow may be idle before it goes.
fn limit(proto: u8, closed: bool) -> u32 {
    if closed {
        CLOSED_IDLE
    } else if proto == PROTO_TCP {
        TCP_IDLE
    } else {
        UDP_IDLE
    }
}

/// The entries of one family's NAT maps that expire at tick `now`.
pub fn expired<K: NatKey>(
    flows: &[(K, FlowState)],
    replies: &[(K, K::Reply)],
    now: u32,
) -> Expired<K> {
    let by_key: HashMap<K, FlowState> = flows.iter().copied().collect();
    let mut paired = HashSet::new();
    let mut out = Expired {
        flows: Vec::new(),
        replies: Vec::new(),
    };
    for (key, reply) in replies {
        let r = K::meta(reply);
        let forward = key.forward_of(reply);
        let own = by_key.get(&forward).filter(|f| {
            let port = if f.nat_port != 0 {
                f.nat_port
            } else {
                r.client_port
            };
            f.backend == r.backend && f.generation == r.generation && key.dport() == port
        });
        match own {
            Some(f) => {
                paired.insert(forward);
                let idle = now.saturating_sub(f.last_seen.max(r.last_seen));
                let closed = (f.flags | r.flags) & FLOW_F_CLOSED != 0;
                if idle >= limit(key.proto(), closed) {
                    out.flows.push((forward, *f));
                    out.replies.push((*key, *reply));
                }
            }
            None => {
                if now.saturating_sub(r.last_seen) >= CLOSED_IDLE {
                    out.replies.push((*key, *reply));
                }
            }
        }
    }
    for (key, f) in flows {
        if paired.contains(key) {
            continue;
        }
        let closed = f.flags & FLOW_F_CLOSED != 0;
        if now.saturating_sub(f.last_seen) >= limit(key.proto(), closed) {
            out.flows.push((*key, *f));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use lb_common::PROTO_UDP;

    use super::*;

    const CLIENT: u32 = 0x0100_000a;
    const VIP: u32 = 0x0a00_c80a;
    const BACKEND: u32 = 0x0b00_620a;
    const SNAT: u32 = 0x0200_620a;

    fn forward(proto: u8, sport: u16) -> FlowKeyV4 {
        FlowKeyV4 {
            src: CLIENT,
            dst: VIP,
            sport,
            dport: 80,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    fn state(last_seen: u32, flags: u16, nat_port: u16) -> FlowState {
        FlowState {
            backend: 3,
            generation: 1,
            last_seen,
            flags,
            nat_port,
        }
    }

    /// The reply entry of `forward(proto, sport)`: nat (`nat_port` 0) or fullnat.
    fn reply(
        proto: u8,
        sport: u16,
        nat_port: u16,
        last_seen: u32,
        flags: u16,
    ) -> (FlowKeyV4, NatReplyV4) {
        let fullnat = nat_port != 0;
        (
            FlowKeyV4 {
                src: BACKEND,
                dst: if fullnat { SNAT } else { CLIENT },
                sport: 8080,
                dport: if fullnat { nat_port } else { sport },
                proto,
                _pad0: 0,
                _pad1: 0,
            },
            NatReplyV4 {
                client: CLIENT,
                vip: VIP,
                client_port: sport,
                vip_port: 80,
                backend: 3,
                generation: 1,
                last_seen,
                flags,
                _pad: 0,
            },
        )
    }

    #[test]
    fn an_active_pair_stays_and_an_idle_one_goes_whole() {
        for nat_port in [0, 40000] {
            let flows = [(forward(PROTO_TCP, 1000), state(100, 0, nat_port))];
            let replies = [reply(PROTO_TCP, 1000, nat_port, 100, 0)];
            let none = expired(&flows, &replies, 100 + TCP_IDLE - 1);
            assert!(none.flows.is_empty() && none.replies.is_empty());
            let all = expired(&flows, &replies, 100 + TCP_IDLE);
            assert_eq!(all.flows, flows);
            assert_eq!(all.replies, replies);
        }
    }

    #[test]
    fn udp_idles_out_sooner_than_tcp() {
        let flows = [(forward(PROTO_UDP, 1000), state(100, 0, 0))];
        let replies = [reply(PROTO_UDP, 1000, 0, 100, 0)];
        assert!(
            expired(&flows, &replies, 100 + UDP_IDLE - 1)
                .flows
                .is_empty()
        );
        assert_eq!(expired(&flows, &replies, 100 + UDP_IDLE).flows.len(), 1);
    }

    #[test]
    fn a_closed_pair_goes_after_the_short_timeout_whichever_side_closed() {
        for (fwd_flags, reply_flags) in [(FLOW_F_CLOSED, 0), (0, FLOW_F_CLOSED)] {
            let flows = [(forward(PROTO_TCP, 1000), state(100, fwd_flags, 0))];
            let replies = [reply(PROTO_TCP, 1000, 0, 100, reply_flags)];
            assert!(
                expired(&flows, &replies, 100 + CLOSED_IDLE - 1)
                    .flows
                    .is_empty()
            );
            let gone = expired(&flows, &replies, 100 + CLOSED_IDLE);
            assert_eq!((gone.flows.len(), gone.replies.len()), (1, 1));
        }
    }

    #[test]
    fn a_pair_is_idle_from_its_later_side() {
        // The client went quiet but the backend still sends (a download, a half-closed flow).
        let flows = [(forward(PROTO_TCP, 1000), state(100, FLOW_F_CLOSED, 0))];
        let replies = [reply(PROTO_TCP, 1000, 0, 500, 0)];
        assert!(expired(&flows, &replies, 505).flows.is_empty());
        assert_eq!(expired(&flows, &replies, 510).flows.len(), 1);
    }

    #[test]
    fn a_reply_of_a_replaced_flow_goes_once_idle_and_the_flow_stays() {
        // The flow moved to backend 4; the old reply (backend 3) pairs with nothing.
        let mut moved = state(100, 0, 0);
        moved.backend = 4;
        let flows = [(forward(PROTO_TCP, 1000), moved)];
        let replies = [reply(PROTO_TCP, 1000, 0, 90, 0)];
        assert!(expired(&flows, &replies, 99).replies.is_empty());
        let gone = expired(&flows, &replies, 100);
        assert_eq!(gone.reply_keys(), vec![replies[0].0]);
        assert!(gone.flows.is_empty(), "the forward entry is still in use");
        // Another generation of the same id, or another SNAT port, is not the flow's either.
        let mut regen = state(100, 0, 0);
        regen.generation = 2;
        assert_eq!(
            expired(&[(flows[0].0, regen)], &replies, 100).replies.len(),
            1
        );
        let other_port = [(forward(PROTO_TCP, 1000), state(100, 0, 40001))];
        let fullnat_reply = [reply(PROTO_TCP, 1000, 40000, 90, 0)];
        assert_eq!(expired(&other_port, &fullnat_reply, 100).replies.len(), 1);
    }

    #[test]
    fn a_reply_without_a_forward_entry_goes_and_a_forward_without_a_reply_idles_out() {
        let replies = [reply(PROTO_UDP, 1000, 0, 100, 0)];
        assert_eq!(expired(&[], &replies, 100 + CLOSED_IDLE).replies.len(), 1);
        let flows = [(forward(PROTO_UDP, 1000), state(100, 0, 0))];
        assert!(expired(&flows, &[], 100 + UDP_IDLE - 1).flows.is_empty());
        assert_eq!(expired(&flows, &[], 100 + UDP_IDLE).flows.len(), 1);
    }

    #[test]
    fn a_clock_behind_the_entries_expires_nothing() {
        let flows = [(forward(PROTO_TCP, 1000), state(100, FLOW_F_CLOSED, 0))];
        let replies = [reply(PROTO_TCP, 1000, 0, 100, FLOW_F_CLOSED)];
        let none = expired(&flows, &replies, 50);
        assert!(none.flows.is_empty() && none.replies.is_empty());
    }
}

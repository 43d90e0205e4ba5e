//! The flow hash: MurmurHash3 (x86, 32-bit) over whole 32-bit words.
//!
//! Fixed seed, no per-boot randomness: every balancer given the same backends maps a flow to the
//! same ring entry, so a flow that ECMP moves to another balancer keeps its backend. The same
//! code runs in the XDP program and in userspace (tests, `which backend gets this flow`).

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// The seed of the flow hash. Changing it moves every flow that has no connection-table entry.
pub const FLOW_SEED: u32 = 0x4c42_5846; // "LBXF"

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(h: u32, len_bytes: u32) -> u32 {
    let mut h = h ^ len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3 of a sequence of 32-bit words with `seed`.
#[inline(always)]
pub fn murmur3_words(seed: u32, words: &[u32]) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < words.len() {
        h = mix(h, words[i]);
        i += 1;
    }
    finish(h, (words.len() * 4) as u32)
}

/// The VIP filter's bit (below `VIP_FILTER_BITS`) of an IPv4 service key: the address, port and
/// protocol as stored in the key. Two multiplications, not
/// MurmurHash: it runs on every packet, and a collision only costs a map lookup.
#[inline(always)]
pub const fn vip_filter_bit(addr: u32, port: u16, proto: u8) -> u32 {
    let h = addr.wrapping_mul(0x9e37_79b1) ^ ((port as u32) << 8) ^ (proto as u32);
    h.wrapping_mul(0x85eb_ca6b) >> 16
}

/// `vip_filter_bit` of an IPv6 service key (its address folded into a word).
#[inline(always)]
pub const fn vip_filter_bit_v6(addr: &[u32; 4], port: u16, proto: u8) -> u32 {
    vip_filter_bit(addr[0] ^ addr[1] ^ addr[2] ^ addr[3], port, proto)
}

/// Hash of an IPv4 5-tuple. Addresses and ports are raw network-order words as read from the
/// packet (see the crate docs on byte order).
#[inline(always)]
pub fn flow_hash_v4(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let ports = (sport as u32) | ((dport as u32) << 16);
    let h = mix(mix(mix(mix(FLOW_SEED, src), dst), ports), proto as u32);
    finish(h, 16)
}

/// Hash of an IPv6 5-tuple (addresses as four raw words each, like the ports).
#[inline(always)]
pub fn flow_hash_v6(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let ports = (sport as u32) | ((dport as u32) << 16);
    let mut h = FLOW_SEED;
    let mut i = 0;
    while i < 4 {
        h = mix(h, src[i]);
        i += 1;
    }
    i = 0;
    while i < 4 {
        h = mix(h, dst[i]);
        i += 1;
    }
    h = mix(mix(h, ports), proto as u32);
    finish(h, 40)
}

/// Odd constants of `table_hash_*` (random, fixed: every build places a flow in the same set).
/// Public for tests that build flows of equal table hash.
pub const TABLE_K: [u32; 10] = [
    0x9e37_79b1,
    0x85eb_ca6b,
    0xc2b2_ae35,
    0x27d4_eb2f,
    0x1656_67b1,
    0xd3a2_646d,
    0xfd70_46c5,
    0xb55a_4f09,
    0x8cb9_2ba7,
    0x6a09_e667,
];

/// Mixes the sum of the multilinear step so the low bits (the set) depend on every input bit.
#[inline(always)]
const fn table_finish(h: u32) -> u32 {
    let h = (h ^ (h >> 15)).wrapping_mul(0x2c1b_3c6d);
    h ^ (h >> 12)
}

/// The connection table's hash of an IPv4 5-tuple (the set and the seal of its way): a sum of
/// each word times its own odd constant, then a short finaliser. Not the flow hash: this one
/// runs on every established packet, and its multiplications are independent of each other, so
/// the set's address (a cache miss on large tables) is known a few dozen cycles after the
/// parse instead of after MurmurHash's chain of dependent steps.
#[inline(always)]
pub const fn table_hash_v4(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let ports = (sport as u32) | ((dport as u32) << 16);
    table_finish(
        src.wrapping_mul(TABLE_K[0])
            .wrapping_add(dst.wrapping_mul(TABLE_K[1]))
            .wrapping_add(ports.wrapping_mul(TABLE_K[2]))
            .wrapping_add((proto as u32).wrapping_mul(TABLE_K[3])),
    )
}

/// `table_hash_v4` of an IPv6 5-tuple.
#[inline(always)]
pub const fn table_hash_v6(
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
) -> u32 {
    let ports = (sport as u32) | ((dport as u32) << 16);
    let mut h = ports
        .wrapping_mul(TABLE_K[8])
        .wrapping_add((proto as u32).wrapping_mul(TABLE_K[9]));
    let mut i = 0;
    while i < 4 {
        h = h
            .wrapping_add(src[i].wrapping_mul(TABLE_K[i]))
            .wrapping_add(dst[i].wrapping_mul(TABLE_K[4 + i]));
        i += 1;
    }
    table_finish(h)
}

/// Hash of a client address alone (source-hash scheduling): the address's words.
#[inline(always)]
pub fn source_hash(words: &[u32]) -> u32 {
    murmur3_words(FLOW_SEED, words)
}

/// The UDP source port of a GUE packet for a flow of hash `hash` (host order): in the dynamic
/// range 49152-65535, so a flow always has the same port and flows spread over the backends'
/// receive queues.
#[inline(always)]
pub const fn gue_source_port(hash: u32) -> u16 {
    0xc000 | ((hash ^ (hash >> 16)) & 0x3fff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_filter_bits_spread_services() {
        // 500 VIPs with two ports each, as a large balancer has: few share a bit.
        let mut bits = [0u32; 1000];
        for vip in 0..500u32 {
            for (p, port) in [80u16, 443].into_iter().enumerate() {
                let addr = u32::from_ne_bytes((0x0ac8_0000 + vip).to_be_bytes());
                bits[(2 * vip) as usize + p] = vip_filter_bit(addr, port.to_be(), 6);
            }
        }
        bits.sort_unstable();
        let distinct = 1 + bits.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(distinct >= 990, "{distinct} distinct bits of 1000");
        assert!(bits.iter().all(|&b| b < crate::VIP_FILTER_BITS));
    }

    #[test]
    fn flow_hash_is_murmur3_of_the_tuple_words() {
        let (src, dst, sport, dport) = (0x0100_000a, 0x6400_000a, 0x3930, 0x5000);
        let ports = (sport as u32) | ((dport as u32) << 16);
        assert_eq!(
            flow_hash_v4(src, dst, sport, dport, 6),
            murmur3_words(FLOW_SEED, &[src, dst, ports, 6])
        );
    }

    #[test]
    fn murmur3_matches_reference_vectors() {
        // Reference values of MurmurHash3_x86_32 for 4-byte little-endian keys.
        assert_eq!(murmur3_words(0, &[0]), 0x2362_f9de);
        assert_eq!(murmur3_words(0x9747_b28c, &[0x6161_6161]), 0x5a97_808a); // "aaaa"
    }

    #[test]
    fn flow_hash_v6_is_murmur3_of_the_tuple_words() {
        let (src, dst) = ([1, 2, 3, 4], [5, 6, 7, 8]);
        let ports = 0x5000_3930;
        assert_eq!(
            flow_hash_v6(&src, &dst, 0x3930, 0x5000, 6),
            murmur3_words(FLOW_SEED, &[1, 2, 3, 4, 5, 6, 7, 8, ports, 6])
        );
    }

    #[test]
    fn table_hash_spreads_sequential_flows_over_the_sets() {
        // Clients counting up addresses and ports, as a load test does: the low bits (the set)
        // of 2^16 flows over 2^12 sets hold about 16 each.
        for v6 in [false, true] {
            let mut sets = [0u32; 1 << 12];
            for i in 0..1u32 << 16 {
                let (src, sport) = (0x0a00_0000 + (i >> 8), (1024 + (i & 0xff)) as u16);
                let h = if v6 {
                    table_hash_v6(
                        &[0x20010db8, 0, 0, src],
                        &[0x20010db8, 0, 0, 1],
                        sport,
                        80,
                        6,
                    )
                } else {
                    table_hash_v4(src.to_be(), 0x0100_c80a, sport.to_be(), 80u16.to_be(), 6)
                };
                sets[(h & 0xfff) as usize] += 1;
            }
            let max = *sets.iter().max().unwrap();
            let empty = sets.iter().filter(|n| **n == 0).count();
            assert!(
                max <= 40 && empty < 4,
                "v6 {v6}: fullest set {max}, {empty} empty"
            );
        }
    }

    #[test]
    fn both_hashes_depend_on_every_field() {
        type V4 = fn(u32, u32, u16, u16, u8) -> u32;
        type V6 = fn(&[u32; 4], &[u32; 4], u16, u16, u8) -> u32;
        for hash in [flow_hash_v4 as V4, table_hash_v4] {
            let base = hash(1, 2, 3, 4, 6);
            assert_ne!(base, hash(9, 2, 3, 4, 6));
            assert_ne!(base, hash(1, 9, 3, 4, 6));
            assert_ne!(base, hash(1, 2, 9, 4, 6));
            assert_ne!(base, hash(1, 2, 3, 9, 6));
            assert_ne!(base, hash(1, 2, 3, 4, 17));
        }
        let (s, d) = ([1, 2, 3, 4], [5, 6, 7, 8]);
        for hash in [flow_hash_v6 as V6, table_hash_v6] {
            let base = hash(&s, &d, 1, 2, 6);
            for i in 0..4 {
                let mut s2 = s;
                s2[i] ^= 1;
                assert_ne!(base, hash(&s2, &d, 1, 2, 6));
                let mut d2 = d;
                d2[i] ^= 1;
                assert_ne!(base, hash(&s, &d2, 1, 2, 6));
            }
            assert_ne!(base, hash(&s, &d, 9, 2, 6));
            assert_ne!(base, hash(&s, &d, 1, 2, 17));
        }
    }
}

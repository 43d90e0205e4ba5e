//! What each scheduler puts in a service's ring table (pure functions, unit-tested).
//!
//! maglev, source-hash and least-conn fill the ring with the Maglev table (source-hash indexes
//! it with a hash of the client address; least-conn keeps it only as the table in force when
//! its candidate list is empty). round-robin fills it with a smooth weighted round-robin
//! sequence that each CPU walks with its own cursor.

use std::net::IpAddr;

use lb_common::{BACKEND_NONE, LC_MAX_BACKENDS, LcList, RING_SIZE};

use crate::{
    api::Scheduler,
    maglev::{self, MaglevBackend},
};

/// A backend in the table: its address (Maglev's identity), id (what the ring holds), weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub ip: IpAddr,
    pub id: u32,
    pub weight: u32,
}

/// The ring table of `RING_SIZE` backend ids for `members` under `scheduler`.
pub fn ring(scheduler: Scheduler, members: &[Member], port: u16) -> Result<Vec<u32>, String> {
    if members.is_empty() {
        return Ok(vec![BACKEND_NONE; RING_SIZE as usize]);
    }
    match scheduler {
        Scheduler::Maglev | Scheduler::SourceHash | Scheduler::LeastConn => {
            let backends: Vec<MaglevBackend> = members
                .iter()
                .map(|m| MaglevBackend::new(m.ip, port, m.weight))
                .collect();
            let table = maglev::build_table(&backends, RING_SIZE)
                .map_err(|e| format!("building the Maglev table: {e}"))?;
            Ok(table
                .into_iter()
                .map(|i| members.get(i as usize).map_or(BACKEND_NONE, |m| m.id))
                .collect())
        }
        Scheduler::RoundRobin => {
            let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
            Ok(smooth_round_robin(&weights, RING_SIZE as usize)
                .into_iter()
                .map(|i| members[i].id)
                .collect())
        }
    }
}

/// The candidates of a least-connections service.
pub fn lc_list(members: &[Member]) -> Result<LcList, String> {
    if members.len() > LC_MAX_BACKENDS as usize {
        return Err(format!(
            "least-conn chooses among at most {LC_MAX_BACKENDS} backends per service"
        ));
    }
    let mut list = LcList {
        len: members.len() as u32,
        _pad: 0,
        ids: [BACKEND_NONE; LC_MAX_BACKENDS as usize],
        weights: [0; LC_MAX_BACKENDS as usize],
    };
    for (i, m) in members.iter().enumerate() {
        list.ids[i] = m.id;
        list.weights[i] = m.weight;
    }
    Ok(list)
}

/// `len` picks of smooth weighted round-robin (as nginx does): each turn every backend gains
/// its weight, the richest is picked and pays the total. Turns interleave (5:1:1 gives
/// a a b a c a a), so no backend gets a burst of consecutive new flows. Weights are reduced
/// by their gcd and one cycle is computed and repeated, so the cost is O(cycle × n).
pub fn smooth_round_robin(weights: &[u32], len: usize) -> Vec<usize> {
    let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    if g == 0 {
        return Vec::new();
    }
    let weights: Vec<i64> = weights.iter().map(|w| i64::from(w / g)).collect();
    let total: i64 = weights.iter().sum();
    let cycle_len = usize::try_from(total).unwrap_or(usize::MAX).min(len);
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(cycle_len);
    for _ in 0..cycle_len {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best);
    }
    cycle.iter().copied().cycle().take(len).collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(n: u8, weight: u32) -> Member {
        Member {
            ip: IpAddr::from([10, 0, 0, n]),
            id: u32::from(n),
            weight,
        }
    }

    fn shares(table: &[u32], ids: &[u32]) -> Vec<f64> {
        ids.iter()
            .map(|id| table.iter().filter(|e| *e == id).count() as f64 / table.len() as f64)
            .collect()
    }

    #[test]
    fn smooth_round_robin_interleaves_turns_by_weight() {
        assert_eq!(smooth_round_robin(&[5, 1, 1], 7), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_round_robin(&[1, 1, 1], 6), vec![0, 1, 2, 0, 1, 2]);
        // gcd reduction: 20:10 behaves as 2:1.
        assert_eq!(smooth_round_robin(&[20, 10], 6), vec![0, 1, 0, 0, 1, 0]);
        assert_eq!(smooth_round_robin(&[0, 3], 4), vec![1, 1, 1, 1]);
        assert!(smooth_round_robin(&[0, 0], 4).is_empty());
    }

    #[test]
    fn round_robin_ring_gives_each_backend_its_weighted_share() {
        let members = [member(1, 1), member(2, 2), member(3, 3)];
        let table = ring(Scheduler::RoundRobin, &members, 80).unwrap();
        assert_eq!(table.len(), RING_SIZE as usize);
        for (share, want) in shares(&table, &[1, 2, 3]).iter().zip([1.0, 2.0, 3.0]) {
            assert!(
                (share - want / 6.0).abs() < 0.001,
                "{share} vs {}",
                want / 6.0
            );
        }
        // In turn: no backend twice in a row with equal weights.
        let equal = ring(Scheduler::RoundRobin, &[member(1, 1), member(2, 1)], 80).unwrap();
        assert!(equal.windows(2).take(1000).all(|w| w[0] != w[1]));
    }

    #[test]
    fn hash_schedulers_share_the_maglev_table() {
        let members = [member(1, 1), member(2, 1), member(3, 2)];
        let maglev = ring(Scheduler::Maglev, &members, 80).unwrap();
        assert_eq!(ring(Scheduler::SourceHash, &members, 80).unwrap(), maglev);
        assert_eq!(ring(Scheduler::LeastConn, &members, 80).unwrap(), maglev);
        let s = shares(&maglev, &[1, 2, 3]);
        assert!((s[2] - 0.5).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn no_members_gives_an_empty_table() {
        for sched in [Scheduler::Maglev, Scheduler::RoundRobin] {
            assert!(
                ring(sched, &[], 80)
                    .unwrap()
                    .iter()
                    .all(|e| *e == BACKEND_NONE)
            );
        }
    }

    #[test]
    fn least_conn_lists_are_bounded() {
        let max = LC_MAX_BACKENDS as u8;
        let members: Vec<Member> = (1..=max).map(|n| member(n, 2)).collect();
        let list = lc_list(&members).unwrap();
        let last = usize::from(max) - 1;
        assert_eq!(
            (list.len, list.ids[last], list.weights[last]),
            (u32::from(max), u32::from(max), 2)
        );
        let too_many: Vec<Member> = (1..=max + 1).map(|n| member(n, 1)).collect();
        assert!(lc_list(&too_many).is_err());
    }
}

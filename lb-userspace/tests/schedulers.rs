//! Each scheduler in action with real TCP connections through the attached XDP program.

mod common;

use std::time::Duration;

use common::{SERVICE, Testbed, http, vip_addr, wait_until};

const NAMES: [&str; 3] = ["b1", "b2", "b3"];

fn bed(scheduler: &str) -> Testbed {
    let tb = Testbed::builder().backends(3).start();
    tb.lb_ok(&[
        "service",
        "add",
        SERVICE,
        "--scheduler",
        scheduler,
        "--hc-interval",
        "250ms",
        "--hc-timeout",
        "250ms",
    ]);
    for name in NAMES {
        tb.add_backend(name);
    }
    tb.wait_in_table(&NAMES, true, Duration::from_secs(15));
    tb
}

#[test]
fn source_hash_sends_every_connection_of_a_client_to_one_backend() {
    let tb = bed("source-hash");
    let tally = tb.request_many(30);
    tally.assert_all_ok("source-hash");
    let hit: Vec<&str> = NAMES.into_iter().filter(|n| tally.count(n) > 0).collect();
    assert_eq!(hit.len(), 1, "one client, one backend: {tally:?}");
    assert!(
        tally.ports.len() > 1,
        "the connections had different source ports"
    );
}

#[test]
fn round_robin_spreads_new_connections_in_turn() {
    let tb = bed("round-robin");
    let tally = tb.request_many(30);
    tally.assert_all_ok("round-robin");
    for name in NAMES {
        // In strict turn on one CPU: 10 each; two CPUs walk their own cursors.
        assert!(tally.count(name) >= 7, "{name}: {tally:?}");
    }
}

#[test]
fn least_conn_balances_open_connections_and_refills_the_emptiest() {
    let tb = bed("least-conn");
    let mut open: Vec<(http::Connection, String)> = (0..9)
        .map(|_| {
            let mut c = http::Connection::open(&tb.client, vip_addr()).expect("open");
            let b = c.request().expect("request");
            (c, b)
        })
        .collect();
    for name in NAMES {
        let n = open.iter().filter(|(_, b)| b == name).count();
        assert_eq!(n, 3, "{name}: each new connection goes to the least loaded");
    }
    // Close b1's connections: it becomes the emptiest, and the next ones go there.
    open.retain(|(_, b)| b != "b1");
    let b1 = tb.ip_of("b1");
    let drained = wait_until(Duration::from_secs(5), || {
        common::find_backend(&tb.status_json(), SERVICE, &b1)
            .is_some_and(|b| b["active_flows"] == 0)
    });
    assert!(drained.is_some(), "b1's closed connections still counted");
    for _ in 0..3 {
        let mut c = http::Connection::open(&tb.client, vip_addr()).expect("open");
        assert_eq!(c.request().expect("request"), "b1");
        open.push((c, "b1".into()));
    }
    for (c, b) in &mut open {
        assert_eq!(&c.request().expect("open connections still work"), b);
    }
}

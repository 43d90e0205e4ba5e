//! IPv6 through the balancer: an IPv6 VIP with IPv6 backends over L2 direct server return,
//! real TCP (HTTP) from the client.

mod common;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use common::{SERVICE6, Testbed, VIP6, find_backend, http, v6_of, wait_until};

fn get6(tb: &Testbed) -> anyhow::Result<String> {
    http::get_in(&tb.client, SocketAddr::new(IpAddr::V6(VIP6), 80)).map(|(body, _)| body)
}

#[test]
fn an_ipv6_vip_is_balanced_and_fails_over() {
    let mut tb = Testbed::builder().backends(3).ipv6().start();
    tb.lb_ok(&[
        "service",
        "add",
        SERVICE6,
        "--hc-interval",
        "250ms",
        "--hc-timeout",
        "250ms",
    ]);
    let ips: Vec<(String, String)> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| (n.to_string(), v6_of(tb.backend(n).ip).to_string()))
        .collect();
    for (_, ip) in &ips {
        tb.lb_ok(&["backend", "add", SERVICE6, ip]);
    }
    let all_in = wait_until(Duration::from_secs(15), || {
        let status = tb.status_json();
        ips.iter().all(|(_, ip)| {
            find_backend(&status, SERVICE6, ip).is_some_and(|b| b["in_table"] == true)
        })
    });
    assert!(
        all_in.is_some(),
        "IPv6 backends never entered the table: {}",
        tb.status_json()
    );

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    // At least 12 of 90 each: a fair spread over three falls below once in 10^5 runs.
    for _ in 0..90 {
        *counts
            .entry(get6(&tb).expect("request over IPv6"))
            .or_default() += 1;
    }
    for (name, _) in &ips {
        assert!(counts.get(name).copied().unwrap_or(0) >= 12, "{counts:?}");
    }

    // b2's server stops: it leaves the table and every request still succeeds.
    tb.backend_mut("b2").server.stop();
    let b2 = ips[1].1.clone();
    let out = wait_until(Duration::from_secs(10), || {
        find_backend(&tb.status_json(), SERVICE6, &b2).is_some_and(|b| b["in_table"] == false)
    });
    assert!(out.is_some(), "b2 never left the table");
    for _ in 0..30 {
        assert_ne!(get6(&tb).expect("request after failover"), "b2");
    }
}

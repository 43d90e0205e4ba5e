//! End-to-end tests of the health-check kinds (`lb service add --hc http|udp|none`) over the
//! namespace test bed described in `common/mod.rs`: a backend whose host and port answer but
//! whose check fails stays out of (or leaves) the table, and a `none` check brings backends in
//! without any probe. These tests need root; without it they fail and say why.
#![cfg(target_os = "linux")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{SERVICE, Testbed, VIP, config_view, find_backend, find_service, udp, wait_until};

/// Fast checks, as in the other end-to-end tests: interval 250 ms, rise 2, fall 2.
const FAST: [&str; 8] = [
    "--hc-interval",
    "250ms",
    "--hc-timeout",
    "250ms",
    "--hc-rise",
    "2",
    "--hc-fall",
    "2",
];
const SETTLE: Duration = Duration::from_secs(15);

/// Waits until backend `ip` of `service` reports health `health`; returns its status entry.
fn wait_health(tb: &Testbed, service: &str, ip: &str, health: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let reached = wait_until(SETTLE, || {
        last = find_backend(&tb.status_json(), service, ip)
            .cloned()
            .unwrap_or_default();
        last["health"] == health
    });
    assert!(
        reached.is_some(),
        "{service} {ip}: health not {health} within {SETTLE:?}: {last}"
    );
    last
}

/// An HTTP check on /health: a backend answering 503 there stays out although its port
/// accepts connections (a TCP check would take it); it comes in once the path answers 200, and
/// a backend whose path starts failing leaves. Bad check flags change nothing.
#[test]
fn http_check_keeps_out_and_takes_out_backends_whose_path_fails() {
    let tb = Testbed::builder().backends(2).start();
    let (b1, b2) = (tb.ip_of("b1"), tb.ip_of("b2"));
    tb.backend("b1").server.set_status("/health", 200);
    tb.backend("b2").server.set_status("/health", 503);

    let before = config_view(&tb.status_json());
    for bad in [
        &["--hc", "http", "--hc-http-path", "health"][..],
        &["--hc", "http", "--hc-http-status", "399-200"],
        &["--hc", "http", "--hc-http-status", "700"],
        &["--hc", "tcp", "--hc-http-path", "/health"],
        &["--hc", "udp", "--hc-udp-send", r"\q"],
        &["--hc", "gopher"],
    ] {
        let mut args = vec!["service", "add", SERVICE];
        args.extend_from_slice(bad);
        tb.lb_err(&args);
    }
    assert_eq!(
        config_view(&tb.status_json()),
        before,
        "a refused add changed something"
    );

    let mut add = vec![
        "service",
        "add",
        SERVICE,
        "--hc",
        "http",
        "--hc-http-path",
        "/health",
    ];
    add.extend_from_slice(&FAST);
    tb.lb_ok(&add);
    tb.add_backend("b1");
    tb.add_backend("b2");
    tb.wait_in_table(&["b1"], true, SETTLE);
    let st = wait_health(&tb, SERVICE, &b2, "down");
    assert_eq!(st["last_error"], "HTTP 503", "b2: {st}");
    assert_eq!(st["in_table"], false, "b2: {st}");

    let status = tb.status_json();
    let kind = &find_service(&status, SERVICE).expect("service listed")["health_check"]["kind"];
    assert_eq!(
        *kind,
        serde_json::json!({"type": "http", "path": "/health", "status": "200-399", "host": null})
    );
    let human = tb.lb_ok(&["status"]);
    assert!(
        human.contains("check: http GET /health expect 200-399 every 250ms"),
        "{human}"
    );

    let t = tb.request_many(40);
    t.assert_all_ok("requests while b2's health path fails");
    assert_eq!(t.count("b1"), 40, "{:?}", t.counts);

    // b2's path recovers: it comes in. Then b1's fails: it leaves, with the status as reason.
    tb.backend("b2").server.set_status("/health", 200);
    tb.wait_in_table(&["b2"], true, SETTLE);
    tb.backend("b1").server.set_status("/health", 500);
    tb.wait_in_table(&["b1"], false, SETTLE);
    let st = wait_health(&tb, SERVICE, &b1, "down");
    assert_eq!(st["last_error"], "HTTP 500", "b1: {st}");
    let t = tb.request_many(40);
    t.assert_all_ok("requests after b1's health path failed");
    assert_eq!(t.count("b2"), 40, "{:?}", t.counts);
    // The health checks were requests to /health only: none reached the counted path.
    assert_eq!(tb.backend("b1").server.requests(), 40);
}

/// A UDP check: each backend answers checks on its own address with a datagram; a backend
/// answering the wrong text or not at all (port unreachable) is out, one answering the
/// expected text is in. Service traffic is answered from the VIP as usual.
#[test]
fn udp_check_needs_the_expected_reply() {
    const UDP_PORT: u16 = 5300;
    let tb = Testbed::builder().backends(2).start();
    let service = format!("{VIP}:{UDP_PORT}/udp");
    let vip = SocketAddr::new(VIP.into(), UDP_PORT);
    let (b1, b2) = (tb.backend("b1"), tb.backend("b2"));
    let check_addr = |b: &common::Backend| SocketAddr::new(b.ip.into(), UDP_PORT);
    // Declared after `tb`, so dropped before its namespaces go.
    let _data: Vec<udp::UdpServer> = tb
        .backends
        .iter()
        .map(|b| udp::UdpServer::start(&b.name, &b.ns, vip))
        .collect();
    // The check responders answer with their name: b1's says "ready", b2's "starting".
    let mut check1 = Some(udp::UdpServer::start("ready", &b1.ns, check_addr(b1)));
    let mut check2 = Some(udp::UdpServer::start("starting", &b2.ns, check_addr(b2)));

    let mut add = vec![
        "service",
        "add",
        &service,
        "--hc",
        "udp",
        "--hc-udp-send",
        "are you ready?",
        "--hc-udp-expect",
        "ready",
    ];
    add.extend_from_slice(&FAST);
    tb.lb_ok(&add);
    for b in ["b1", "b2"] {
        tb.lb_ok(&["backend", "add", &service, &tb.ip_of(b)]);
    }
    tb.wait_in_table_of(&service, &["b1"], true, SETTLE);
    let st = wait_health(&tb, &service, &tb.ip_of("b2"), "down");
    assert_eq!(
        st["last_error"], r#"unexpected reply "starting""#,
        "b2: {st}"
    );
    assert!(check1.as_ref().is_some_and(|s| s.requests() >= 2));
    for i in 0..30 {
        let who = udp::query_in(&tb.client, vip).unwrap_or_else(|e| panic!("datagram {i}: {e:#}"));
        assert_eq!(who, "b1", "datagram {i} reached a backend that is down");
    }

    // b2 becomes ready; b1's responder goes away (its port then answers ICMP unreachable).
    drop(check2.take());
    check2 = Some(udp::UdpServer::start("ready", &b2.ns, check_addr(b2)));
    tb.wait_in_table_of(&service, &["b2"], true, SETTLE);
    drop(check1.take());
    tb.wait_in_table_of(&service, &["b1"], false, SETTLE);
    let st = wait_health(&tb, &service, &tb.ip_of("b1"), "down");
    let err = st["last_error"].as_str().unwrap_or_default();
    // ICMP errors are rate limited per peer, so a later probe may see silence instead.
    assert!(
        err == "port unreachable" || err.starts_with("no reply within"),
        "b1: {st}"
    );
    assert!(
        tb.daemon_log().contains("port unreachable"),
        "the first failures arrive within the ICMP burst:\n{}",
        tb.daemon_log()
    );
    for i in 0..30 {
        let who = udp::query_in(&tb.client, vip).unwrap_or_else(|e| panic!("datagram {i}: {e:#}"));
        assert_eq!(who, "b2", "datagram {i} reached a backend that is down");
    }
    drop(check2);
}

/// `--hc none`: nothing listens for checks, and nothing on the balancer host has talked to the
/// backends, yet they enter the table at once: the daemon makes the kernel resolve their MACs.
#[test]
fn none_check_brings_backends_in_without_probes() {
    const UDP_PORT: u16 = 5301;
    let tb = Testbed::builder().backends(2).start();
    let service = format!("{VIP}:{UDP_PORT}/udp");
    let vip = SocketAddr::new(VIP.into(), UDP_PORT);
    let _data: Vec<udp::UdpServer> = tb
        .backends
        .iter()
        .map(|b| udp::UdpServer::start(&b.name, &b.ns, vip))
        .collect();
    tb.lb_ok(&["service", "add", &service, "--hc", "none"]);
    for b in ["b1", "b2"] {
        tb.lb_ok(&["backend", "add", &service, &tb.ip_of(b)]);
    }
    let took = tb.wait_in_table_of(&service, &["b1", "b2"], true, Duration::from_secs(5));
    eprintln!("none: both backends in the table {took:?} after being added");
    let st = tb.status_json();
    for b in ["b1", "b2"] {
        let be = find_backend(&st, &service, &tb.ip_of(b)).expect("listed");
        assert_eq!(be["health"], "up", "{b}: {be}");
        assert!(be["mac"].is_string(), "{b}: {be}");
        assert!(be["last_error"].is_null(), "{b}: {be}");
    }
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..60 {
        let who = udp::query_in(&tb.client, vip).unwrap_or_else(|e| panic!("datagram {i}: {e:#}"));
        *counts.entry(who).or_default() += 1;
    }
    assert!(
        counts.get("b1").is_some_and(|n| *n >= 10) && counts.get("b2").is_some_and(|n| *n >= 10),
        "{counts:?}"
    );
}

/// `lb backend set --weight` through the CLI: weights show in status, 0 reads as draining and
/// takes no new connections, and an unknown backend is a one-line error.
#[test]
fn backend_set_changes_weight_live() {
    let tb = Testbed::builder().backends(2).start();
    tb.setup_service(&["b1", "b2"]);
    let b2 = tb.ip_of("b2");
    let mut open = tb.connect().expect("a keep-alive connection");
    let first = open.request().expect("first request");

    tb.lb_ok(&["backend", "set", SERVICE, &b2, "--weight", "0"]);
    let be = tb.backend_status("b2").expect("listed");
    assert_eq!(
        (be["weight"].as_u64(), be["state"].as_str()),
        (Some(0), Some("draining")),
        "{be}"
    );
    let t = tb.request_many(40);
    t.assert_all_ok("requests with b2 at weight 0");
    assert_eq!(t.count("b1"), 40, "{:?}", t.counts);
    assert_eq!(
        open.request().expect("the open connection still works"),
        first,
        "the open connection kept its backend"
    );

    tb.lb_ok(&["backend", "set", SERVICE, &b2, "--weight", "3"]);
    let t = tb.request_many(80);
    t.assert_all_ok("requests with weights 1:3");
    assert!(t.count("b2") > t.count("b1"), "{:?}", t.counts);
    assert_eq!(tb.backend_status("b2").expect("listed")["state"], "active");

    let before = config_view(&tb.status_json());
    let err = tb.lb_err(&["backend", "set", SERVICE, "10.99.0.99", "--weight", "2"]);
    assert!(err.contains("10.99.0.99"), "{err}");
    tb.lb_err(&["backend", "set", SERVICE, &b2, "--weight", "10001"]);
    tb.lb_err(&["backend", "set", SERVICE, &b2]);
    assert_eq!(config_view(&tb.status_json()), before);
}

#[test]
fn vip_targeted_checks_take_out_a_backend_that_lost_the_vip() {
    let tb = Testbed::builder().backends(3).start();
    tb.lb_ok(&[
        "service",
        "add",
        SERVICE,
        "--hc-interval",
        "250ms",
        "--hc-timeout",
        "250ms",
        "--hc-target",
        "vip",
    ]);
    for name in ["b1", "b2", "b3"] {
        tb.add_backend(name);
    }
    // Probes addressed to the VIP reach each backend (steered by the tc egress program).
    tb.wait_in_table(&["b1", "b2", "b3"], true, Duration::from_secs(15));
    let status = tb.status_json();
    assert_eq!(
        find_service(&status, SERVICE).unwrap()["health_check"]["target"],
        "vip"
    );

    // b2 loses the VIP: its host still serves port 80 on its own address, but not the VIP.
    let b2 = tb.backend("b2").ns.clone();
    let vip = format!("{VIP}/32");
    common::netns::ip(&["-n", &b2, "addr", "del", &vip, "dev", "lo"]);
    let b2_ip = tb.ip_of("b2");
    wait_health(&tb, SERVICE, &b2_ip, "down");
    let direct: SocketAddr = format!("{b2_ip}:80").parse().unwrap();
    assert!(
        tb.get(direct).is_ok(),
        "b2's host still answers on its own address"
    );
    assert!(tb.in_table("b1") && tb.in_table("b3"), "the others stay");
    tb.request_many(60).assert_all_ok("with b2 out");

    // The VIP back on b2: the check passes again.
    common::netns::ip(&["-n", &b2, "addr", "add", &vip, "dev", "lo"]);
    tb.wait_in_table(&["b2"], true, Duration::from_secs(15));
}

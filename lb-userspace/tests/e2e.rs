//! End-to-end tests: real TCP (HTTP) from a client namespace through the XDP balancer (L2
//! direct server return) to backend namespaces, driven through the `lb` CLI. The topology is
//! described in `common/mod.rs`. These tests need root; without it they fail and say why.
#![cfg(target_os = "linux")]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Connection, HC_FALL, HC_INTERVAL, HC_RISE, HC_TIMEOUT, LB_BIN, PORT, SERVICE, Testbed, VIP,
    as_u64, assert_cli_error, check_cli_error, config_view, find_backend, find_service, http,
    netns, udp, wait_until, xdp_attached,
};

/// The harness itself, without the balancer: every backend answers the client directly with
/// its own name (new connections and keep-alive), a stopped server refuses connections and a
/// restarted one serves again, and Drop leaves no namespace behind.
#[test]
fn topology_reaches_backends_directly_and_drop_removes_namespaces() {
    let names;
    {
        let mut tb = Testbed::builder().backends(2).without_balancer().start();
        names = tb.namespaces();
        assert_eq!(names.len(), 5, "sw, client, lb, b1, b2: {names:?}");
        for b in &tb.backends {
            let addr = SocketAddr::new(b.ip.into(), PORT);
            assert_eq!(tb.get(addr).expect("direct GET"), b.name);
            let mut conn = Connection::open(&tb.client, addr).expect("keep-alive connect");
            for _ in 0..3 {
                assert_eq!(conn.request().expect("keep-alive GET"), b.name);
            }
        }
        assert_eq!(tb.backend("b1").server.requests(), 4);

        let b1 = SocketAddr::new(tb.backend("b1").ip.into(), PORT);
        tb.backend_mut("b1").server.stop();
        let start = Instant::now();
        let err = tb
            .get(b1)
            .expect_err("a stopped server must refuse connections");
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "refusal took {:?} (should be an immediate RST): {err:#}",
            start.elapsed()
        );
        tb.backend_mut("b1").server.start();
        assert_eq!(tb.get(b1).expect("GET after restart"), "b1");
    }
    let left = netns::netns_list();
    for n in &names {
        assert!(!left.contains(n), "namespace {n} survived Drop");
    }
}

/// Three healthy backends share ~300 new connections fairly, and the service and backend
/// counters in `lb status` count the packets.
#[test]
fn spread_three_backends_share_new_connections() {
    let tb = Testbed::builder().backends(3).start();
    let names = ["b1", "b2", "b3"];
    tb.setup_service(&names);

    let n = 300;
    let t = tb.request_many(n);
    t.assert_all_ok("requests to the VIP");
    eprintln!(
        "spread over {n} connections: {:?} ({} distinct source ports)",
        t.counts,
        t.ports.len()
    );
    assert_eq!(t.ok(), n);
    assert!(
        t.ports.len() >= n * 9 / 10,
        "only {} distinct source ports",
        t.ports.len()
    );
    for b in names {
        assert!(
            t.count(b) * 100 >= n * 15,
            "{b} got {} of {n} connections (< 15%): {:?}",
            t.count(b),
            t.counts
        );
        // The body names the backend; its server must agree that it answered that many.
        assert_eq!(
            tb.backend(b).server.requests(),
            t.count(b) as u64,
            "{b} server count"
        );
    }
    assert_eq!(
        t.counts.len(),
        3,
        "answers from unknown backends: {:?}",
        t.counts
    );

    let st = tb.status_json();
    let svc = find_service(&st, SERVICE).expect("service listed");
    // Each connection sends at least SYN, ACK and the request through the balancer.
    let svc_packets = as_u64(&svc["packets"]);
    assert!(
        svc_packets >= 3 * n as u64,
        "service packets {svc_packets} < {}",
        3 * n
    );
    assert!(
        as_u64(&svc["bytes"]) >= svc_packets * 40,
        "service bytes: {svc}"
    );
    for b in names {
        let be = find_backend(&st, SERVICE, &tb.ip_of(b)).expect("backend listed");
        let p = as_u64(&be["packets"]);
        assert!(
            p >= 3 * t.count(b) as u64,
            "{b}: {p} packets for {} connections",
            t.count(b)
        );
        assert!(as_u64(&be["bytes"]) >= p * 40, "{b} bytes: {be}");
        assert!(be["mac"].is_string(), "{b} has no MAC in status: {be}");
        assert_eq!(be["health"], "up", "{b}: {be}");
        assert_eq!(be["state"], "active", "{b}: {be}");
    }
    let counters = &st["counters"];
    assert!(
        as_u64(&counters["forwarded"]) >= svc_packets,
        "counters: {counters}"
    );
    // Health-check replies and ARP reach the balancer host's own stack through the program.
    assert!(
        as_u64(&counters["pass_not_vip"]) > 0,
        "counters: {counters}"
    );
}

/// A backend whose server stops leaves the table within interval × fall (all requests then
/// succeed on the others), and comes back after `rise` good checks and gets traffic again.
#[test]
fn failover_and_recovery_follow_health_checks() {
    let mut tb = Testbed::builder().backends(3).start();
    tb.setup_service(&["b1", "b2", "b3"]);
    let t = tb.request_many(60);
    t.assert_all_ok("requests before the failure");
    assert!(
        t.count("b2") > 0,
        "b2 got no traffic before the failure: {:?}",
        t.counts
    );

    let fall_bound = HC_INTERVAL * HC_FALL + Duration::from_secs(1);
    tb.backend_mut("b2").server.stop();
    let stopped = Instant::now();
    // Until the balancer notices, keep sending requests: the ones hashed to b2 are refused.
    let (mut failed, mut last_failure) = (0, None);
    let detected = loop {
        let b2 = tb
            .backend_status("b2")
            .expect("b2 still listed after its server stopped");
        if b2["in_table"] == false {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < fall_bound + Duration::from_secs(3),
            "b2 still in the table {:?} after its server stopped: {b2}",
            stopped.elapsed()
        );
        if tb.get_vip().is_err() {
            failed += 1;
            last_failure = Some(stopped.elapsed());
        }
    };
    eprintln!(
        "FAILOVER: b2 left the table {detected:?} after its server stopped (interval \
         {HC_INTERVAL:?} x fall {HC_FALL}); {failed} requests failed meanwhile, last at \
         {last_failure:?}"
    );
    assert!(
        detected <= fall_bound,
        "failover took {detected:?} > {fall_bound:?}"
    );
    // `fall` failed checks are needed, so it cannot be faster than (fall - 1) intervals.
    let fall_floor = HC_INTERVAL * (HC_FALL - 1) * 4 / 5;
    assert!(
        detected >= fall_floor,
        "failover after {detected:?}: fewer than fall checks?"
    );
    let b2 = tb.backend_status("b2").expect("b2 listed");
    assert_eq!(b2["health"], "down", "b2: {b2}");

    let t = tb.request_many(150);
    t.assert_all_ok("requests after the failover");
    assert_eq!(t.count("b2"), 0, "b2 is down but answered: {:?}", t.counts);
    assert!(t.count("b1") > 0 && t.count("b3") > 0, "{:?}", t.counts);

    tb.backend_mut("b2").server.start();
    let restarted = Instant::now();
    tb.wait_in_table(
        &["b2"],
        true,
        HC_INTERVAL * HC_RISE + Duration::from_secs(3),
    );
    let recovered = restarted.elapsed();
    eprintln!(
        "RECOVERY: b2 back in the table {recovered:?} after its server restarted (rise {HC_RISE})"
    );
    let rise_floor = HC_INTERVAL * (HC_RISE - 1) * 4 / 5;
    assert!(
        recovered >= rise_floor,
        "recovered after {recovered:?}: fewer than rise checks?"
    );
    let b2 = tb.backend_status("b2").expect("b2 listed");
    assert_eq!(b2["health"], "up", "b2: {b2}");

    let n = 150;
    let t = tb.request_many(n);
    t.assert_all_ok("requests after the recovery");
    assert!(
        t.count("b2") * 100 >= n * 15,
        "recovered b2 got {} of {n}: {:?}",
        t.count("b2"),
        t.counts
    );
}

/// `backend del` takes the backend out at once: requests keep succeeding and none reaches it.
/// Deleting a backend that does not exist fails and changes nothing. (On the way: a backend
/// address where no host answers stays out of the table.)
#[test]
fn backend_del_stops_traffic_to_it_and_unknown_del_fails() {
    let tb = Testbed::builder().backends(3).start();
    tb.setup_service(&["b1", "b2", "b3"]);
    let t = tb.request_many(60);
    t.assert_all_ok("requests before the delete");
    assert!(
        t.count("b3") > 0,
        "b3 got no traffic before the delete: {:?}",
        t.counts
    );

    // A backend address where nothing answers never enters the table and costs nothing.
    let ghost = "10.99.0.99";
    tb.lb_ok(&["backend", "add", SERVICE, ghost]);
    std::thread::sleep(HC_INTERVAL * (HC_RISE + 2) + HC_TIMEOUT);
    let st = tb.status_json();
    let g = find_backend(&st, SERVICE, ghost).expect("added backend listed");
    assert_eq!(
        g["in_table"], false,
        "a backend with no host is in the table: {g}"
    );
    assert_ne!(g["health"], "up", "a backend with no host is healthy: {g}");
    tb.request_many(30)
        .assert_all_ok("requests with an unreachable backend configured");
    tb.lb_ok(&["backend", "del", SERVICE, ghost]);

    let b3 = tb.ip_of("b3");
    tb.lb_ok(&["backend", "del", SERVICE, &b3]);
    let st = tb.status_json();
    assert!(
        find_backend(&st, SERVICE, &b3).is_none(),
        "b3 still listed after del: {st:#}"
    );
    let served = tb.backend("b3").server.requests();

    let n = 150;
    let t = tb.request_many(n);
    t.assert_all_ok("requests after the delete");
    assert_eq!(t.count("b3"), 0, "deleted b3 answered: {:?}", t.counts);
    assert_eq!(
        tb.backend("b3").server.requests(),
        served,
        "b3's server saw requests"
    );
    for b in ["b1", "b2"] {
        assert!(t.count(b) * 100 >= n * 25, "{b}: {:?}", t.counts);
    }

    let before = config_view(&tb.status_json());
    for (what, ip) in [
        ("unknown backend", "10.99.0.77"),
        ("already deleted", b3.as_str()),
    ] {
        let msg = tb.lb_err(&["backend", "del", SERVICE, ip]);
        eprintln!("backend del ({what}): {msg}");
        assert_eq!(
            config_view(&tb.status_json()),
            before,
            "failed del ({what}) changed status"
        );
    }
    tb.request_many(30)
        .assert_all_ok("requests after the failed deletes");
}

/// `backend drain`: an open keep-alive connection to the drained backend keeps working on it;
/// new connections never reach it.
#[test]
fn drain_keeps_open_connection_and_avoids_new_ones() {
    let tb = Testbed::builder().backends(3).start();
    tb.setup_service(&["b1", "b2", "b3"]);

    let mut conn = tb.connect().expect("keep-alive connection to the VIP");
    let target = conn.request().expect("first request on the connection");
    eprintln!(
        "the keep-alive connection (port {}) reached {target}",
        conn.local_port()
    );
    let served = tb.backend(&target).server.requests();

    tb.lb_ok(&["backend", "drain", SERVICE, &tb.ip_of(&target)]);
    tb.wait_in_table(&[&target], false, Duration::from_secs(2));
    let be = tb
        .backend_status(&target)
        .expect("a drained backend stays listed");
    assert_eq!(be["state"], "draining", "{target}: {be}");

    // Spread the requests over more than one health-check interval.
    for i in 0..5 {
        let got = conn
            .request()
            .unwrap_or_else(|e| panic!("request {i} after drain: {e:#}"));
        assert_eq!(got, target, "request {i} on the drained connection moved");
        std::thread::sleep(HC_INTERVAL / 2);
    }

    let n = 90;
    let t = tb.request_many(n);
    t.assert_all_ok("new connections after the drain");
    assert_eq!(
        t.count(&target),
        0,
        "drained {target} got new connections: {:?}",
        t.counts
    );
    assert_eq!(t.counts.len(), 2, "{:?}", t.counts);
    assert_eq!(
        conn.request().expect("request after the new connections"),
        target
    );
    assert_eq!(
        tb.backend(&target).server.requests(),
        served + 6,
        "{target} served requests other than the drained connection's"
    );
    let be = tb.backend_status(&target).expect("listed");
    assert_eq!(be["state"], "draining", "{target}: {be}");
}

/// Connections opened with two backends keep their backend when two more are added (the
/// connection table, not the Maglev table, decides for established flows); new connections
/// reach the new backends.
#[test]
fn open_connections_keep_their_backend_when_backends_are_added() {
    let tb = Testbed::builder().backends(4).start();
    tb.setup_service(&["b1", "b2"]);

    let mut conns: Vec<(Connection, String)> = (0..20)
        .map(|i| {
            let mut c = tb
                .connect()
                .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
            let b = c
                .request()
                .unwrap_or_else(|e| panic!("first request on {i}: {e:#}"));
            (c, b)
        })
        .collect();
    let on_b1 = conns.iter().filter(|(_, b)| b == "b1").count();
    eprintln!(
        "20 keep-alive connections: {on_b1} on b1, {} on b2",
        20 - on_b1
    );
    assert!(
        (1..20).contains(&on_b1),
        "all 20 connections on one backend"
    );

    tb.add_backend("b3");
    tb.add_backend("b4");
    tb.wait_in_table(&["b3", "b4"], true, Duration::from_secs(15));

    let mut broken = Vec::new();
    for (i, (c, want)) in conns.iter_mut().enumerate() {
        for _ in 0..3 {
            match c.request() {
                Ok(got) if got == *want => {}
                Ok(got) => {
                    broken.push(format!("#{i} port {}: {want} -> {got}", c.local_port()));
                    break;
                }
                Err(e) => {
                    broken.push(format!("#{i} port {}: {want} -> {e:#}", c.local_port()));
                    break;
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} of 20 connections moved: {broken:#?}",
        broken.len()
    );

    // 120: each new backend's fair quarter falls below a tenth once in 10^5 runs.
    let n = 120;
    let t = tb.request_many(n);
    t.assert_all_ok("new connections after adding b3, b4");
    eprintln!("new connections after adding b3, b4: {:?}", t.counts);
    for b in ["b3", "b4"] {
        assert!(
            t.count(b) * 10 >= n,
            "{b} got {} of {n} new connections",
            t.count(b)
        );
    }
}

/// Bad input to the CLI exits non-zero with one line on stderr and changes nothing; so does
/// every command when no daemon listens on the socket. `LB_API` works like `--api`.
#[test]
fn cli_errors_are_one_line_and_change_nothing() {
    let tb = Testbed::builder().backends(2).start();
    tb.setup_service(&["b1"]);
    let before = config_view(&tb.status_json());
    let b1 = tb.ip_of("b1");
    let b2 = tb.ip_of("b2");

    let cases: &[(&str, &[&str])] = &[
        ("malformed VIP", &["service", "add", "10.200.0.300:80/tcp"]),
        ("VIP without port", &["service", "add", "10.200.0.20/tcp"]),
        (
            "unknown protocol",
            &["service", "add", "10.200.0.20:80/sctp"],
        ),
        (
            "port out of range",
            &["service", "add", "10.200.0.20:70000/tcp"],
        ),
        (
            "bad duration",
            &[
                "service",
                "add",
                "10.200.0.20:80/tcp",
                "--hc-interval",
                "soon",
            ],
        ),
        ("duplicate service", &["service", "add", SERVICE]),
        (
            "unknown service (backend add)",
            &["backend", "add", "10.200.0.99:80/tcp", &b1],
        ),
        (
            "unknown service (service del)",
            &["service", "del", "10.200.0.99:80/tcp"],
        ),
        (
            "malformed backend IP",
            &["backend", "add", SERVICE, "10.99.0.256"],
        ),
        ("duplicate backend", &["backend", "add", SERVICE, &b1]),
        (
            "bad weight",
            &["backend", "add", SERVICE, &b2, "--weight", "heavy"],
        ),
        (
            "unknown backend (drain)",
            &["backend", "drain", SERVICE, "10.99.0.77"],
        ),
        (
            "unknown backend (del)",
            &["backend", "del", SERVICE, "10.99.0.77"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, args) in cases {
        let out = tb.lb(args);
        match check_cli_error(&format!("lb {}", args.join(" ")), &out) {
            Ok(msg) => eprintln!("{what}: `lb {}` -> {msg}", args.join(" ")),
            Err(e) => failures.push(format!("{what}: {e}")),
        }
        let now = config_view(&tb.status_json());
        assert_eq!(
            now,
            before,
            "{what}: `lb {}` changed the configuration",
            args.join(" ")
        );
    }
    assert!(
        failures.is_empty(),
        "not a one-line error with non-zero exit: {failures:#?}"
    );

    // No daemon on the socket.
    let missing = tb.dir.join("no-such-daemon.sock");
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["service", "add", "10.200.0.30:80/tcp"],
        &["backend", "add", SERVICE, &b2],
    ] {
        let out = netns::run_timeout(
            Command::new(LB_BIN).arg("--api").arg(&missing).args(args),
            Duration::from_secs(15),
        );
        let msg = assert_cli_error(
            &format!("lb --api {} {}", missing.display(), args.join(" ")),
            &out,
        );
        eprintln!("no daemon: `lb {}` -> {msg}", args.join(" "));
    }
    let out = netns::run_timeout(
        Command::new(LB_BIN).env("LB_API", &missing).arg("status"),
        Duration::from_secs(15),
    );
    assert_cli_error("LB_API=<missing> lb status", &out);

    // LB_API selects the socket like --api does.
    let out = netns::run_timeout(
        Command::new(LB_BIN)
            .env("LB_API", &tb.api)
            .args(["status", "--json"]),
        Duration::from_secs(15),
    );
    assert!(
        out.status.success(),
        "LB_API=<socket> lb status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("JSON from LB_API status");
    assert_eq!(config_view(&st), before);

    assert_eq!(config_view(&tb.status_json()), before);
    assert_eq!(tb.get_vip().expect("the service still works"), "b1");
}

/// On SIGTERM the daemon detaches its program from the interface and exits 0.
#[test]
fn daemon_detaches_and_exits_zero_on_sigterm() {
    let mut tb = Testbed::builder().backends(1).start();
    tb.setup_service(&["b1"]);
    assert!(
        xdp_attached(&tb.lb, "eth0"),
        "no XDP program on the balancer's eth0"
    );
    assert_eq!(tb.get_vip().expect("GET through the balancer"), "b1");

    let status = tb.stop_daemon();
    assert!(
        status.success(),
        "daemon exited with {status} on SIGTERM:\n{}",
        tb.daemon_log()
    );
    let detached = wait_until(Duration::from_secs(2), || !xdp_attached(&tb.lb, "eth0"));
    assert!(
        detached.is_some(),
        "XDP program still attached after the daemon exited"
    );
    let out = tb.lb(&["status"]);
    assert_cli_error("lb status (daemon stopped)", &out);
}

/// A UDP service: datagrams from many source ports (each its own flow) spread over the
/// backends and are answered directly from the VIP. Its health checks connect over TCP to the
/// same port, so each backend also listens there on TCP.
#[test]
fn udp_service_spreads_flows() {
    const UDP_PORT: u16 = 5300;
    let tb = Testbed::builder().backends(2).start();
    let service = format!("{VIP}:{UDP_PORT}/udp");
    let vip = SocketAddr::new(VIP.into(), UDP_PORT);
    // Declared after `tb`, so dropped before its namespaces go.
    let mut servers = Vec::new();
    for b in &tb.backends {
        let mut hc = http::Server::new(&b.name, &b.ns, UDP_PORT);
        hc.start();
        servers.push((hc, udp::UdpServer::start(&b.name, &b.ns, vip)));
    }
    tb.lb_ok(&[
        "service",
        "add",
        &service,
        "--hc-interval",
        "250ms",
        "--hc-timeout",
        "250ms",
    ]);
    for b in ["b1", "b2"] {
        tb.lb_ok(&["backend", "add", &service, &tb.ip_of(b)]);
    }
    tb.wait_in_table_of(&service, &["b1", "b2"], true, Duration::from_secs(15));

    let n = 100;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..n {
        let who = udp::query_in(&tb.client, vip).unwrap_or_else(|e| panic!("datagram {i}: {e:#}"));
        *counts.entry(who).or_default() += 1;
    }
    eprintln!("udp spread over {n} flows: {counts:?}");
    for (i, b) in ["b1", "b2"].into_iter().enumerate() {
        let got = counts.get(b).copied().unwrap_or(0);
        assert!(
            got * 100 >= n * 25,
            "{b} got {got} of {n} udp flows: {counts:?}"
        );
        assert_eq!(servers[i].1.requests(), got as u64, "{b} udp server count");
    }
    let st = tb.status_json();
    let svc = find_service(&st, &service).expect("udp service listed");
    assert!(as_u64(&svc["packets"]) >= n as u64, "udp service: {svc}");
}

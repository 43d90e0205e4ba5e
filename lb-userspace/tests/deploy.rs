//! A rolling deploy across every backend of a service while HTTP load runs: drain one, wait for
//! its flows to end, stop its server, start the new version, let health checks bring it back,
//! next one. Zero failed requests.

mod common;

use std::{
    thread,
    time::{Duration, Instant},
};

use common::{SERVICE, Testbed, http, stream::Stream, vip_addr};

fn state(tb: &Testbed, name: &str) -> String {
    tb.backend_status(name)
        .and_then(|b| b["state"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[test]
fn rolling_deploy_under_load_fails_no_request() {
    let names = ["b1", "b2", "b3"];
    let mut tb = Testbed::builder().backends(3).start();
    tb.setup_service(&names);
    // Long-lived connections, like a client's pool: each is used throughout, and closed and
    // reopened by the client when its backend starts draining (as a client does when a server
    // answers `Connection: close`), so the drain can finish.
    let mut pool: Vec<(http::Connection, String)> = (0..6)
        .map(|_| {
            let mut c = http::Connection::open(&tb.client, vip_addr()).expect("open");
            let b = c.request().expect("first request");
            (c, b)
        })
        .collect();
    let stream = Stream::start(&tb.client);
    let started = Instant::now();
    let mut pool_requests = 0;

    for name in names {
        let ip = tb.ip_of(name);
        tb.lb_ok(&["backend", "drain", SERVICE, &ip, "--timeout", "20s"]);
        for (c, backend) in &mut pool {
            if backend == name {
                *c = http::Connection::open(&tb.client, vip_addr()).expect("reopen");
                *backend = c.request().expect("request on a reopened connection");
                assert_ne!(backend, name, "a new connection reached a draining backend");
                pool_requests += 1;
            }
        }
        let drained = common::wait_until(Duration::from_secs(20), || {
            for (c, backend) in &mut pool {
                assert_eq!(&c.request().expect("pool request"), backend);
                pool_requests += 1;
            }
            state(&tb, name) == "drained"
        });
        assert!(drained.is_some(), "{name} never finished draining");
        // Deploy the new version.
        tb.backend_mut(name).server.stop();
        let down = common::wait_until(Duration::from_secs(10), || {
            tb.backend_status(name)
                .is_some_and(|b| b["health"] == "down")
        });
        assert!(down.is_some(), "health checks never saw {name} stop");
        tb.backend_mut(name).server.start();
        tb.wait_in_table(&[name], true, Duration::from_secs(15));
        assert_eq!(state(&tb, name), "active");
    }
    let took = started.elapsed();
    for (c, backend) in &mut pool {
        assert_eq!(
            &c.request().expect("pool request after the deploy"),
            backend
        );
    }
    let (ok, failed, errors) = stream.finish();
    println!(
        "rolling deploy of {} backends: {ok} requests on new connections and {pool_requests} on \
         long-lived ones, {failed} failed, took {:.1} s",
        names.len(),
        took.as_secs_f64()
    );
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 100, "too few requests during the deploy ({ok})");
    // Every backend served again after its deploy.
    thread::sleep(Duration::from_millis(200));
    let tally = tb.request_many(60);
    tally.assert_all_ok("after the deploy");
    for name in names {
        assert!(
            tally.count(name) > 0,
            "{name} gets no traffic after its deploy"
        );
    }
}

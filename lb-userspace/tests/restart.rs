//! Restarts and upgrades without dropping a connection: the data plane is pinned on a bpffs of
//! the test's own; the daemon is SIGKILLed, restarted, stopped and upgraded in place while a
//! steady stream of requests and long-lived connections go through the balancer.

mod common;

use std::{process::Command, thread, time::Duration};

use common::{Testbed, http, stream::Stream, vip_addr, xdp_attached};

/// The id of the XDP program on `dev` in namespace `ns`.
fn xdp_prog_id(ns: &str, dev: &str) -> Option<u32> {
    let out = Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", "dev", dev])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = text.split("prog/xdp").nth(1)?;
    let mut words = after.split_whitespace();
    while let Some(w) = words.next() {
        if w == "id" {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[test]
fn sigkill_restart_and_in_place_upgrade_drop_nothing() {
    let mut tb = Testbed::builder()
        .backends(3)
        .pinned()
        .daemon_arg("--keep-on-exit")
        .start();
    tb.setup_service(&["b1", "b2", "b3"]);
    let mut conns: Vec<(http::Connection, String)> = (0..12)
        .map(|_| {
            let mut c = http::Connection::open(&tb.client, vip_addr()).expect("open");
            let backend = c.request().expect("first request");
            (c, backend)
        })
        .collect();
    let stream = Stream::start(&tb.client);
    thread::sleep(Duration::from_millis(300));

    // A crash: nothing cleans up. The pinned program keeps forwarding.
    tb.kill_daemon();
    assert!(xdp_attached(&tb.lb, "eth0"), "XDP detached by SIGKILL");
    thread::sleep(Duration::from_secs(1));
    for (c, backend) in &mut conns {
        assert_eq!(&c.request().expect("request while no daemon runs"), backend);
    }
    let before = xdp_prog_id(&tb.lb, "eth0").expect("program id");
    tb.start_daemon_again(&[]);
    assert!(
        tb.daemon_log().contains("adopted the running data plane"),
        "{}",
        tb.daemon_log()
    );
    let adopted = xdp_prog_id(&tb.lb, "eth0").expect("program id");
    assert_ne!(before, adopted, "the new daemon's program runs on the link");
    for name in ["b1", "b2", "b3"] {
        assert!(
            tb.in_table(name),
            "{name} kept in the table across the restart"
        );
    }

    // An upgrade: the running daemon stops leaving the data plane; the next one replaces the
    // program on the pinned link atomically.
    thread::sleep(Duration::from_millis(500));
    assert!(tb.stop_daemon().success());
    assert!(
        xdp_attached(&tb.lb, "eth0"),
        "XDP detached by --keep-on-exit stop"
    );
    thread::sleep(Duration::from_millis(500));
    tb.start_daemon_again(&[]);
    let upgraded = xdp_prog_id(&tb.lb, "eth0").expect("program id");
    assert_ne!(adopted, upgraded);
    thread::sleep(Duration::from_millis(500));

    // A change after the restarts applies and reaches the kernel.
    tb.lb_ok(&["backend", "drain", common::SERVICE, &tb.ip_of("b3")]);

    for (c, backend) in &mut conns {
        assert_eq!(
            &c.request().expect("long-lived connection after restarts"),
            backend,
            "a long-lived connection changed backend"
        );
    }
    let (ok, failed, errors) = stream.finish();
    println!("request stream: {ok} ok, {failed} failed across SIGKILL, restart and upgrade");
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 150, "too few requests went through ({ok})");
}

#[test]
fn a_clean_stop_detaches_unpins_and_keeps_the_configuration() {
    let mut tb = Testbed::builder().backends(2).pinned().start();
    tb.setup_service(&["b1", "b2"]);
    let pin_dir = tb.pin_dir().expect("pinned");
    assert!(pin_dir.join("link").exists());
    assert!(tb.stop_daemon().success());
    assert!(
        !xdp_attached(&tb.lb, "eth0"),
        "XDP still attached after a clean stop"
    );
    assert!(
        !pin_dir.exists(),
        "pins left behind in {}",
        pin_dir.display()
    );

    // The configuration was saved: a new daemon brings the service back by itself.
    tb.start_daemon_again(&[]);
    tb.wait_in_table(&["b1", "b2"], true, Duration::from_secs(15));
    let tally = tb.request_many(40);
    tally.assert_all_ok("after a clean restart");

    // --fresh starts empty.
    assert!(tb.stop_daemon().success());
    tb.start_daemon_again(&["--fresh"]);
    let status = tb.status_json();
    assert_eq!(
        status["services"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
}

#[test]
fn a_pinned_data_plane_without_its_state_is_refused_clearly() {
    let mut tb = Testbed::builder()
        .backends(1)
        .pinned()
        .daemon_arg("--keep-on-exit")
        .start();
    tb.setup_service(&["b1"]);
    tb.kill_daemon();
    std::fs::remove_file(tb.api.with_file_name("state.json")).expect("state file exists");
    let out = Command::new("ip")
        .args(["netns", "exec", &tb.lb, env!("CARGO_BIN_EXE_lb")])
        .arg("--api")
        .arg(tb.dir.join("other.sock"))
        .args(["daemon", "--iface", "eth0", "--pin-dir"])
        .arg(tb.pin_dir().expect("pinned"))
        .output()
        .expect("run lb daemon");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no saved state"), "{stderr}");
    assert!(
        xdp_attached(&tb.lb, "eth0"),
        "a refused start must not touch the data plane"
    );
}

#[test]
fn an_incompatible_pinned_map_refuses_the_start_and_touches_nothing() {
    let tb = Testbed::builder()
        .backends(1)
        .pinned()
        .without_balancer()
        .start();
    let maps = tb.pin_dir().expect("pinned").join("maps");
    std::fs::create_dir_all(&maps).expect("maps dir");
    // What another version could have left: the services map as this one has it, and a
    // connection table whose sets are 128 bytes (this version's are 64).
    let create = |name: &str, kind: &str, key: &str, value: &str, entries: &str, flags: &str| {
        let path = maps.join(name);
        let status = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args(["type", kind, "key", key, "value", value, "entries", entries])
            .args(["name", name, "flags", flags])
            .status()
            .expect("bpftool");
        assert!(status.success(), "bpftool map create {name}");
    };
    // One service: its ring map holds 2 tables of 4097 chunks.
    create("SERVICES", "hash", "8", "12", "1", "0");
    create("BACKENDS", "array", "4", "36", "16", "0");
    create("RINGS", "array", "4", "64", "8194", "1024");
    create("FLOWS", "array", "4", "128", "1024", "1024");
    let out = Command::new("ip")
        .args(["netns", "exec", &tb.lb, env!("CARGO_BIN_EXE_lb")])
        .arg("--api")
        .arg(tb.dir.join("lb.sock"))
        .args(["daemon", "--iface", "eth0", "--pin-dir"])
        .arg(tb.pin_dir().expect("pinned"))
        .output()
        .expect("run lb daemon");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pinned map FLOWS") && stderr.contains("value size 128"),
        "{stderr}"
    );
    assert!(
        !xdp_attached(&tb.lb, "eth0"),
        "a refused start attached XDP"
    );
    assert!(
        maps.join("FLOWS").exists(),
        "the old map was left as it was"
    );
}

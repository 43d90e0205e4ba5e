//! The configuration file end to end: `lb daemon --config FILE` over the namespace test bed,
//! with real HTTP. The file is edited while connections stay open, and applied with
//! `lb reload` and with SIGHUP; a broken file is refused with its line and changes nothing;
//! CLI changes made at runtime are undone by the next reload; `lb config dump` reloads to no
//! change; a restart with the same file moves no connection.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{
    Connection, HC_FALL, HC_INTERVAL, HC_RISE, HC_TIMEOUT, LB_BIN, SERVICE, Testbed, config_view,
    find_backend, find_service, wait_until,
};

/// A directory for a test's configuration file (the file must exist before the daemon starts,
/// so it cannot live in the test bed's own directory). Removed on drop.
struct ConfigDir(PathBuf);

impl ConfigDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        ConfigDir(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("lb.toml")
    }

    fn write(&self, text: &str) {
        std::fs::write(self.file(), text)
            .unwrap_or_else(|e| panic!("{}: {e}", self.file().display()));
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test service with backends `(ip, weight)`, health-checked as the other e2e tests do.
fn config(backends: &[(String, u32)]) -> String {
    let mut text = format!(
        "# test configuration\n[daemon]\ninterface = \"eth0\"\n\n[[service]]\n\
         address = \"{SERVICE}\"\nscheduler = \"maglev\"\nforward = \"dsr\"\n\
         [service.health_check]\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nrise = {HC_RISE}\n\
         fall = {HC_FALL}\n",
        HC_INTERVAL.as_millis(),
        HC_TIMEOUT.as_millis()
    );
    for (ip, weight) in backends {
        text += &format!("\n[[service.backend]]\naddress = \"{ip}\"\nweight = {weight}\n");
    }
    text
}

/// `count` keep-alive connections to the VIP, each with the backend that answered it.
fn open_connections(tb: &Testbed, count: usize) -> Vec<(Connection, String)> {
    (0..count)
        .map(|i| {
            let mut c = tb
                .connect()
                .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
            let b = c
                .request()
                .unwrap_or_else(|e| panic!("first request on {i}: {e:#}"));
            (c, b)
        })
        .collect()
}

/// Sends a request on each connection; panics listing those that failed or changed backend.
fn assert_connections_kept(conns: &mut [(Connection, String)], when: &str) {
    let mut broken = Vec::new();
    for (i, (c, want)) in conns.iter_mut().enumerate() {
        match c.request() {
            Ok(got) if got == *want => {}
            Ok(got) => broken.push(format!("#{i} port {}: {want} -> {got}", c.local_port())),
            Err(e) => broken.push(format!("#{i} port {}: {want} -> {e:#}", c.local_port())),
        }
    }
    assert!(
        broken.is_empty(),
        "{when}: {} of {} keep-alive connections broke or moved: {broken:#?}",
        broken.len(),
        conns.len()
    );
}

fn backend_weight(tb: &Testbed, name: &str) -> Option<u64> {
    tb.backend_status(name).and_then(|b| b["weight"].as_u64())
}

/// The 1-based line of the `nth` (0-based) occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    let (at, _) = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} #{nth} not in the file"));
    text[..at].matches('\n').count() + 1
}

#[test]
fn reload_applies_the_file_and_open_connections_keep_their_backends() {
    let dir = ConfigDir::new("reload");
    let file = dir.file();
    let file_arg = file.to_string_lossy().into_owned();
    let b = |n: usize| common::backend_ip(n).to_string();
    dir.write(&config(&[(b(1), 1), (b(2), 1)]));

    let tb = Testbed::builder()
        .backends(3)
        .daemon_arg("--config")
        .daemon_arg(&file_arg)
        .start();
    tb.wait_in_table(&["b1", "b2"], true, Duration::from_secs(15));
    let t = tb.request_many(40);
    t.assert_all_ok("requests with the file's two backends");
    assert!(
        t.count("b1") > 0 && t.count("b2") > 0 && t.count("b3") == 0,
        "{:?}",
        t.counts
    );
    assert!(tb.daemon_log().contains("configuration applied"));

    let mut conns = open_connections(&tb, 20);

    // Add b3, weigh b1 twice: `lb reload` applies exactly that.
    dir.write(&config(&[(b(1), 2), (b(2), 1), (b(3), 1)]));
    let out = tb.lb_ok(&["reload"]);
    assert_eq!(
        out,
        format!(
            "reloaded {file_arg}: 2 change(s)\n  {SERVICE}: backend {} added (weight 1)\n  \
             {SERVICE}: backend {} now weight 2\n",
            b(3),
            b(1)
        )
    );
    tb.wait_in_table(&["b3"], true, Duration::from_secs(15));
    assert_eq!(backend_weight(&tb, "b1"), Some(2));
    assert_connections_kept(&mut conns, "after `lb reload` added b3");
    // 200: with weights 2:1:1, b1 gets no more than b2 once in 10^5 runs (at 100, once in 800).
    let n = 200;
    let t = tb.request_many(n);
    t.assert_all_ok("new connections after the reload");
    eprintln!("after adding b3 and weighing b1 2: {:?}", t.counts);
    assert!(t.count("b3") * 10 >= n, "b3 got {:?}", t.counts);
    assert!(
        t.count("b1") > t.count("b2"),
        "weight 2 vs 1: {:?}",
        t.counts
    );

    // A broken file: one line naming file and line, non-zero exit, nothing changed.
    let before = config_view(&tb.status_json());
    let good = config(&[(b(1), 2), (b(2), 1), (b(3), 1)]);
    let broken = format!(
        "{}\n[[service.backend]]\naddress = \"{}\"\n",
        config(&[(b(1), 2), (b(3), 1)]),
        b(1)
    );
    dir.write(&broken);
    let err = tb.lb_err(&["reload"]);
    assert_eq!(
        err,
        format!(
            "error: {file_arg}:{}: duplicate backend {} in service {SERVICE} (first declared at \
             line {})",
            line_of(&broken, &format!("address = \"{}\"", b(1)), 1),
            b(1),
            line_of(&broken, &format!("address = \"{}\"", b(1)), 0),
        )
    );
    assert!(
        tb.daemon_log()
            .contains("reload refused, running state unchanged")
    );
    dir.write("[[service]]\naddress = \"10.200.0.10:80/tcp\"\nbackends = []\n");
    let err = tb.lb_err(&["reload"]);
    assert!(
        err.starts_with(&format!("error: {file_arg}:3: unknown field `backends`")),
        "{err}"
    );
    assert_eq!(
        config_view(&tb.status_json()),
        before,
        "a refused reload changed the state"
    );
    assert_connections_kept(&mut conns, "after refused reloads");

    // SIGHUP: b2 leaves; the others keep their connections.
    dir.write(&config(&[(b(1), 2), (b(3), 1)]));
    tb.signal_daemon(libc::SIGHUP);
    let gone = wait_until(Duration::from_secs(10), || {
        find_backend(&tb.status_json(), SERVICE, &b(2)).is_none()
    });
    assert!(
        gone.is_some(),
        "SIGHUP did not remove b2:\n{}",
        tb.daemon_log()
    );
    assert!(
        tb.daemon_log()
            .contains("SIGHUP: reloading the configuration")
    );
    conns.retain(|(_, backend)| backend != "b2");
    assert!(!conns.is_empty());
    assert_connections_kept(&mut conns, "after SIGHUP removed b2");
    let t = tb.request_many(30);
    t.assert_all_ok("after SIGHUP");
    assert_eq!(t.count("b2"), 0, "{:?}", t.counts);

    // Back to the good file, and a dump of the running state reloads to no change.
    dir.write(&good);
    tb.lb_ok(&["reload"]);
    let dump = tb.lb_ok(&["config", "dump"]);
    dir.write(&dump);
    assert_eq!(
        tb.lb_ok(&["reload"]),
        format!("reloaded {file_arg}: no change\n")
    );
    let svc = find_service(&tb.status_json(), SERVICE)
        .cloned()
        .expect("service");
    assert_eq!(
        svc["health_check"]["interval"],
        HC_INTERVAL.as_millis() as u64
    );
}

#[test]
fn runtime_cli_changes_last_until_the_next_reload() {
    let dir = ConfigDir::new("runtime");
    let file_arg = dir.file().to_string_lossy().into_owned();
    let b = |n: usize| common::backend_ip(n).to_string();
    dir.write(&config(&[(b(1), 1)]));
    let tb = Testbed::builder()
        .backends(2)
        .daemon_arg("--config")
        .daemon_arg(&file_arg)
        .start();
    tb.wait_in_table(&["b1"], true, Duration::from_secs(15));

    // The CLI changes the running state (and `lb config dump` shows it)...
    tb.add_backend("b2");
    tb.wait_in_table(&["b2"], true, Duration::from_secs(15));
    let dump = tb.lb_ok(&["config", "dump"]);
    assert!(dump.contains(&format!("address = \"{}\"", b(2))), "{dump}");
    let out = Command::new(LB_BIN)
        .args(["config", "check"])
        .arg(write_to(&dir.0.join("dump.toml"), &dump))
        .output()
        .expect("lb config check");
    assert!(out.status.success(), "{out:?}");

    // ...until the next reload, which makes it what the file says again, and warns.
    let mut conns = open_connections(&tb, 10);
    let out = tb.lb_ok(&["reload"]);
    assert!(
        out.contains(&format!("{SERVICE}: backend {} removed", b(2))),
        "{out}"
    );
    assert!(
        tb.daemon_log()
            .contains("reload undoes a change made at runtime"),
        "{}",
        tb.daemon_log()
    );
    assert!(tb.backend_status("b2").is_none());
    conns.retain(|(_, backend)| backend == "b1");
    assert_connections_kept(&mut conns, "b1's connections after the reload");
}

#[test]
fn a_restart_with_the_same_file_moves_no_connection() {
    let dir = ConfigDir::new("restart");
    let file_arg = dir.file().to_string_lossy().into_owned();
    let b = |n: usize| common::backend_ip(n).to_string();
    dir.write(&config(&[(b(1), 1), (b(2), 1), (b(3), 1)]));
    let mut tb = Testbed::builder()
        .backends(3)
        .pinned()
        .daemon_arg("--config")
        .daemon_arg(&file_arg)
        .start();
    tb.wait_in_table(&["b1", "b2", "b3"], true, Duration::from_secs(15));
    let mut conns = open_connections(&tb, 20);

    tb.kill_daemon();
    assert_connections_kept(&mut conns, "while the daemon is down");
    tb.start_daemon_again(&[]);
    let log = tb.daemon_log();
    let applied = log
        .lines()
        .rfind(|l| l.contains("configuration applied"))
        .unwrap_or_default();
    assert!(
        applied.contains("changes=0"),
        "a restart with the same file changed something:\n{log}"
    );
    assert_connections_kept(&mut conns, "after the restart");
    tb.wait_in_table(&["b1", "b2", "b3"], true, Duration::from_secs(15));
    tb.request_many(30).assert_all_ok("after the restart");
}

fn write_to(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path.to_owned()
}

/// A bad file stops the daemon from starting, before it touches anything, with the same
/// one-line error; `lb config check` reports it too. (No namespaces needed.)
#[test]
fn a_bad_file_refuses_the_start_and_fails_the_check() {
    let dir = ConfigDir::new("bad");
    let file = dir.file();
    let file_arg = file.to_string_lossy().into_owned();
    // An interface that does not exist: were the file accepted, nothing would be attached.
    dir.write("[daemon]\ninterface = \"lbtest-none\"\n\n[[service]]\naddress = \"10.200.0.10:80/tcp\"\nhealth_check = { rise = 0 }\n");
    let want = format!("{file_arg}:6: rise 0 is out of range (1 to 100 checks)");

    let out = Command::new(LB_BIN)
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("lb config check");
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("error: {want}")
    );

    let api = dir.0.join("lb.sock");
    let out = Command::new(LB_BIN)
        .arg("--api")
        .arg(&api)
        .args(["daemon", "--config"])
        .arg(&file)
        .output()
        .expect("lb daemon");
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("error: {want}")
    );
    assert!(!api.exists(), "the refused daemon created its socket");

    dir.write(&config(&[(common::backend_ip(1).to_string(), 1)]));
    let out = Command::new(LB_BIN)
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("lb config check");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{file_arg}: ok (1 service(s), 1 backend(s))\n")
    );
}

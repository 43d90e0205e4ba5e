//! Observability end to end: `lb daemon --metrics` scraped from inside the balancer's namespace
//! against `lb status --json`, `lb stats` rates while real traffic flows, state changes logged
//! once, and the packaging aids (`lb --version`, `lb completions`). The topology is described in
//! `common/mod.rs`. The namespace tests need root; without it they fail and say why.
#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    HC_FALL, HC_INTERVAL, LB_BIN, SERVICE, Testbed, as_u64, find_backend, find_service, http,
    netns, vip_addr,
};
use serde_json::Value;

/// Where the tests' daemons serve metrics: loopback of the balancer's own namespace, so tests
/// running in parallel do not collide.
const METRICS_ADDR: &str = "127.0.0.1:9100";

const FAMILIES: [(&str, &str); 7] = [
    ("lb_service_packets_total", "counter"),
    ("lb_service_bytes_total", "counter"),
    ("lb_backend_packets_total", "counter"),
    ("lb_backend_bytes_total", "counter"),
    ("lb_backend_up", "gauge"),
    ("lb_backend_in_table", "gauge"),
    ("lb_packets_total", "counter"),
];

/// `method path` over HTTP/1.1 to `addr` from inside namespace `ns`; returns the status code
/// and the body.
fn http_in(ns: &str, addr: &str, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
    let text = netns::run_in(ns, move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of header in the answer:\n{text}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in the answer:\n{head}"));
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
    {
        assert_eq!(len.parse::<usize>().ok(), Some(body.len()), "{head}");
    }
    Ok((code, body.to_owned()))
}

fn scrape(tb: &Testbed) -> String {
    let (code, body) = http_in(&tb.lb, METRICS_ADDR, "GET", "/metrics")
        .unwrap_or_else(|e| panic!("scraping {METRICS_ADDR} in {}: {e}", tb.lb));
    assert_eq!(code, 200, "GET /metrics:\n{body}");
    body
}

/// Checks the exposition's shape (every family described once, before its samples; every
/// sample of a described family) and returns its samples, `name{labels}` → value.
fn parse_exposition(text: &str) -> BTreeMap<String, u64> {
    let mut described: BTreeMap<&str, &str> = BTreeMap::new();
    let mut helped = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a text");
            assert!(!help.is_empty(), "empty HELP for {name}");
            helped.push(name);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(
                described.insert(name, kind).is_none(),
                "{name} described twice"
            );
        } else {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let name = series.split('{').next().unwrap_or_default();
            assert!(
                described.contains_key(name),
                "sample before (or without) its TYPE line: {line}"
            );
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("not an integer value: {line}"));
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "series twice: {series}"
            );
        }
    }
    for (name, kind) in FAMILIES {
        assert_eq!(described.get(name), Some(&kind), "TYPE of {name}:\n{text}");
        assert!(helped.contains(&name), "no HELP for {name}:\n{text}");
    }
    samples
}

fn metric(samples: &BTreeMap<String, u64>, series: &str) -> u64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in {samples:#?}"))
}

fn backend_series(name: &str, ip: &str) -> String {
    format!("{name}{{service=\"{SERVICE}\",backend=\"{ip}\"}}")
}

/// `lb status` twice, with the scrape in between: every counter in the scrape must lie between
/// the two statuses (the program counts health-check replies all the time, so equality is only
/// expected of the service counters once the client is idle).
fn check_scrape_against_status(tb: &Testbed) -> BTreeMap<String, u64> {
    let before = tb.status_json();
    let samples = parse_exposition(&scrape(tb));
    let after = tb.status_json();
    let between = |what: &str, b: &Value, m: u64, a: &Value| {
        let (b, a) = (as_u64(b), as_u64(a));
        assert!(
            b <= m && m <= a,
            "{what}: scrape {m}, status before {b}, after {a}"
        );
    };

    let (sb, sa) = (
        find_service(&before, SERVICE).expect("service in status"),
        find_service(&after, SERVICE).expect("service in status"),
    );
    for (field, name) in [
        ("packets", "lb_service_packets_total"),
        ("bytes", "lb_service_bytes_total"),
    ] {
        let series = format!("{name}{{service=\"{SERVICE}\"}}");
        between(&series, &sb[field], metric(&samples, &series), &sa[field]);
    }
    let backends = sa["backends"].as_array().expect("backends array");
    assert_eq!(
        samples
            .keys()
            .filter(|k| k.starts_with("lb_backend_packets_total{"))
            .count(),
        backends.len(),
        "one backend series per backend in status"
    );
    for b in backends {
        let ip = b["ip"].as_str().expect("backend ip");
        let bb = find_backend(&before, SERVICE, ip).expect("backend in the first status");
        for (field, name) in [
            ("packets", "lb_backend_packets_total"),
            ("bytes", "lb_backend_bytes_total"),
        ] {
            let series = backend_series(name, ip);
            between(&series, &bb[field], metric(&samples, &series), &b[field]);
        }
        assert_eq!(
            metric(&samples, &backend_series("lb_backend_up", ip)),
            u64::from(b["health"] == "up"),
            "lb_backend_up of {ip}: {b}"
        );
        assert_eq!(
            metric(&samples, &backend_series("lb_backend_in_table", ip)),
            u64::from(b["in_table"] == true),
            "lb_backend_in_table of {ip}: {b}"
        );
    }
    let counters = after["counters"].as_object().expect("counters object");
    assert!(!counters.is_empty());
    for (reason, n) in counters {
        let series = format!("lb_packets_total{{reason=\"{reason}\"}}");
        between(
            &series,
            &before["counters"][reason],
            metric(&samples, &series),
            n,
        );
    }
    assert_eq!(
        samples
            .keys()
            .filter(|k| k.starts_with("lb_packets_total{"))
            .count(),
        counters.len(),
        "one lb_packets_total series per counter in status"
    );
    samples
}

/// Lines of the daemon log that report `event` for backend `ip`.
fn log_lines(tb: &Testbed, event: &str, ip: &str) -> usize {
    let needle = format!("backend={ip}");
    tb.daemon_log()
        .lines()
        .filter(|l| l.contains(event) && l.contains(&needle))
        .count()
}

/// The scrape agrees with `lb status --json` before any service, after real traffic and after
/// a backend fails; other paths get 404; each health change is logged once, not per probe.
#[test]
fn metrics_match_status_and_health_changes_are_logged_once() {
    let mut tb = Testbed::builder()
        .backends(2)
        .daemon_arg("--metrics")
        .daemon_arg(METRICS_ADDR)
        .start();

    // No service yet: every family is described, and there is no service or backend sample.
    let samples = parse_exposition(&scrape(&tb));
    assert!(
        samples.keys().all(|k| k.starts_with("lb_packets_total{")),
        "samples without any service: {samples:#?}"
    );
    let (code, body) = http_in(&tb.lb, METRICS_ADDR, "GET", "/").expect("GET /");
    assert_eq!(code, 404, "GET /: {body}");
    let (code, _) = http_in(&tb.lb, METRICS_ADDR, "GET", "/metricsx").expect("GET /metricsx");
    assert_eq!(code, 404);

    tb.setup_service(&["b1", "b2"]);
    let n = 100;
    let t = tb.request_many(n);
    t.assert_all_ok("requests to the VIP");
    // Let the last FIN/ACKs through, so the service counters are still while we compare.
    let mut last = None;
    common::wait_until(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(200));
        let st = tb.status_json();
        let now = find_service(&st, SERVICE).map(|s| s["packets"].clone());
        std::mem::replace(&mut last, now.clone()) == now
    })
    .expect("the service counters did not settle after the client stopped");

    let samples = check_scrape_against_status(&tb);
    let svc = metric(
        &samples,
        &format!("lb_service_packets_total{{service=\"{SERVICE}\"}}"),
    );
    assert!(
        svc >= 3 * n as u64,
        "{svc} service packets for {n} connections"
    );
    let (b1, b2) = (tb.ip_of("b1"), tb.ip_of("b2"));
    let per_backend: u64 = [&b1, &b2]
        .iter()
        .map(|ip| metric(&samples, &backend_series("lb_backend_packets_total", ip)))
        .sum();
    assert_eq!(
        per_backend, svc,
        "backend packets must add up to the service's"
    );
    for ip in [&b1, &b2] {
        assert_eq!(metric(&samples, &backend_series("lb_backend_up", ip)), 1);
        assert_eq!(
            metric(&samples, &backend_series("lb_backend_in_table", ip)),
            1
        );
    }
    assert!(metric(&samples, "lb_packets_total{reason=\"forwarded\"}") >= svc);

    // b2 fails: the gauges follow, and the change is logged once however many probes fail.
    tb.backend_mut("b2").server.stop();
    tb.wait_in_table(
        &["b2"],
        false,
        HC_INTERVAL * HC_FALL + Duration::from_secs(3),
    );
    std::thread::sleep(HC_INTERVAL * 6);
    let samples = check_scrape_against_status(&tb);
    assert_eq!(metric(&samples, &backend_series("lb_backend_up", &b2)), 0);
    assert_eq!(
        metric(&samples, &backend_series("lb_backend_in_table", &b2)),
        0
    );
    assert_eq!(metric(&samples, &backend_series("lb_backend_up", &b1)), 1);
    assert_eq!(
        log_lines(&tb, "backend is down", &b2),
        1,
        "b2's failure should be logged once:\n{}",
        tb.daemon_log()
    );
    assert_eq!(
        log_lines(&tb, "backend is up", &b1),
        1,
        "b1 came up once:\n{}",
        tb.daemon_log()
    );
    assert_eq!(log_lines(&tb, "backend is down", &b1), 0);
}

/// Without `--metrics` nothing listens; an address the daemon cannot bind fails its start with
/// a message that names the metrics endpoint, before anything is attached.
#[test]
fn metrics_are_off_unless_asked_and_a_bad_address_fails_the_start() {
    let tb = Testbed::builder().backends(0).start();
    let refused = http_in(&tb.lb, METRICS_ADDR, "GET", "/metrics");
    assert!(
        refused.is_err(),
        "something answers on {METRICS_ADDR} without --metrics: {refused:?}"
    );
    assert!(
        !tb.daemon_log().contains("Prometheus"),
        "{}",
        tb.daemon_log()
    );

    // 10.99.0.99 is on the segment but no interface of the balancer holds it.
    let api = tb.dir.join("second.sock");
    let out = netns::run_timeout(
        Command::new("ip")
            .args(["netns", "exec", &tb.lb, LB_BIN, "--api"])
            .arg(&api)
            .args(["daemon", "--iface", "eth0", "--metrics", "10.99.0.99:9100"]),
        Duration::from_secs(15),
    );
    let err = common::assert_cli_error("lb daemon --metrics 10.99.0.99:9100", &out);
    assert!(
        err.contains("binding the metrics endpoint 10.99.0.99:9100"),
        "{err}"
    );
    assert!(
        !api.exists(),
        "the failed daemon left {} behind",
        api.display()
    );
    // The first daemon still serves.
    tb.lb_ok(&["status"]);
}

/// Background HTTP load from the client until dropped: one new connection after another.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(client: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f, ns) = (stop.clone(), ok.clone(), failed.clone(), client.to_owned());
        let thread = std::thread::spawn(move || {
            // Bounded in time whatever happens to the test.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match http::get_in(&ns, vip_addr()) {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(_) => f.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Load {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops the load; returns (requests answered, requests failed).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn parse_sample(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON sample ({e}): {line}"))
}

fn service_pps(sample: &Value) -> f64 {
    sample["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == SERVICE))
        .and_then(|s| s["packets_per_sec"].as_f64())
        .unwrap_or_else(|| panic!("no packets_per_sec for {SERVICE} in {sample}"))
}

/// `lb stats --json` reports non-zero packet and byte rates per service and backend while
/// requests flow, `--watch` prints a sample per interval until Ctrl-C, and the rates fall to
/// zero once the client stops.
#[test]
fn stats_reports_rates_while_traffic_flows() {
    let tb = Testbed::builder().backends(2).start();
    tb.setup_service(&["b1", "b2"]);
    let load = Load::start(&tb.client);

    let out = tb.lb_ok(&["stats", "--json", "--interval", "1s"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one sample without --watch:\n{out}");
    let sample = parse_sample(lines[0]);
    eprintln!("STATS under load: {sample}");
    let interval = sample["interval_secs"].as_f64().expect("interval_secs");
    assert!((0.9..5.0).contains(&interval), "interval {interval}");
    let svc = sample["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == SERVICE))
        .expect("the service in the sample");
    let pps = svc["packets_per_sec"].as_f64().expect("packets_per_sec");
    assert!(pps > 0.0, "no packet rate under load: {svc}");
    assert!(
        svc["bytes_per_sec"].as_f64().expect("bytes_per_sec") >= pps * 40.0,
        "{svc}"
    );
    let backends = svc["backends"].as_array().expect("backends");
    assert_eq!(backends.len(), 2, "{svc}");
    let busy = backends
        .iter()
        .filter(|b| b["packets_per_sec"].as_f64().is_some_and(|r| r > 0.0))
        .count();
    assert!(busy >= 1, "no backend has a packet rate: {svc}");
    let forwarded = sample["packets_per_sec_by_reason"]["forwarded"]
        .as_f64()
        .expect("forwarded rate");
    assert!(forwarded > 0.0, "{sample}");

    // The table for people names the service and both backends.
    let table = tb.lb_ok(&["stats", "--interval", "500ms"]);
    assert!(table.contains("PACKETS/S"), "{table}");
    assert!(table.contains(SERVICE), "{table}");
    for b in ["b1", "b2"] {
        assert!(table.contains(&tb.ip_of(b)), "{table}");
    }

    // --watch: one JSON line per interval until SIGINT (what Ctrl-C sends).
    let mut watch = Command::new(LB_BIN)
        .arg("--api")
        .arg(&tb.api)
        .args(["stats", "--watch", "--json", "--interval", "300ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lb stats --watch");
    std::thread::sleep(Duration::from_millis(1600));
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(watch.id() as libc::pid_t, libc::SIGINT) };
    let start = Instant::now();
    let status = loop {
        if let Some(st) = watch.try_wait().expect("waiting for lb stats --watch") {
            break st;
        }
        if start.elapsed() > Duration::from_secs(5) {
            let _ = watch.kill();
            panic!("lb stats --watch ignored SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = String::new();
    watch
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut text)
        .expect("reading lb stats --watch");
    let samples: Vec<Value> = text.lines().map(parse_sample).collect();
    assert!(
        samples.len() >= 3,
        "{} samples in 1.6 s at 300 ms ({status}):\n{text}",
        samples.len()
    );
    assert!(
        samples.iter().all(|s| service_pps(s) > 0.0),
        "a sample under load without a packet rate:\n{text}"
    );

    let (ok, failed) = load.finish();
    eprintln!("LOAD: {ok} requests answered, {failed} failed");
    assert!(ok > 0, "the load answered nothing");
    assert_eq!(failed, 0, "requests failed under load");
    // Idle now: the rates fall to zero.
    std::thread::sleep(Duration::from_millis(300));
    let idle = parse_sample(tb.lb_ok(&["stats", "--json", "--interval", "500ms"]).trim());
    assert_eq!(
        service_pps(&idle),
        0.0,
        "a packet rate with no traffic: {idle}"
    );
}

/// `lb --version` names the crate's version; each completion script is valid in its shell (a
/// shell that is not installed is skipped, and says so).
#[test]
fn version_and_completions_work() {
    let out = Command::new(LB_BIN)
        .arg("--version")
        .output()
        .expect("running lb --version");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("lb {}", env!("CARGO_PKG_VERSION"))
    );

    for (shell, check) in [
        ("bash", &["-n"][..]),
        ("zsh", &["-n"][..]),
        ("fish", &["--no-execute"][..]),
    ] {
        let out = Command::new(LB_BIN)
            .args(["completions", shell])
            .output()
            .expect("running lb completions");
        assert!(out.status.success(), "lb completions {shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("stats") && script.contains("daemon"),
            "{shell}"
        );
        let path =
            std::env::temp_dir().join(format!("lb-completion-{}.{shell}", std::process::id()));
        std::fs::write(&path, script.as_bytes()).expect("writing the script");
        let checked = Command::new(shell).args(check).arg(&path).output();
        let _ = std::fs::remove_file(&path);
        match checked {
            Ok(o) => assert!(
                o.status.success(),
                "`{shell} {}` rejects the completion script: {}",
                check.join(" "),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("SKIPPED: {shell} is not installed; its completion script is unchecked")
            }
            Err(e) => panic!("running {shell}: {e}"),
        }
    }
    // And bash really completes: `lb st<TAB>` offers stats and status.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <({LB_BIN} completions bash) && COMP_WORDS=(lb st) COMP_CWORD=1 \
             COMP_LINE='lb st' COMP_POINT=5 && _lb lb st lb && echo \"${{COMPREPLY[@]}}\""
        ))
        .output()
        .expect("running bash");
    let offered = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && offered.contains("stats") && offered.contains("status"),
        "bash offers {offered:?} for `lb st`: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(LB_BIN)
        .args(["completions", "nosuchshell"])
        .output()
        .expect("running lb completions");
    common::assert_cli_error("lb completions nosuchshell", &out);
}

/// The packaged unit is valid for systemd, and the daemon flags its defaults file passes parse.
#[test]
fn packaged_unit_and_defaults_are_valid() {
    use clap::Parser as _;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let unit = std::fs::read_to_string(root.join("packaging/lb.service")).expect("lb.service");
    let defaults = std::fs::read_to_string(root.join("packaging/lb.default")).expect("lb.default");
    assert!(
        unit.contains("\nExecStart=/usr/local/bin/lb daemon --iface ${LB_IFACE} $LB_DAEMON_ARGS\n"),
        "{unit}"
    );
    assert!(
        unit.contains("\nEnvironmentFile=/etc/default/lb\n"),
        "{unit}"
    );

    // What systemd would run with the defaults file as shipped.
    let var = |name: &str| {
        defaults
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} not set in lb.default"))
            .trim_matches('"')
            .to_owned()
    };
    let iface = var("LB_IFACE");
    let extra = var("LB_DAEMON_ARGS");
    let argv: Vec<&str> = ["lb", "daemon", "--iface", &iface]
        .into_iter()
        .chain(extra.split_whitespace())
        .collect();
    let cli = lb_userspace::cli::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?} does not parse: {e}"));
    let lb_userspace::cli::Command::Daemon(args) = cli.command else {
        panic!("{argv:?} is not `lb daemon`");
    };
    assert_eq!(args.iface, [iface]);
    assert_eq!(
        args.metrics,
        Some("127.0.0.1:9100".parse().expect("address"))
    );

    // systemd's own check, on a copy whose binary and defaults file exist here.
    let dir = std::env::temp_dir().join(format!("lb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let copy = dir.join("lb.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/lb", LB_BIN).replace(
            "EnvironmentFile=/etc/default/lb",
            &format!(
                "EnvironmentFile={}",
                root.join("packaging/lb.default").display()
            ),
        ),
    )
    .expect("writing the unit copy");
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    match verified {
        Ok(o) => assert!(
            o.status.success() && o.stderr.is_empty(),
            "systemd-analyze verify lb.service: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: systemd-analyze is not installed; lb.service is not verified")
        }
        Err(e) => panic!("running systemd-analyze: {e}"),
    }
}

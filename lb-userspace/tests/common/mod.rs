//! The namespace test bed for the end-to-end tests: one L2 segment (a bridge in namespace `sw`)
//! joining a client, the balancer host and N backends, each in its own network namespace.
//!
//! ```text
//!   client 10.99.0.1 ──┐
//!   lb     10.99.0.2 ──┤ br0 (ns sw; `lb testbed-wire` on the port facing lb)
//!   b1     10.99.0.11 ─┤
//!   bN     10.99.0.1N ─┘
//! ```
//! The client routes the VIPs (10.200.0.0/24) via the balancer; the balancer's XDP program
//! rewrites MACs and sends SYNs and data back out the same port (L2 direct server return); the
//! backends hold the VIP on `lo` and answer the client directly.
//!
//! Other layouts (`Layout`) put the backends on a second subnet, 10.98.0.0/24 (fd00:98::/64):
//! behind a router namespace for the encapsulating modes (each backend runs `lb decap`), or
//! reached by the balancer itself for NAT, through its one interface or a second one:
//!
//! ```text
//!   Routed:     client, lb, rt(10.99.0.254) on br0;  rt(10.98.0.254), b1..bN on br1
//!   NatOneArm:  client, lb(10.99.0.2 + 10.98.0.2), b1..bN on br0; backends route via lb
//!   NatTwoArm:  client, lb eth0 on br0;  lb eth1 (10.98.0.2), b1..bN on br1
//! ```
//!
//! Namespaces are called `lbt<pid>x<n>-<role>`, so tests run in parallel and a later run can
//! sweep what a killed run left behind. Everything is removed on Drop, also when the test
//! panics; the daemon's log is printed then.
#![allow(
    dead_code,
    reason = "each test binary that includes this module uses a different part of it"
)]

pub mod http;
pub mod netns;
pub mod sink;
pub mod stream;
pub mod udp;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

pub use http::Connection;

/// The binary under test.
pub const LB_BIN: &str = env!("CARGO_BIN_EXE_lb");

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
/// The IPv6 VIP of a dual-stack testbed (`TestbedBuilder::ipv6`), and its service.
pub const VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
pub const SERVICE6: &str = "[fd00:200::10]:80/tcp";

/// The IPv6 address of the host whose IPv4 address is 10.S.0.N: fd00:S::N, S's decimal digits
/// read as hex (10.99.0.2 → fd00:99::2, 10.98.0.11 → fd00:98::b).
pub fn v6_of(v4: Ipv4Addr) -> std::net::Ipv6Addr {
    let o = v4.octets();
    let subnet = u16::from_str_radix(&o[1].to_string(), 16).expect("decimal digits are hex");
    std::net::Ipv6Addr::new(0xfd00, subnet, 0, 0, 0, 0, 0, u16::from(o[3]))
}

/// Where the backends sit (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One segment with the client and the balancer (L2 DSR).
    L2,
    /// Another subnet behind a router; backends run `lb decap` (ipip, gue).
    Routed,
    /// Another subnet on the balancer's one interface; backends route through it (nat).
    NatOneArm,
    /// Another subnet on the balancer's second interface (nat, fullnat with two interfaces).
    NatTwoArm,
}

/// The router of `Layout::Routed` on the client side, and the backends' gateway there.
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);
pub const ROUTER_BACK_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 254);
/// The balancer's address on the backends' subnet (NAT layouts).
pub const LB_BACK_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
pub const PORT: u16 = 80;
/// The service every test balances.
pub const SERVICE: &str = "10.200.0.10:80/tcp";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

/// Health-check settings the tests use: faster than the defaults (1 s / 1 s / 2 / 2) so a
/// failover test takes a second, not five.
pub const HC_INTERVAL: Duration = Duration::from_millis(250);
pub const HC_TIMEOUT: Duration = Duration::from_millis(250);
pub const HC_RISE: u32 = 2;
pub const HC_FALL: u32 = 2;

/// Time limit for one `lb` CLI call.
const CLI_TIMEOUT: Duration = Duration::from_secs(15);
/// Time limit for the daemon to become ready.
const DAEMON_READY: Duration = Duration::from_secs(30);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
static PREFLIGHT: Once = Once::new();

/// The address of backend number `i` (1-based) on the client's segment (`Layout::L2`).
pub fn backend_ip(i: usize) -> Ipv4Addr {
    let last = u8::try_from(10 + i).expect("at most 245 backends");
    Ipv4Addr::new(10, 99, 0, last)
}

/// The address of backend number `i` in `layout`.
pub fn backend_ip_in(layout: Layout, i: usize) -> Ipv4Addr {
    let ip = backend_ip(i);
    if layout == Layout::L2 {
        ip
    } else {
        let o = ip.octets();
        Ipv4Addr::new(10, 98, 0, o[3])
    }
}

pub fn vip_addr() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, PORT))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes. Returns how long it took.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The e2e tests need root and iproute2/ethtool; without them they fail with the reason (a
/// silent pass would hide that nothing was tested).
fn preflight() {
    PREFLIGHT.call_once(|| {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the end-to-end tests need root (network namespaces, XDP); run them as root"
        );
        for (tool, arg) in [("ip", "-V"), ("ethtool", "--version")] {
            let ok = Command::new(tool)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "`{tool}` is missing; scripts/setup.sh installs it");
        }
        netns::sweep_stale();
    });
}

/// One backend host: its namespace, address and HTTP server.
pub struct Backend {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: String,
    pub server: http::Server,
}

pub struct TestbedBuilder {
    backends: usize,
    balancer: bool,
    xdp_mode: Option<String>,
    daemon_args: Vec<String>,
    pinned: bool,
    ipv6: bool,
    layout: Layout,
}

impl TestbedBuilder {
    /// Where the backends sit (`Layout::L2` by default).
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Dual stack: every host also gets fd00:99::N/64, the backends hold VIP6 too, and the
    /// client routes fd00:200::/64 through the balancer.
    pub fn ipv6(mut self) -> Self {
        self.ipv6 = true;
        self
    }

    /// Pins the data plane on a bpf filesystem of the test's own, mounted in the root mount
    /// namespace (so it outlives each `ip netns exec lb daemon`, as restarts need).
    pub fn pinned(mut self) -> Self {
        self.pinned = true;
        self
    }

    /// Number of backend hosts (b1..bN), each with a running HTTP server. They are not
    /// registered with the balancer; tests do that through the CLI.
    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }

    /// Without the balancer: topology only (no daemon, no wire program).
    pub fn without_balancer(mut self) -> Self {
        self.balancer = false;
        self
    }

    pub fn xdp_mode(mut self, mode: &str) -> Self {
        self.xdp_mode = Some(mode.to_owned());
        self
    }

    /// Extra arguments for `lb daemon`.
    pub fn daemon_arg(mut self, arg: &str) -> Self {
        self.daemon_args.push(arg.to_owned());
        self
    }

    pub fn start(self) -> Testbed {
        preflight();
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{}x{n}", netns::NS_PREFIX, std::process::id());
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut tb = Testbed {
            sw: format!("{id}-sw"),
            client: format!("{id}-client"),
            lb: format!("{id}-lb"),
            api: dir.join("lb.sock"),
            daemon_log: dir.join("daemon.log"),
            wire_log: dir.join("wire.log"),
            id,
            dir,
            namespaces: Vec::new(),
            backends: Vec::new(),
            daemon: None,
            wire: None,
            xdp_mode: self.xdp_mode,
            daemon_args: self.daemon_args,
            bpffs: None,
            ipv6: self.ipv6,
            layout: self.layout,
            decaps: Vec::new(),
            wire2: None,
        };
        // Built in place: if any step panics, Drop removes what exists so far.
        if self.pinned {
            tb.mount_bpffs();
        }
        tb.build_topology(self.backends);
        if self.balancer {
            tb.start_wire();
            tb.start_daemon(&[]);
        }
        tb
    }
}

pub struct Testbed {
    pub id: String,
    pub dir: PathBuf,
    pub sw: String,
    pub client: String,
    pub lb: String,
    /// The daemon's control socket (passed to every CLI call as `--api`).
    pub api: PathBuf,
    daemon_log: PathBuf,
    wire_log: PathBuf,
    /// Every namespace created so far, in creation order.
    namespaces: Vec<String>,
    pub backends: Vec<Backend>,
    daemon: Option<Child>,
    wire: Option<Child>,
    xdp_mode: Option<String>,
    daemon_args: Vec<String>,
    /// The test's own bpffs mount, if pinned.
    bpffs: Option<PathBuf>,
    /// Dual stack (see `TestbedBuilder::ipv6`).
    ipv6: bool,
    pub layout: Layout,
    /// `lb decap` on each backend (`Layout::Routed`).
    decaps: Vec<Child>,
    /// The wire program on the bridge port facing the balancer's second interface.
    wire2: Option<Child>,
}

impl Testbed {
    pub fn builder() -> TestbedBuilder {
        TestbedBuilder {
            backends: 3,
            balancer: true,
            xdp_mode: None,
            daemon_args: Vec::new(),
            pinned: false,
            ipv6: false,
            layout: Layout::L2,
        }
    }

    fn mount_bpffs(&mut self) {
        let dir = self.dir.join("bpffs");
        std::fs::create_dir_all(&dir).expect("creating the bpffs mount point");
        netns::must(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir));
        self.daemon_args.push("--pin-dir".into());
        self.daemon_args
            .push(dir.join("lb").to_string_lossy().into_owned());
        self.bpffs = Some(dir);
    }

    /// The pin directory of a pinned testbed.
    pub fn pin_dir(&self) -> Option<PathBuf> {
        self.bpffs.as_ref().map(|d| d.join("lb"))
    }

    /// SIGKILL: the daemon gets no chance to clean up (a crash).
    pub fn kill_daemon(&mut self) {
        let mut child = self.daemon.take().expect("the daemon is not running");
        child.kill().expect("SIGKILL the daemon");
        child.wait().expect("reaping the daemon");
    }

    /// Sends `signal` to the running daemon (`ip netns exec` execs it, so its pid is the
    /// child's).
    pub fn signal_daemon(&self, signal: libc::c_int) {
        let daemon = self.daemon.as_ref().expect("the daemon is not running");
        // SAFETY: kill(2) on our own child, not yet reaped.
        let rc = unsafe { libc::kill(daemon.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", daemon.id());
    }

    /// Starts the daemon again with the testbed's arguments plus `extra`; waits until ready.
    pub fn start_daemon_again(&mut self, extra: &[&str]) {
        assert!(self.daemon.is_none(), "the daemon is still running");
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        self.start_daemon(&extra);
    }

    // ---- topology -------------------------------------------------------------------------

    fn add_ns(&mut self, name: &str) {
        netns::netns_add(name);
        self.namespaces.push(name.to_owned());
        if self.ipv6 {
            // No duplicate address detection: until it ends (a second or more) a new link-local
            // address is tentative and neighbour discovery from it waits, which stalls the
            // first connections.
            for conf in ["all", "default"] {
                netns::sysctl(name, &format!("net.ipv6.conf.{conf}.accept_dad"), "0");
                netns::sysctl(name, &format!("net.ipv6.conf.{conf}.dad_transmits"), "0");
            }
        } else {
            // No IPv6: router solicitations and DAD would only add noise on the segment.
            netns::sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1");
            netns::sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1");
        }
        netns::ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// Adds host namespace `ns` with `eth0` = `addr`/24, plugged into the bridge through port
    /// `port` (in namespace sw).
    fn add_host(&mut self, ns: &str, port: &str, addr: Ipv4Addr) {
        self.add_ns(ns);
        self.add_link(ns, "eth0", port, "br0", addr);
    }

    /// Plugs `dev` = `addr`/24 of namespace `ns` into `bridge` (in namespace sw) through `port`.
    fn add_link(&mut self, ns: &str, dev: &str, port: &str, bridge: &str, addr: Ipv4Addr) {
        let sw = self.sw.clone();
        netns::ip(&[
            "-n", &sw, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns,
        ]);
        netns::ip(&["-n", &sw, "link", "set", port, "master", bridge, "up"]);
        self.add_addr(ns, dev, addr);
        netns::ip(&["-n", ns, "link", "set", dev, "up"]);
    }

    /// `addr`/24 (and its IPv6 twin on a dual-stack testbed) on `dev`.
    fn add_addr(&self, ns: &str, dev: &str, addr: Ipv4Addr) {
        netns::ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
        if self.ipv6 {
            let v6 = format!("{}/64", v6_of(addr));
            netns::ip(&["-n", ns, "-6", "addr", "add", &v6, "dev", dev, "nodad"]);
        }
    }

    /// A default route via `gw` (both families on a dual-stack testbed).
    fn default_via(&self, ns: &str, gw: Ipv4Addr) {
        netns::ip(&["-n", ns, "route", "add", "default", "via", &gw.to_string()]);
        if self.ipv6 {
            let gw6 = v6_of(gw).to_string();
            netns::ip(&["-n", ns, "-6", "route", "add", "default", "via", &gw6]);
        }
    }

    /// A route to the backends' subnet via `gw`.
    fn backends_via(&self, ns: &str, gw: Ipv4Addr) {
        netns::ip(&[
            "-n",
            ns,
            "route",
            "add",
            "10.98.0.0/24",
            "via",
            &gw.to_string(),
        ]);
        if self.ipv6 {
            let gw6 = v6_of(gw).to_string();
            netns::ip(&["-n", ns, "-6", "route", "add", "fd00:98::/64", "via", &gw6]);
        }
    }

    fn forwarding_on(ns: &str) {
        netns::sysctl(ns, "net.ipv4.ip_forward", "1");
        netns::sysctl(ns, "net.ipv6.conf.all.forwarding", "1");
        for dev in ["all", "default"] {
            netns::sysctl(ns, &format!("net.ipv4.conf.{dev}.rp_filter"), "0");
        }
    }

    /// Partial TX checksums do not survive XDP_TX (ENVIRONMENT.md): hosts whose packets cross
    /// the balancer send full checksums, as frames from a real wire would have.
    fn tx_checksum_off(ns: &str) {
        netns::must(
            Command::new("ip").args(["netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off"]),
        );
    }

    fn build_topology(&mut self, backends: usize) {
        let sw = self.sw.clone();
        self.add_ns(&sw);
        netns::ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        netns::ip(&["-n", &sw, "link", "set", "br0", "up"]);

        let client = self.client.clone();
        self.add_host(&client, "pclient", CLIENT_IP);
        Self::tx_checksum_off(&client);
        netns::ip(&[
            "-n",
            &client,
            "route",
            "add",
            "10.200.0.0/24",
            "via",
            &LB_IP.to_string(),
        ]);

        if self.ipv6 {
            let via = v6_of(LB_IP).to_string();
            netns::ip(&[
                "-n",
                &client,
                "-6",
                "route",
                "add",
                "fd00:200::/64",
                "via",
                &via,
            ]);
        }

        let lb = self.lb.clone();
        self.add_host(&lb, "plb", LB_IP);
        // The client's segment is br0; the backends' is br0 too or br1 (see Layout).
        let backend_bridge = match self.layout {
            Layout::L2 | Layout::NatOneArm => "br0",
            Layout::Routed | Layout::NatTwoArm => {
                netns::ip(&["-n", &sw, "link", "add", "br1", "type", "bridge"]);
                netns::ip(&["-n", &sw, "link", "set", "br1", "up"]);
                "br1"
            }
        };
        let gateway = match self.layout {
            Layout::L2 => None,
            Layout::Routed => {
                let rt = format!("{}-rt", self.id);
                self.add_host(&rt, "prt", ROUTER_IP);
                self.add_link(&rt, "eth1", "prt1", "br1", ROUTER_BACK_IP);
                Self::forwarding_on(&rt);
                self.backends_via(&lb, ROUTER_IP);
                Some(ROUTER_BACK_IP)
            }
            Layout::NatOneArm => {
                self.add_addr(&lb, "eth0", LB_BACK_IP);
                Some(LB_BACK_IP)
            }
            Layout::NatTwoArm => {
                self.add_link(&lb, "eth1", "plb1", "br1", LB_BACK_IP);
                Some(LB_BACK_IP)
            }
        };
        if self.layout != Layout::L2 {
            Self::forwarding_on(&lb);
        }

        for i in 1..=backends {
            let name = format!("b{i}");
            let ns = format!("{}-{name}", self.id);
            let ip = backend_ip_in(self.layout, i);
            self.add_ns(&ns);
            self.add_link(&ns, "eth0", &format!("p{name}"), backend_bridge, ip);
            Self::tx_checksum_off(&ns);
            if let Some(gw) = gateway {
                self.default_via(&ns, gw);
            }
            if matches!(self.layout, Layout::L2 | Layout::Routed) {
                netns::ip(&["-n", &ns, "addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
                if self.ipv6 {
                    let vip6 = format!("{VIP6}/128");
                    netns::ip(&["-n", &ns, "-6", "addr", "add", &vip6, "dev", "lo"]);
                }
                // The usual DSR backend settings: never answer ARP for the VIP held on lo,
                // and never use it as the source of ARP requests.
                for dev in ["all", "eth0"] {
                    netns::sysctl(&ns, &format!("net.ipv4.conf.{dev}.arp_ignore"), "1");
                    netns::sysctl(&ns, &format!("net.ipv4.conf.{dev}.arp_announce"), "2");
                }
            }
            if self.layout == Layout::Routed {
                // Decapsulated packets come in on eth0 from clients routed elsewhere.
                for dev in ["all", "default", "eth0"] {
                    netns::sysctl(&ns, &format!("net.ipv4.conf.{dev}.rp_filter"), "0");
                }
                self.start_decap(&ns);
            }
            let mut server = http::Server::new(&name, &ns, PORT);
            server.start();
            self.backends.push(Backend {
                name,
                ip,
                ns,
                server,
            });
        }
    }

    /// `lb decap --iface eth0` on a backend of `Layout::Routed`; waits until attached.
    fn start_decap(&mut self, ns: &str) {
        let log = self
            .dir
            .join(format!("decap-{}.log", self.decaps.len() + 1));
        let child = Self::spawn_lb(ns, &["decap", "--iface", "eth0"], &log);
        self.decaps.push(child);
        let attached = wait_until(Duration::from_secs(15), || xdp_attached(ns, "eth0"));
        assert!(
            attached.is_some(),
            "`lb decap` did not attach in {ns} within 15 s:\n{}",
            netns::read_lossy(&log)
        );
    }

    /// Starts `lb ARGS` inside namespace `ns` with its output in `log`. The child gets SIGTERM
    /// if this test thread dies without running Drop.
    fn spawn_lb(ns: &str, args: &[&str], log: &Path) -> Child {
        // Appended: a daemon started again adds to the log of the first.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().expect("cloning a file handle");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, LB_BIN])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            );
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", netns::describe(&cmd)))
    }

    /// XDP_TX into a veth is only received when the peer runs an XDP program (ENVIRONMENT.md):
    /// a pass program on the bridge port facing the balancer stands in for the wire.
    fn start_wire(&mut self) {
        if self.layout == Layout::NatTwoArm {
            let sw = self.sw.clone();
            let log = self.dir.join("wire2.log");
            self.wire2 = Some(Self::spawn_lb(
                &sw,
                &["testbed-wire", "--iface", "plb1"],
                &log,
            ));
            let attached = wait_until(Duration::from_secs(15), || xdp_attached(&sw, "plb1"));
            assert!(
                attached.is_some(),
                "`lb testbed-wire` did not attach to plb1 within 15 s:\n{}",
                netns::read_lossy(&log)
            );
        }
        let sw = self.sw.clone();
        let log = self.wire_log.clone();
        self.wire = Some(Self::spawn_lb(
            &sw,
            &["testbed-wire", "--iface", "plb"],
            &log,
        ));
        let attached = wait_until(Duration::from_secs(15), || {
            if let Some(w) = self.wire.as_mut()
                && let Ok(Some(st)) = w.try_wait()
            {
                panic!(
                    "`lb testbed-wire` exited early ({st}):\n{}",
                    netns::read_lossy(&log)
                );
            }
            xdp_attached(&sw, "plb")
        });
        assert!(
            attached.is_some(),
            "`lb testbed-wire` did not attach to plb within 15 s:\n{}",
            netns::read_lossy(&log)
        );
    }

    fn start_daemon(&mut self, extra: &[String]) {
        let lb = self.lb.clone();
        let api = self.api.to_string_lossy().into_owned();
        let mut args = vec!["--api", &api, "daemon", "--iface", "eth0"];
        if self.layout == Layout::NatTwoArm {
            args.extend(["--iface", "eth1"]);
        }
        if let Some(mode) = &self.xdp_mode {
            args.extend(["--xdp-mode", mode]);
        }
        args.extend(self.daemon_args.iter().map(String::as_str));
        args.extend(extra.iter().map(String::as_str));
        let log = self.daemon_log.clone();
        self.daemon = Some(Self::spawn_lb(&lb, &args, &log));
        let ready = wait_until(DAEMON_READY, || {
            if let Some(d) = self.daemon.as_mut()
                && let Ok(Some(st)) = d.try_wait()
            {
                panic!(
                    "`lb daemon` exited early ({st}):\n{}",
                    netns::read_lossy(&log)
                );
            }
            self.api.exists()
                && netns::try_run(
                    Command::new(LB_BIN)
                        .arg("--api")
                        .arg(&self.api)
                        .arg("status"),
                    CLI_TIMEOUT,
                )
                .is_ok_and(|o| o.status.success())
        });
        assert!(
            ready.is_some(),
            "`lb daemon` not ready within {DAEMON_READY:?}:\n{}",
            netns::read_lossy(&log)
        );
    }

    /// Sends SIGTERM to the daemon and waits for it (SIGKILL after 10 s). Returns its exit
    /// status.
    pub fn stop_daemon(&mut self) -> ExitStatus {
        let child = self.daemon.take().expect("the daemon is not running");
        stop_child(child, Duration::from_secs(10)).expect("stopping the daemon")
    }

    pub fn daemon_log(&self) -> String {
        netns::read_lossy(&self.daemon_log)
    }

    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces.clone()
    }

    pub fn backend(&self, name: &str) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name} in this testbed"))
    }

    pub fn backend_mut(&mut self, name: &str) -> &mut Backend {
        self.backends
            .iter_mut()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name} in this testbed"))
    }

    /// The backend's address as the CLI and the status JSON write it.
    pub fn ip_of(&self, name: &str) -> String {
        self.backend(name).ip.to_string()
    }

    // ---- the CLI ----------------------------------------------------------------------------

    /// Runs `lb --api SOCK ARGS...` (from the root namespace: the CLI only talks to the socket).
    pub fn lb(&self, args: &[&str]) -> Output {
        netns::run_timeout(
            Command::new(LB_BIN).arg("--api").arg(&self.api).args(args),
            CLI_TIMEOUT,
        )
    }

    /// `lb ARGS` that must succeed; returns stdout.
    pub fn lb_ok(&self, args: &[&str]) -> String {
        let out = self.lb(args);
        assert!(
            out.status.success(),
            "`lb {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `lb ARGS` that must fail with a one-line message on stderr; returns that line.
    pub fn lb_err(&self, args: &[&str]) -> String {
        let out = self.lb(args);
        assert_cli_error(&format!("lb {}", args.join(" ")), &out)
    }

    pub fn status_json(&self) -> Value {
        let text = self.lb_ok(&["status", "--json"]);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("`lb status --json` printed invalid JSON ({e}):\n{text}"))
    }

    /// Adds [`SERVICE`] with the test health-check settings.
    pub fn add_service(&self) {
        self.add_service_with(SERVICE, &["--scheduler", "maglev", "--forward", "dsr"]);
    }

    /// Adds `service` with the test health-check settings and `args` (mode, scheduler, ...).
    pub fn add_service_with(&self, service: &str, args: &[&str]) {
        let interval = format!("{}ms", HC_INTERVAL.as_millis());
        let timeout = format!("{}ms", HC_TIMEOUT.as_millis());
        let rise = HC_RISE.to_string();
        let fall = HC_FALL.to_string();
        let mut all = vec![
            "service",
            "add",
            service,
            "--hc-interval",
            &interval,
            "--hc-timeout",
            &timeout,
            "--hc-rise",
            &rise,
            "--hc-fall",
            &fall,
        ];
        all.extend_from_slice(args);
        self.lb_ok(&all);
    }

    pub fn add_backend(&self, name: &str) {
        self.lb_ok(&["backend", "add", SERVICE, &self.ip_of(name)]);
    }

    /// Adds [`SERVICE`] and the named backends, and waits until all are in the table.
    pub fn setup_service(&self, names: &[&str]) {
        self.add_service();
        for name in names {
            self.add_backend(name);
        }
        self.wait_in_table(names, true, Duration::from_secs(15));
    }

    /// The status entry of backend `name` of [`SERVICE`], if listed.
    pub fn backend_status(&self, name: &str) -> Option<Value> {
        find_backend(&self.status_json(), SERVICE, &self.ip_of(name)).cloned()
    }

    pub fn in_table(&self, name: &str) -> bool {
        self.backend_status(name)
            .is_some_and(|b| b["in_table"].as_bool() == Some(true))
    }

    /// Waits until every named backend's `in_table` in [`SERVICE`] equals `want`; panics with
    /// the status on timeout. Returns the time it took.
    pub fn wait_in_table(&self, names: &[&str], want: bool, timeout: Duration) -> Duration {
        self.wait_in_table_of(SERVICE, names, want, timeout)
    }

    /// [`Self::wait_in_table`] for any service.
    pub fn wait_in_table_of(
        &self,
        service: &str,
        names: &[&str],
        want: bool,
        timeout: Duration,
    ) -> Duration {
        let ips: Vec<String> = names.iter().map(|n| self.ip_of(n)).collect();
        let ok = wait_until(timeout, || {
            let st = self.status_json();
            ips.iter().all(|ip| {
                find_backend(&st, service, ip)
                    .is_some_and(|b| b["in_table"].as_bool() == Some(want))
            })
        });
        ok.unwrap_or_else(|| {
            panic!(
                "{service}: backends {names:?} not in_table={want} within {timeout:?}; status:\n{:#}",
                self.status_json()
            )
        })
    }

    // ---- traffic ----------------------------------------------------------------------------

    /// One GET to `addr` from the client on a new connection; returns the body (backend name).
    pub fn get(&self, addr: SocketAddr) -> Result<String> {
        http::get_in(&self.client, addr).map(|(body, _port)| body)
    }

    /// One GET to the VIP on a new connection.
    pub fn get_vip(&self) -> Result<String> {
        self.get(vip_addr())
    }

    /// A keep-alive connection from the client to the VIP.
    pub fn connect(&self) -> Result<Connection> {
        Connection::open(&self.client, vip_addr())
    }

    /// `n` GETs to the VIP, each on a new connection (so each its own flow, with its own
    /// source port). Stops early after 5 failures so a broken data path fails fast.
    pub fn request_many(&self, n: usize) -> Tally {
        let mut t = Tally::default();
        for _ in 0..n {
            match http::get_in(&self.client, vip_addr()) {
                Ok((body, port)) => {
                    *t.counts.entry(body).or_default() += 1;
                    t.ports.insert(port);
                }
                Err(e) => {
                    t.errors.push(format!("{e:#}"));
                    if t.errors.len() >= 5 {
                        break;
                    }
                }
            }
        }
        t
    }

    // ---- teardown ---------------------------------------------------------------------------

    fn dump_diagnostics(&mut self) {
        eprintln!("==== testbed {} failed; diagnostics ====", self.id);
        if self
            .daemon
            .as_mut()
            .is_some_and(|d| matches!(d.try_wait(), Ok(None)))
        {
            match netns::try_run(
                Command::new(LB_BIN)
                    .arg("--api")
                    .arg(&self.api)
                    .args(["status", "--json"]),
                CLI_TIMEOUT,
            ) {
                Ok(o) => eprintln!(
                    "---- lb status --json ----\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("---- lb status: {e}"),
            }
        } else if self.daemon.is_some() {
            eprintln!("---- the daemon is no longer running");
        }
        for b in &self.backends {
            eprintln!(
                "---- {} ({}): server {}, {} requests served",
                b.name,
                b.ip,
                if b.server.is_running() {
                    "running"
                } else {
                    "stopped"
                },
                b.server.requests()
            );
        }
        if self.daemon_log.exists() {
            eprintln!(
                "---- daemon log ----\n{}",
                netns::read_lossy(&self.daemon_log)
            );
        }
        if self.wire_log.exists() {
            eprintln!(
                "---- testbed-wire log ----\n{}",
                netns::read_lossy(&self.wire_log)
            );
        }
        eprintln!("==== end of diagnostics ({} kept) ====", self.dir.display());
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing {
            self.dump_diagnostics();
        }
        // Servers first (their threads join), then the processes, then the namespaces.
        self.backends.clear();
        if let Some(d) = self.daemon.take() {
            match stop_child(d, Duration::from_secs(10)) {
                Ok(st) if st.success() => {}
                Ok(st) => eprintln!("testbed {}: daemon exited with {st} on SIGTERM", self.id),
                Err(e) => eprintln!("testbed {}: stopping the daemon: {e}", self.id),
            }
        }
        for w in self.wire.take().into_iter().chain(self.wire2.take()) {
            if let Err(e) = stop_child(w, Duration::from_secs(10)) {
                eprintln!("testbed {}: stopping testbed-wire: {e}", self.id);
            }
        }
        for d in std::mem::take(&mut self.decaps) {
            if let Err(e) = stop_child(d, Duration::from_secs(10)) {
                eprintln!("testbed {}: stopping lb decap: {e}", self.id);
            }
        }
        for ns in self.namespaces.iter().rev() {
            netns::netns_del(ns);
        }
        if let Some(dir) = self.bpffs.take() {
            // Lazy: a pinned map still mapped by nothing else is freed with the mount.
            let _ = Command::new("umount").arg("-l").arg(&dir).status();
        }
        if !failing {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`. Never panics.
fn stop_child(mut child: Child, grace: Duration) -> std::io::Result<ExitStatus> {
    if let Some(st) = child.try_wait()? {
        return Ok(st);
    }
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "testbed: pid {} ignored SIGTERM for {grace:?}; killing it",
        child.id()
    );
    child.kill()?;
    child.wait()
}

/// Whether `dev` in namespace `ns` has an XDP program attached.
pub fn xdp_attached(ns: &str, dev: &str) -> bool {
    netns::try_run(
        Command::new("ip").args(["-n", ns, "link", "show", "dev", dev]),
        Duration::from_secs(10),
    )
    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
}

/// Checks that a CLI call failed with exactly one non-empty line on stderr; returns that line,
/// or what is wrong.
pub fn check_cli_error(what: &str, out: &Output) -> Result<String, String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Err(format!(
            "`{what}` should fail but exited 0; stdout: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    let msg = stderr.trim();
    if msg.is_empty() {
        return Err(format!(
            "`{what}` failed ({}) with an empty stderr",
            out.status
        ));
    }
    if msg.contains('\n') {
        return Err(format!(
            "`{what}` should print a one-line error, got:\n{stderr}"
        ));
    }
    Ok(msg.to_owned())
}

/// Asserts that a CLI call failed with exactly one non-empty line on stderr; returns it.
pub fn assert_cli_error(what: &str, out: &Output) -> String {
    check_cli_error(what, out).unwrap_or_else(|e| panic!("{e}"))
}

// ---- reading `lb status --json` ------------------------------------------------------------

pub fn find_service<'a>(status: &'a Value, service: &str) -> Option<&'a Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"].as_str() == Some(service))
}

pub fn find_backend<'a>(status: &'a Value, service: &str, ip: &str) -> Option<&'a Value> {
    find_service(status, service)?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["ip"].as_str() == Some(ip))
}

/// The configuration part of a status (no counters), for "this command changed nothing".
pub fn config_view(status: &Value) -> Value {
    let services = status["services"].as_array().cloned().unwrap_or_default();
    let mut out: Vec<Value> = services
        .iter()
        .map(|s| {
            let mut backends: Vec<Value> = s["backends"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "ip": b["ip"], "weight": b["weight"], "state": b["state"],
                        "health": b["health"], "in_table": b["in_table"],
                    })
                })
                .collect();
            backends.sort_by_key(|b| b["ip"].to_string());
            serde_json::json!({
                "service": s["service"], "forward": s["forward"], "scheduler": s["scheduler"],
                "backends": backends,
            })
        })
        .collect();
    out.sort_by_key(|s| s["service"].to_string());
    Value::Array(out)
}

pub fn as_u64(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

/// What a batch of requests saw: how many each backend answered, and the failures.
#[derive(Debug, Default)]
pub struct Tally {
    pub counts: BTreeMap<String, usize>,
    pub errors: Vec<String>,
    pub ports: BTreeSet<u16>,
}

impl Tally {
    pub fn count(&self, backend: &str) -> usize {
        self.counts.get(backend).copied().unwrap_or(0)
    }

    pub fn ok(&self) -> usize {
        self.counts.values().sum()
    }

    /// Panics unless every request succeeded.
    pub fn assert_all_ok(&self, what: &str) {
        assert!(
            self.errors.is_empty(),
            "{what}: {} request(s) failed (answered: {:?}); first: {}",
            self.errors.len(),
            self.counts,
            self.errors[0]
        );
    }
}

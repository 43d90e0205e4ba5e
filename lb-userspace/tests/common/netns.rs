//! Network-namespace plumbing for the end-to-end tests: running commands with a time limit,
//! running a closure on a thread that has joined a named namespace, and removing namespaces left
//! behind by test processes that died without cleaning up.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

/// Every namespace this crate creates is called `lbt<pid>x<n>-<role>`; the sweep relies on it.
pub const NS_PREFIX: &str = "lbt";

/// `ip netns add` mounts /var/run/netns on first use; two threads doing that at once can trip
/// over each other, so namespace creation and removal in this process go one at a time.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// Joins the calling thread to the network namespace `name` (only this thread: `setns` with
/// `CLONE_NEWNET` is per thread).
pub fn enter(name: &str) -> io::Result<()> {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    // SAFETY: plain syscall on a descriptor we own; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `name` and returns its result. Sockets created
/// by `f` stay in that namespace after they are handed back, so the caller can use them from
/// any thread.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> io::Result<T> {
                enter(name)?;
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other(format!("thread in namespace {name} panicked")))?
    })
}

/// Spawns a long-lived thread inside namespace `name`.
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    thread_name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<io::Result<T>> {
    let ns = name.to_owned();
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            enter(&ns)?;
            Ok(f())
        })
        .expect("spawning a thread")
}

/// Runs `cmd` to completion, capturing its output; gives up (killing the child) after
/// `timeout`. Never panics, so Drop code can use it while a test is already panicking.
pub fn try_run(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let desc = describe(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start `{desc}`: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(format!("waiting for `{desc}`: {e}")),
        Err(_) => {
            // The child has not been reaped yet (the waiter still blocks on it), so the pid is
            // still ours.
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = rx.recv_timeout(Duration::from_secs(5));
            Err(format!(
                "`{desc}` did not finish within {timeout:?}; killed it"
            ))
        }
    }
}

/// [`try_run`] that panics when the command cannot be run or hangs. No test may hang on a
/// stuck command.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    try_run(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a setup command that must succeed (ip, ethtool, ...), with a 20 s limit.
pub fn must(cmd: &mut Command) -> String {
    let desc = describe(cmd);
    let out = run_timeout(cmd, Duration::from_secs(20));
    if !out.status.success() {
        panic!(
            "`{desc}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS...` that must succeed.
pub fn ip(args: &[&str]) -> String {
    must(Command::new("ip").args(args))
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn netns_add(name: &str) {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "add", name]);
}

/// Kills whatever still runs in namespace `name`, then deletes it. Best effort and never
/// panics: used from Drop.
pub fn netns_del(name: &str) {
    kill_pids_in(name);
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    match try_run(
        Command::new("ip").args(["netns", "del", name]),
        Duration::from_secs(20),
    ) {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "testbed: ip netns del {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("testbed: {e}"),
    }
}

fn kill_pids_in(name: &str) {
    let Ok(out) = try_run(
        Command::new("ip").args(["netns", "pids", name]),
        Duration::from_secs(10),
    ) else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<libc::pid_t>() {
            // SAFETY: kill(2); these processes belong to a namespace this test created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

pub fn netns_list() -> Vec<String> {
    ip(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Removes namespaces named `lbt<pid>x<n>-*` whose test process `pid` no longer exists (a run
/// that was killed before its Drop ran), together with any process still running in them, and
/// the temporary directories `lbt<pid>x<n>` of such runs (a failed test keeps its directory, with
/// the daemon's log, until the next run).
pub fn sweep_stale() {
    let dead = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
    for name in netns_list() {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if dead(pid) {
            eprintln!("testbed: removing stale namespace {name} (test process {pid} is gone)");
            netns_del(&name);
        }
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = parse_id(&name)
            && dead(pid)
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The test process that created namespace `lbt<pid>x<n>-<role>`.
fn owner_pid(name: &str) -> Option<u32> {
    let (id, role) = name.split_once('-')?;
    if role.is_empty() {
        return None;
    }
    parse_id(id)
}

/// `lbt<pid>x<n>` -> pid.
fn parse_id(id: &str) -> Option<u32> {
    let rest = id.strip_prefix(NS_PREFIX)?;
    let (pid, n) = rest.split_once('x')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Writes a sysctl inside namespace `ns` (files under /proc/sys/net belong to the namespace of
/// the thread that opens them).
pub fn sysctl(ns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run_in(ns, || std::fs::write(&path, value))
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("sysctl {key}={value} in {ns}: {e}"));
}

/// Reads a whole file, for printing logs; never fails.
pub fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut buf)) {
        Ok(_) => String::from_utf8_lossy(&buf).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::{owner_pid, parse_id};

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("lbt1234x0-client"), Some(1234));
        assert_eq!(owner_pid("lbt1234x17-b2"), Some(1234));
        assert_eq!(owner_pid("lbtx0-client"), None);
        assert_eq!(owner_pid("lbt12-client"), None);
        assert_eq!(owner_pid("other"), None);
        assert_eq!(owner_pid("lbt1234x0"), None);
        assert_eq!(parse_id("lbt1234x0"), Some(1234));
        assert_eq!(parse_id("lbt1234x0.log"), None);
        assert_eq!(parse_id("lbdemo.abc"), None);
    }
}

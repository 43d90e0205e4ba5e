//! A UDP "who are you" server for the backends and a one-datagram client. The server is bound
//! to the VIP itself, so its answers leave from the VIP (direct server return) and reach the
//! client's connected socket.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::http::CLIENT_TIMEOUT;
use super::netns;

pub struct UdpServer {
    name: String,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl UdpServer {
    /// Answers every datagram to `bind` (inside namespace `ns`) with `name`.
    pub fn start(name: &str, ns: &str, bind: SocketAddr) -> Self {
        // A server stopped just before may still hold the port for a moment (its thread drops
        // the socket as it ends): retry briefly instead of failing the test on that race.
        let mut attempt = 0;
        let sock = loop {
            match netns::run_in(ns, move || UdpSocket::bind(bind)).and_then(|r| r) {
                Ok(sock) => break sock,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < 40 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(e) => panic!("{name}: bind udp {bind}: {e}"),
            }
        };
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("udp read timeout");
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, reply) = (requests.clone(), stop.clone(), name.as_bytes().to_vec());
        let thread = std::thread::Builder::new()
            .name(format!("udp-{name}"))
            .spawn(move || -> io::Result<()> {
                let mut buf = [0u8; 1500];
                while !s.load(Ordering::SeqCst) {
                    match sock.recv_from(&mut buf) {
                        Ok((_, peer)) => {
                            r.fetch_add(1, Ordering::SeqCst);
                            sock.send_to(&reply, peer)?;
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock
                                    | io::ErrorKind::TimedOut
                                    | io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .expect("spawning the udp server thread");
        Self {
            name: name.to_owned(),
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("udp server {}: {e}", self.name),
                Err(_) => eprintln!("udp server {}: thread panicked", self.name),
            }
        }
    }
}

/// Sends one datagram from a new socket (a new source port, so a new flow) in namespace `ns`
/// to `addr` and returns the answer.
pub fn query_in(ns: &str, addr: SocketAddr) -> Result<String> {
    let sock = netns::run_in(ns, || UdpSocket::bind("0.0.0.0:0"))
        .context("entering the client namespace")?
        .context("binding a udp socket")?;
    sock.connect(addr)
        .with_context(|| format!("udp connect {addr}"))?;
    sock.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    sock.send(b"who")
        .with_context(|| format!("udp send to {addr}"))?;
    let mut buf = [0u8; 1500];
    let n = loop {
        match sock.recv(&mut buf) {
            Ok(n) => break n,
            // A signal reached this thread: read again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!("no answer from {addr} within {CLIENT_TIMEOUT:?}")
            }
            Err(e) => return Err(e).with_context(|| format!("udp recv from {addr}")),
        }
    };
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

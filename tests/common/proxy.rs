//! A fault-injecting TCP proxy on loopback for the Redis tests: forwards every connection to
//! a target port, and on demand
//!
//! * silently drops the traffic of the connections open at that moment (a dropped NAT entry,
//!   a failover: the sockets stay open, nothing arrives) while new connections work;
//! * *drips* replies: the server's bytes reach the client one at a time, a pause between each
//!   (a congested or lossy link: every socket read returns something, the reply never ends);
//! * *stalls* replies: the server's bytes are held back (a frozen link) until the stall ends.
//!
//! Drip and stall apply to every connection, open or new, from the server to the client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct Faults {
    /// Connections opened before this generation are black holes.
    cut: AtomicU64,
    /// Pause between two bytes of a reply, in microseconds (0: no drip).
    drip_us: AtomicU64,
    /// Replies are held back while set.
    stall: AtomicBool,
}

pub struct Proxy {
    port: u16,
    faults: Arc<Faults>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:target` on a free loopback port.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let f = Arc::clone(&faults);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let born = f.cut.load(Ordering::SeqCst);
                for (from, to, replies) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        false,
                    ),
                    (server, client, true),
                ] {
                    let f = Arc::clone(&f);
                    std::thread::spawn(move || pump(from, to, born, &f, replies));
                }
            }
        });
        Proxy { port, faults }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The proxy's `rediss://` URL: the proxy relays bytes, so TLS passes through it.
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }

    /// From now on, the connections open now deliver nothing, in either direction, and stay
    /// open; new connections are forwarded.
    pub fn black_hole_open_connections(&self) {
        self.faults.cut.fetch_add(1, Ordering::SeqCst);
    }

    /// Replies reach the client one byte per `pause` (`Duration::ZERO`: at full speed again).
    pub fn drip(&self, pause: Duration) {
        let us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
        self.faults.drip_us.store(us, Ordering::SeqCst);
    }

    /// Holds replies back (`true`) or lets them through (`false`, with what was held).
    pub fn stall(&self, on: bool) {
        self.faults.stall.store(on, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, born: u64, f: &Faults, replies: bool) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if f.cut.load(Ordering::SeqCst) > born {
            continue; // swallowed
        }
        if !replies {
            if to.write_all(&buf[..n]).is_err() {
                return;
            }
            continue;
        }
        while f.stall.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut sent = 0;
        while sent < n {
            let us = f.drip_us.load(Ordering::SeqCst);
            let chunk = if us == 0 { n - sent } else { 1 };
            if to.write_all(&buf[sent..sent + chunk]).is_err() {
                return;
            }
            sent += chunk;
            if us > 0 {
                std::thread::sleep(Duration::from_micros(us));
            }
        }
    }
}

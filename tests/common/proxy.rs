//! A fault-injecting TCP proxy on loopback for the Redis tests: forwards every connection to
//! a target port, and on demand silently drops the traffic of the connections open at that
//! moment (a dropped NAT entry, a failover: the sockets stay open, nothing arrives) while new
//! connections work.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct Proxy {
    port: u16,
    /// Connections opened before this generation are black holes.
    cut: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:target` on a free loopback port.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&cut);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let born = c.load(Ordering::SeqCst);
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let c = Arc::clone(&c);
                    std::thread::spawn(move || pump(from, to, born, &c));
                }
            }
        });
        Proxy { port, cut }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// From now on, the connections open now deliver nothing, in either direction, and stay
    /// open; new connections are forwarded.
    pub fn black_hole_open_connections(&self) {
        self.cut.fetch_add(1, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, born: u64, cut: &AtomicU64) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) > born {
            continue; // swallowed
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

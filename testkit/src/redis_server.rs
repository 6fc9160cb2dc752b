//! A throwaway `redis-server` on a free loopback port, for the second-tier tests and the fleet
//! example. It can be stopped and started again on the same port, and is killed on drop.
//! Nothing is persisted.
//!
//! `redis-server` must be on `PATH` (`.ci/run` installs Debian's `redis-server`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Extra command-line arguments (TLS, cluster mode).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// If `redis-server` is missing or does not start within 10 s.
    pub fn start() -> RedisServer {
        let mut s = RedisServer {
            port: free_port(),
            child: None,
            extra: Vec::new(),
        };
        s.restart();
        s
    }

    /// Starts a server with extra arguments (it must still answer plain PING on `port`), or
    /// says why it did not start (e.g. a build without TLS).
    pub fn try_start_with(extra: Vec<String>) -> Result<RedisServer, String> {
        let port = free_port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--loglevel", "warning"])
            .args(&extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        let until = Instant::now() + Duration::from_secs(10);
        while !pong(port) {
            if let Ok(Some(status)) = child.try_wait() {
                let mut out = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut out);
                }
                return Err(format!("redis-server exited ({status}): {}", out.trim()));
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                return Err("redis-server did not answer within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Its output is not read from here on: keep it from filling a pipe.
        drop(child.stdout.take());
        drop(child.stderr.take());
        Ok(RedisServer {
            port,
            child: Some(child),
            extra,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (its data is lost) and waits until the port refuses connections.
    pub fn stop(&mut self) {
        self.resume();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel but nothing is
    /// answered, as with a hung or partitioned server.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} failed");
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it (apt-get install redis-server) \
                     to run the second-tier tests"
                )
            });
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while !pong(self.port) {
            assert!(Instant::now() < until, "redis-server did not start");
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "redis-server exited: {exited:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether a Redis server answers PING on `port`. (A bare TCP connect is not enough: a
/// connection to a free port in the ephemeral range can connect to itself.)
fn pong(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A loopback port nobody listens on, never the same twice in this process (tests run in
/// parallel: two servers on one port would see each other's data).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

//! One blocking connection to Redis whose every operation ends by a deadline.
//!
//! A socket timeout bounds one read, not an operation: a reply that drips in a byte at a
//! time (a congested or lossy link, a server swapping) satisfies every read's timeout and can
//! take seconds. So the tier talks to a plain `redis://` server over its own connection: the
//! deadline of an operation is set before it starts, and every write and read of the socket
//! is given what is left of it (a read past the deadline fails with `TimedOut`). Requests are
//! encoded and replies parsed by the `redis` crate (the connection implements its
//! [`ConnectionLike`]), so commands, pipelines and scripts are unchanged.
//!
//! The socket has `TCP_NODELAY` and TCP keepalive ([`KEEPALIVE_IDLE`], then a probe every
//! [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`] of them): a pooled connection whose peer
//! vanished (a failover, a dropped NAT entry) is found dead by the kernel instead of staying
//! half open.
//!
//! Name resolution (`host` in the URL) is the system's, not bounded by the deadline: give an
//! address, or a name the local resolver caches.
//!
//! Other addresses (`rediss://` with the `redis-tls` feature, `redis+unix://`) use the
//! `redis` crate's own connection, with the remaining time as its per-read timeout: there the
//! deadline bounds when an operation starts reading, and each read, not the whole reply.

use ::redis::io::tcp::socket2::{Socket, TcpKeepalive};
use ::redis::{
    cmd, pipe, Cmd, ConnectionAddr, ConnectionInfo, ConnectionLike, FromRedisValue, Parser,
    RedisError, RedisResult, Value,
};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Idle time before the first keepalive probe.
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the kernel drops the connection.
pub(crate) const KEEPALIVE_PROBES: u32 = 3;

/// The keepalive settings of every connection the tier opens.
pub(crate) fn keepalive() -> TcpKeepalive {
    let k = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
    let k = k.with_retries(KEEPALIVE_PROBES);
    k
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "Redis operation deadline passed")
}

/// What is left until `deadline`, or a `TimedOut` error.
fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(timed_out())
    } else {
        Ok(left)
    }
}

/// A connection to Redis.
pub(crate) enum Conn {
    /// A plain TCP connection with whole-operation deadlines.
    Tcp(Deadlined),
    /// The `redis` crate's connection (TLS, Unix sockets): per-read timeouts.
    Other(::redis::Connection),
    /// The `redis` crate's connection to a Redis Cluster (commands routed by key slot; per-read
    /// timeouts).
    #[cfg(feature = "redis-cluster")]
    Cluster(Box<::redis::cluster::ClusterConnection>),
}

/// Where the tier's connections go.
pub(crate) enum Target {
    /// One server.
    Server {
        info: ConnectionInfo,
        raw: ::redis::Client,
    },
    /// A Redis Cluster.
    #[cfg(feature = "redis-cluster")]
    Cluster(::redis::cluster::ClusterClient),
}

impl Conn {
    /// Opens a connection to `target`, connect and handshake bounded by `deadline` (for a
    /// cluster: by the client's connection timeout).
    pub(crate) fn open(target: &Target, deadline: Instant) -> RedisResult<Conn> {
        match target {
            Target::Server { info, raw } => match info.addr() {
                ConnectionAddr::Tcp(host, port) => {
                    Deadlined::open(host, *port, info, deadline).map(Conn::Tcp)
                }
                _ => {
                    let c = raw.get_connection_with_timeout(left(deadline)?)?;
                    Ok(Conn::Other(c))
                }
            },
            #[cfg(feature = "redis-cluster")]
            Target::Cluster(client) => {
                left(deadline)?;
                client.get_connection().map(|c| Conn::Cluster(Box::new(c)))
            }
        }
    }

    /// Starts an operation: it must end by `deadline`.
    pub(crate) fn begin(&mut self, deadline: Instant) -> RedisResult<()> {
        match self {
            Conn::Tcp(c) => {
                c.deadline = deadline;
                Ok(())
            }
            Conn::Other(c) => {
                let left = left(deadline)?;
                c.set_read_timeout(Some(left))?;
                c.set_write_timeout(Some(left))?;
                Ok(())
            }
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => {
                let left = left(deadline)?;
                c.set_read_timeout(Some(left))?;
                c.set_write_timeout(Some(left))?;
                Ok(())
            }
        }
    }

    /// Sends `cmds` as one pipeline (on a cluster, each command to its key's node) and
    /// converts the replies.
    pub(crate) fn pipeline<T: FromRedisValue>(&mut self, cmds: Vec<Cmd>) -> RedisResult<T> {
        #[cfg(feature = "redis-cluster")]
        if let Conn::Cluster(c) = self {
            let mut p = ::redis::cluster::ClusterPipeline::new();
            for command in cmds {
                p.add_command(command);
            }
            return p.query(c);
        }
        let mut p = pipe();
        for command in cmds {
            p.add_command(command);
        }
        p.query(self)
    }

    /// The nodes whose keys a `SCAN` must cover: `[None]` (this connection's server), or
    /// every primary of a cluster.
    pub(crate) fn scan_nodes(&mut self) -> RedisResult<Vec<Option<(String, u16)>>> {
        #[cfg(feature = "redis-cluster")]
        if let Conn::Cluster(c) = self {
            // CLUSTER SLOTS: [[start, end, [host, port, id, ...], replicas...], ...]
            let slots: Vec<Value> = cmd("CLUSTER").arg("SLOTS").query(c)?;
            let mut nodes = Vec::new();
            for range in slots {
                let Value::Array(parts) = range else { continue };
                let Some(Value::Array(primary)) = parts.get(2) else {
                    continue;
                };
                let host = primary
                    .first()
                    .and_then(|v| String::from_redis_value(v.clone()).ok());
                let port = primary
                    .get(1)
                    .and_then(|v| u16::from_redis_value(v.clone()).ok());
                if let (Some(host), Some(port)) = (host, port) {
                    if !nodes.contains(&Some((host.clone(), port))) {
                        nodes.push(Some((host, port)));
                    }
                }
            }
            return Ok(nodes);
        }
        Ok(vec![None])
    }

    /// Runs `command` on `node` (from [`scan_nodes`](Self::scan_nodes)).
    pub(crate) fn on_node<T: FromRedisValue>(
        &mut self,
        node: Option<&(String, u16)>,
        command: &Cmd,
    ) -> RedisResult<T> {
        #[cfg(feature = "redis-cluster")]
        if let (Conn::Cluster(c), Some((host, port))) = (&mut *self, node) {
            use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            });
            let v = c.route_command(command, route)?;
            return T::from_redis_value(v).map_err(Into::into);
        }
        let _ = node;
        command.query(self)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            Conn::Tcp(c) => c.req_packed_command(cmd),
            Conn::Other(c) => c.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Tcp(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Other(c) => c.req_packed_commands(cmd, offset, count),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Tcp(c) => c.db,
            Conn::Other(c) => c.get_db(),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Conn::Tcp(c) => cmd("PING").query::<String>(c).is_ok(),
            Conn::Other(c) => c.check_connection(),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Conn::Tcp(c) => c.open,
            Conn::Other(c) => c.is_open(),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.is_open(),
        }
    }
}

/// A TCP connection whose reads and writes share one deadline per operation.
pub(crate) struct Deadlined {
    stream: TcpStream,
    parser: Parser,
    deadline: Instant,
    db: i64,
    /// False after an I/O error: the stream may hold half a reply.
    open: bool,
}

impl Deadlined {
    fn open(host: &str, port: u16, info: &ConnectionInfo, deadline: Instant) -> RedisResult<Self> {
        let mut last = None;
        let mut stream = None;
        for addr in (host, port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, left(deadline)?) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = match stream {
            Some(s) => s,
            None => {
                return Err(last
                    .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
                    .into())
            }
        };
        stream.set_nodelay(true)?;
        let socket = Socket::from(stream);
        socket.set_tcp_keepalive(&keepalive())?;
        let settings = info.redis_settings();
        let mut conn = Deadlined {
            stream: socket.into(),
            parser: Parser::new(),
            deadline,
            db: settings.db(),
            open: true,
        };
        if let Some(password) = settings.password() {
            let mut auth = cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password).query::<()>(&mut conn)?;
        }
        if conn.db != 0 {
            cmd("SELECT").arg(conn.db).query::<()>(&mut conn)?;
        }
        Ok(conn)
    }

    fn send(&mut self, bytes: &[u8]) -> RedisResult<()> {
        let mut sent = 0;
        while sent < bytes.len() {
            let step = left(self.deadline).and_then(|left| {
                self.stream.set_write_timeout(Some(left))?;
                self.stream.write(&bytes[sent..])
            });
            match step {
                Ok(0) => return Err(self.broken(io::ErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.broken(e)),
            }
        }
        Ok(())
    }

    fn receive(&mut self) -> RedisResult<Value> {
        let reader = Timed {
            stream: &self.stream,
            deadline: self.deadline,
        };
        match self.parser.parse_value(reader) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.open = false;
                Err(e)
            }
        }
    }

    fn broken(&mut self, e: io::Error) -> RedisError {
        self.open = false;
        e.into()
    }

    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.send(cmd)?;
        loop {
            match self.receive()? {
                Value::Push { .. } => {}
                v => return Ok(v),
            }
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.send(cmd)?;
        let mut out = Vec::with_capacity(count);
        let mut idx = 0;
        while idx < offset + count {
            match self.receive()? {
                Value::Push { .. } => continue,
                v if idx >= offset => out.push(v),
                _ => {}
            }
            idx += 1;
        }
        Ok(out)
    }
}

impl ConnectionLike for Deadlined {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        Deadlined::req_packed_command(self, cmd)
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        Deadlined::req_packed_commands(self, cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.db
    }

    fn check_connection(&mut self) -> bool {
        cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        self.open
    }
}

/// Reads the stream with what is left of the deadline as each read's timeout.
struct Timed<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = left(self.deadline)?;
        self.stream.set_read_timeout(Some(left))?;
        match (&*self.stream).read(buf) {
            // A read that timed out reports `WouldBlock` on Unix.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(timed_out()),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that answers `+OK\r\n` one byte per 20 ms: every read succeeds within any
    /// per-read timeout, the reply takes 100 ms. A 50 ms deadline must end the operation.
    #[test]
    fn a_dripping_reply_ends_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            for b in b"+OK\r\n" {
                std::thread::sleep(Duration::from_millis(20));
                if s.write_all(&[*b]).is_err() {
                    break;
                }
            }
        });
        let info =
            ::redis::IntoConnectionInfo::into_connection_info(format!("redis://127.0.0.1:{port}/"))
                .unwrap();
        let start = Instant::now();
        let mut c =
            Deadlined::open("127.0.0.1", port, &info, start + Duration::from_secs(5)).unwrap();
        c.deadline = Instant::now() + Duration::from_millis(50);
        let e = cmd("PING").query::<String>(&mut c).unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        assert!(!c.open, "a timed-out connection is not reused");
        server.join().unwrap();
    }
}

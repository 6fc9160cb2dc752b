//! One blocking connection to Redis whose every operation ends by a deadline.
//!
//! A socket timeout bounds one read, not an operation: a reply that drips in a byte at a
//! time (a congested or lossy link, a server swapping) satisfies every read's timeout and can
//! take seconds. So the tier talks to Redis over its own connections: the deadline of an
//! operation is set before it starts, and every write and read of the socket is given what is
//! left of it (a read past the deadline fails with `TimedOut`). Requests are encoded and
//! replies parsed by the `redis` crate (the connection implements its [`ConnectionLike`]), so
//! commands, pipelines and scripts are unchanged.
//!
//! * `redis://`: a TCP socket.
//! * `rediss://` (feature `redis-tls`): rustls over that socket. The TLS layer reads and
//!   writes the socket through the same deadline (a TLS record that drips in is bounded like a
//!   plain reply), and the handshake is part of the connect deadline.
//! * A Redis Cluster (feature `redis-cluster`): one such connection per primary, a slot map
//!   (`CLUSTER SLOTS`), each command sent to its key's node (a pipeline: one sub-pipeline per
//!   node, in turn), and `MOVED`/`ASK` redirects followed, all within the one deadline.
//!
//! The socket has `TCP_NODELAY` and TCP keepalive ([`KEEPALIVE_IDLE`], then a probe every
//! [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`] of them): a pooled connection whose peer
//! vanished (a failover, a dropped NAT entry) is found dead by the kernel instead of staying
//! half open.
//!
//! Name resolution (`host` in the URL) is the system's, not bounded by the deadline: give an
//! address, or a name the local resolver caches.
//!
//! Other addresses (`redis+unix://`, and `rediss://…#insecure`) use the `redis` crate's own
//! connection, with the remaining time as its per-read timeout: there the deadline bounds when
//! an operation starts reading, and each read, not the whole reply.

use ::redis::io::tcp::socket2::{Socket, TcpKeepalive};
use ::redis::{
    cmd, pipe, Cmd, ConnectionAddr, ConnectionInfo, ConnectionLike, FromRedisValue, Parser,
    RedisError, RedisResult, Value,
};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
#[cfg(any(feature = "redis-tls", feature = "redis-cluster"))]
use std::sync::Arc;
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

/// How the tier's own connections are set up: credentials and database (from the URL), and
/// TLS (`rediss://`).
#[derive(Clone)]
pub(crate) struct Dial {
    pub(crate) info: ConnectionInfo,
    #[cfg(feature = "redis-tls")]
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

/// A connection to Redis.
pub(crate) enum Conn {
    /// The tier's own connection (TCP or TLS), with whole-operation deadlines.
    Tcp(Deadlined),
    /// The `redis` crate's connection (Unix sockets): per-read timeouts.
    Other(::redis::Connection),
    /// The tier's own connections to the primaries of a Redis Cluster, with whole-operation
    /// deadlines.
    #[cfg(feature = "redis-cluster")]
    Cluster(Box<cluster::ClusterConn>),
}

/// Where the tier's connections go (built once per tier: its size does not matter).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Target {
    /// One server.
    Server { dial: Dial, raw: ::redis::Client },
    /// A Redis Cluster.
    #[cfg(feature = "redis-cluster")]
    Cluster(Arc<cluster::Cluster>),
}

impl Conn {
    /// Opens a connection to `target`, connect and handshake bounded by `deadline` (for a
    /// cluster: the slot map too, if not known yet, and a connection to every primary).
    pub(crate) fn open(target: &Target, deadline: Instant) -> RedisResult<Conn> {
        match target {
            Target::Server { dial, raw } => match dial.info.addr() {
                ConnectionAddr::Tcp(host, port) => {
                    Deadlined::open(host, *port, dial, deadline).map(Conn::Tcp)
                }
                #[cfg(feature = "redis-tls")]
                ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    ..
                } if dial.tls.is_some() => {
                    Deadlined::open(host, *port, dial, deadline).map(Conn::Tcp)
                }
                _ => {
                    let c = raw.get_connection_with_timeout(left(deadline)?)?;
                    Ok(Conn::Other(c))
                }
            },
            #[cfg(feature = "redis-cluster")]
            Target::Cluster(c) => cluster::ClusterConn::open(Arc::clone(c), deadline)
                .map(|c| Conn::Cluster(Box::new(c))),
        }
    }

    /// Starts an operation: it must end by `deadline`.
    pub(crate) fn begin(&mut self, deadline: Instant) -> RedisResult<()> {
        match self {
            Conn::Tcp(c) => {
                left(deadline)?;
                c.set_deadline(deadline);
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
                left(deadline)?;
                c.begin(deadline);
                Ok(())
            }
        }
    }

    /// Sends `cmds` as one pipeline (on a cluster, one per node involved) and converts the
    /// replies.
    pub(crate) fn pipeline<T: FromRedisValue>(&mut self, cmds: Vec<Cmd>) -> RedisResult<T> {
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
            return Ok(c.primaries()?.into_iter().map(Some).collect());
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
        if let (Conn::Cluster(c), Some(node)) = (&mut *self, node) {
            let v = c.on_node(node, &command.get_packed_command())?;
            return T::from_redis_value(v.extract_error()?).map_err(Into::into);
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
            Conn::Cluster(c) => c
                .req_packed_commands(cmd, 0, 1)
                .map(|mut v| v.pop().unwrap_or(Value::Nil)),
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
            Conn::Cluster(_) => 0,
        }
    }

    fn check_connection(&mut self) -> bool {
        cmd("PING").query::<String>(self).is_ok()
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

/// A TCP socket whose every read and write is given what is left of a deadline.
pub(crate) struct Sock {
    tcp: TcpStream,
    deadline: Instant,
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = left(self.deadline)?;
        self.tcp.set_read_timeout(Some(left))?;
        match self.tcp.read(buf) {
            // A read that timed out reports `WouldBlock` on Unix.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(timed_out()),
            r => r,
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = left(self.deadline)?;
        self.tcp.set_write_timeout(Some(left))?;
        match self.tcp.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(timed_out()),
            r => r,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The byte stream of a connection: the socket, or TLS over it.
enum Stream {
    Plain(Sock),
    #[cfg(feature = "redis-tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Sock>>),
}

impl Stream {
    fn sock(&mut self) -> &mut Sock {
        match self {
            Stream::Plain(s) => s,
            #[cfg(feature = "redis-tls")]
            Stream::Tls(s) => &mut s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            #[cfg(feature = "redis-tls")]
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            #[cfg(feature = "redis-tls")]
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            #[cfg(feature = "redis-tls")]
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A connection (TCP, or TLS over TCP) whose reads and writes share one deadline per
/// operation.
pub(crate) struct Deadlined {
    stream: Stream,
    parser: Parser,
    db: i64,
    /// False after an I/O error: the stream may hold half a reply.
    open: bool,
}

impl Deadlined {
    /// Connects to `host:port`: TCP connect, TLS handshake (if `dial` has TLS), `AUTH` and
    /// `SELECT`, all by `deadline`.
    pub(crate) fn open(host: &str, port: u16, dial: &Dial, deadline: Instant) -> RedisResult<Self> {
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
        let sock = Sock {
            tcp: socket.into(),
            deadline,
        };
        #[cfg(feature = "redis-tls")]
        let stream = match &dial.tls {
            Some(config) => Stream::Tls(Box::new(handshake(host, config, sock)?)),
            None => Stream::Plain(sock),
        };
        #[cfg(not(feature = "redis-tls"))]
        let stream = Stream::Plain(sock);
        let settings = dial.info.redis_settings();
        let mut conn = Deadlined {
            stream,
            parser: Parser::new(),
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

    /// The next operation must end by `deadline`.
    pub(crate) fn set_deadline(&mut self, deadline: Instant) {
        self.stream.sock().deadline = deadline;
    }

    fn send(&mut self, bytes: &[u8]) -> RedisResult<()> {
        match self
            .stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
        {
            Ok(()) => Ok(()),
            Err(e) => Err(self.broken(e)),
        }
    }

    fn receive(&mut self) -> RedisResult<Value> {
        match self.parser.parse_value(&mut self.stream) {
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

    pub(crate) fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.send(cmd)?;
        loop {
            match self.receive()? {
                Value::Push { .. } => {}
                v => return Ok(v),
            }
        }
    }

    pub(crate) fn req_packed_commands(
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

/// The TLS handshake over `sock`, by its deadline.
#[cfg(feature = "redis-tls")]
fn handshake(
    host: &str,
    config: &Arc<rustls::ClientConfig>,
    mut sock: Sock,
) -> RedisResult<rustls::StreamOwned<rustls::ClientConnection, Sock>> {
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut tls =
        rustls::ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut sock)?;
    }
    Ok(rustls::StreamOwned::new(tls, sock))
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

#[cfg(feature = "redis-cluster")]
pub(crate) mod cluster;

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
        let dial = Dial {
            info,
            #[cfg(feature = "redis-tls")]
            tls: None,
        };
        let start = Instant::now();
        let mut c =
            Deadlined::open("127.0.0.1", port, &dial, start + Duration::from_secs(5)).unwrap();
        c.set_deadline(Instant::now() + Duration::from_millis(50));
        let e = cmd("PING").query::<String>(&mut c).unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        assert!(!c.open, "a timed-out connection is not reused");
        server.join().unwrap();
    }
}

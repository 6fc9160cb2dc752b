//! Talking to Redis without ever failing a request: a small pool of blocking connections, a
//! per-operation timeout, and a circuit breaker.
//!
//! Every operation either answers within its time bound or yields `None`, which the caller
//! treats as "the second tier has nothing to say" (a miss, a skipped write). The bound of one
//! operation is the connect timeout (only when no pooled connection is free: connect and
//! handshake) plus the operation timeout, one deadline for writing the request and reading the
//! whole reply (see [`conn`](super::conn)): a reply that drips in slowly times out as one that
//! never comes, is counted as a timeout, and feeds the breaker.
//!
//! The breaker counts consecutive failures. At `failures` of them it *opens*: operations are
//! skipped at once (no network, no waiting) for `cooldown`. Then one operation is let through
//! as a probe (*half-open*): success closes the breaker, failure opens it for another
//! cooldown. So with Redis down a caller pays at most one timeout per cooldown per failed probe,
//! not one per call.
//!
//! Times here are real time (`Instant`): they bound waits on a network, which the cache's
//! clock (possibly a manual one in tests) does not govern.

use super::conn::{Conn, Target};
use crate::stats::RemoteCounters;
use ::redis::{Client as RawClient, Connection, ConnectionLike, RedisError, RedisResult};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most this many idle connections are kept.
const MAX_IDLE: usize = 16;

/// The circuit breaker's state.
#[derive(Debug)]
enum State {
    /// Failures in a row so far.
    Closed(u32),
    /// Skip until then.
    Open(Instant),
    /// A probe is out; others skip until it reports.
    HalfOpen,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    state: Mutex<State>,
    failures: u32,
    cooldown: Duration,
}

/// What the breaker says about an operation about to start.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Go,
    Probe,
    Skip,
}

impl Breaker {
    pub(crate) fn new(failures: u32, cooldown: Duration) -> Self {
        Breaker {
            state: Mutex::new(State::Closed(0)),
            failures: failures.max(1),
            cooldown,
        }
    }

    pub(crate) fn admit(&self, now: Instant) -> Verdict {
        let mut s = self.state.lock();
        match *s {
            State::Closed(_) => Verdict::Go,
            State::Open(until) if now >= until => {
                *s = State::HalfOpen;
                Verdict::Probe
            }
            State::Open(_) | State::HalfOpen => Verdict::Skip,
        }
    }

    /// Reports an admitted operation's result; true if this opened the breaker.
    pub(crate) fn report(&self, ok: bool, now: Instant) -> bool {
        let mut s = self.state.lock();
        if ok {
            *s = State::Closed(0);
            return false;
        }
        let failures = match *s {
            State::Closed(n) => n + 1,
            // A failed probe (or a failure reported late, while open) re-opens.
            State::HalfOpen | State::Open(_) => self.failures,
        };
        if failures >= self.failures {
            let was_open = matches!(*s, State::Open(_));
            // A cooldown too long for an `Instant` (`Duration::MAX`) is a century.
            const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
            let until = now
                .checked_add(self.cooldown)
                .or_else(|| now.checked_add(CENTURY))
                .unwrap_or(now);
            *s = State::Open(until);
            !was_open
        } else {
            *s = State::Closed(failures);
            false
        }
    }

    /// Whether operations are currently being skipped.
    pub(crate) fn is_open(&self) -> bool {
        !matches!(*self.state.lock(), State::Closed(_))
    }
}

/// Connections to one Redis server, with the timeouts and the breaker applied.
/// Why an operation yielded nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failed {
    /// Redis is unreachable, slow, or skipped by the breaker.
    Unavailable,
    /// Redis answered with an error about this operation's key (e.g. `WRONGTYPE`).
    Key,
}

/// Whether an error is the server's refusal of one operation (its reply read in full), as
/// opposed to a failure of the connection or of the server as a whole.
///
/// Per operation: `WRONGTYPE` (a key of another type), `ERR` (a script's or a command's error
/// about its arguments, a value over the server's limits), `OOM` (writes refused, reads still
/// served), `EXECABORT`, and a reply of an unexpected shape. Everything else the server says
/// (`NOAUTH`, `WRONGPASS`, `NOPERM`, `BUSY`, `LOADING`, `READONLY`, `MASTERDOWN`, `MISCONF`, …)
/// concerns every key and counts against the breaker.
fn refused(e: &RedisError) -> bool {
    use ::redis::ErrorKind;
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        return false;
    }
    if e.kind() == ErrorKind::UnexpectedReturnType {
        return true;
    }
    // A pipeline's error carries each failed command's: all must be about their operation.
    match e.clone().into_server_errors() {
        Some(errors) => {
            !errors.is_empty()
                && errors
                    .iter()
                    .all(|(_, s)| matches!(s.code(), "WRONGTYPE" | "ERR" | "OOM" | "EXECABORT"))
        }
        None => false,
    }
}

pub(crate) struct Client {
    /// Where the subscriber connects: the server, or each node of a cluster in turn.
    subscribe: Vec<RawClient>,
    target: Target,
    idle: Mutex<Vec<Conn>>,
    connect_timeout: Duration,
    op_timeout: Duration,
    pub(crate) breaker: Breaker,
    pub(crate) counters: Arc<RemoteCounters>,
}

impl Client {
    pub(crate) fn new(
        target: Target,
        subscribe: Vec<RawClient>,
        connect_timeout: Duration,
        op_timeout: Duration,
        breaker: Breaker,
        counters: Arc<RemoteCounters>,
    ) -> Self {
        Client {
            subscribe,
            target,
            idle: Mutex::new(Vec::new()),
            connect_timeout,
            op_timeout,
            breaker,
            counters,
        }
    }

    /// A new connection of the `redis` crate (for the subscriber's `attempt`-th try: on a
    /// cluster, each node in turn), with the operation timeout for writes and `read_timeout`
    /// for reads.
    pub(crate) fn connect(
        &self,
        attempt: usize,
        read_timeout: Option<Duration>,
    ) -> RedisResult<Connection> {
        let raw = &self.subscribe[attempt % self.subscribe.len()];
        let conn = raw.get_connection_with_timeout(self.connect_timeout)?;
        conn.set_read_timeout(read_timeout)?;
        conn.set_write_timeout(Some(self.op_timeout))?;
        Ok(conn)
    }

    /// Runs `op` on a pooled connection, within the time bound and under the breaker. `None`:
    /// skipped or failed (counted); the caller goes on without the second tier.
    /// Runs `op`: `None` if Redis is unavailable or refused the operation (see
    /// [`run_result`](Self::run_result)).
    pub(crate) fn run<T>(&self, op: impl FnOnce(&mut Conn) -> RedisResult<T>) -> Option<T> {
        self.run_result(op).ok()
    }

    /// Runs `op` on a pooled (or new) connection, within the time bounds, unless the breaker
    /// is open. A failure of the connection counts toward the breaker; a server's refusal of
    /// one key's operation (a key of another type, a script error) does not: the server
    /// answered, the connection stays usable.
    pub(crate) fn run_result<T>(
        &self,
        op: impl FnOnce(&mut Conn) -> RedisResult<T>,
    ) -> Result<T, Failed> {
        let verdict = self.breaker.admit(Instant::now());
        if verdict == Verdict::Skip {
            self.counters.add(|c| &c.skipped);
            return Err(Failed::Unavailable);
        }
        let pooled = self.idle.lock().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let deadline = crate::clock::instant_after_or_far(self.connect_timeout);
                match Conn::open(&self.target, deadline) {
                    Ok(c) => c,
                    Err(e) => {
                        self.failed(&e);
                        return Err(Failed::Unavailable);
                    }
                }
            }
        };
        // One deadline for the whole operation: request, and every byte of the reply.
        if let Err(e) = conn.begin(crate::clock::instant_after_or_far(self.op_timeout)) {
            self.failed(&e);
            return Err(Failed::Unavailable);
        }
        // A panic in the client (parsing a malformed reply) is a failed connection, not a
        // failed request: the tier never fails a call, and a probe that panicked must still
        // report, or the breaker would stay half-open (skipping Redis) for good.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(&mut conn)))
            .unwrap_or_else(|p| {
                crate::unwind::discard(p);
                Err(RedisError::from(std::io::Error::other(
                    "the Redis client panicked during the operation",
                )))
            });
        let keyed = matches!(&result, Err(e) if refused(e)) && conn.is_open();
        match result {
            Err(e) if !keyed => {
                // The connection is dropped: after a timeout its stream may hold half a reply.
                self.failed(&e);
                Err(Failed::Unavailable)
            }
            result => {
                // Answered (a value, or a refusal read in full): the connection is reusable.
                self.breaker.report(true, Instant::now());
                let mut idle = self.idle.lock();
                if idle.len() < MAX_IDLE {
                    idle.push(conn);
                }
                drop(idle);
                result.map_err(|_| {
                    self.counters.add(|c| &c.key_errors);
                    Failed::Key
                })
            }
        }
    }

    fn failed(&self, e: &RedisError) {
        if e.is_timeout() {
            self.counters.add(|c| &c.timeouts);
        } else {
            self.counters.add(|c| &c.errors);
        }
        if self.breaker.report(false, Instant::now()) {
            self.counters.add(|c| &c.breaker_opened);
            // Pooled connections are likely dead too.
            self.idle.lock().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_failures_probes_after_cooldown_and_closes_on_success() {
        let b = Breaker::new(3, Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Verdict::Go);
        assert!(!b.report(false, t0));
        assert!(!b.report(false, t0));
        assert!(!b.is_open());
        assert!(b.report(false, t0), "the third failure in a row opens it");
        assert!(b.is_open());
        assert_eq!(b.admit(t0 + Duration::from_millis(50)), Verdict::Skip);
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.admit(t1), Verdict::Probe);
        assert_eq!(b.admit(t1), Verdict::Skip, "one probe at a time");
        assert!(b.report(false, t1), "a failed probe re-opens");
        assert_eq!(b.admit(t1 + Duration::from_millis(99)), Verdict::Skip);
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!(b.admit(t2), Verdict::Probe);
        assert!(!b.report(true, t2));
        assert!(!b.is_open());
        assert_eq!(b.admit(t2), Verdict::Go);
    }

    /// An operation that panics inside the client (a malformed reply tripping the parser) is
    /// a failed connection, not a failed request: the call yields nothing, and a probe that
    /// panicked reports, so the breaker re-opens instead of staying half-open (skipping
    /// Redis for good).
    #[test]
    fn a_probe_whose_operation_panics_reports_a_failure() {
        use super::super::conn::Dial;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts one connection and holds it a while (the operation sends nothing to it).
        std::thread::spawn(move || {
            let held = listener.accept();
            std::thread::sleep(Duration::from_millis(500));
            drop(held);
        });
        let url = format!("redis://127.0.0.1:{port}/");
        let info = ::redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
        let target = Target::Server {
            dial: Dial {
                info,
                #[cfg(feature = "redis-tls")]
                tls: None,
            },
            raw: RawClient::open(url.as_str()).unwrap(),
        };
        let cooldown = Duration::from_millis(20);
        let client = Client::new(
            target,
            Vec::new(),
            Duration::from_secs(2),
            Duration::from_secs(2),
            Breaker::new(1, cooldown),
            Arc::new(RemoteCounters::default()),
        );
        assert!(client.breaker.report(false, Instant::now()), "opened");
        std::thread::sleep(cooldown * 2);
        let ran = std::sync::atomic::AtomicBool::new(false);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            client.run_result(|_| -> RedisResult<()> {
                ran.store(true, std::sync::atomic::Ordering::SeqCst);
                panic!("injected: client")
            })
        }));
        assert!(
            ran.load(std::sync::atomic::Ordering::SeqCst),
            "the probe reached its operation"
        );
        assert!(
            matches!(r, Ok(Err(Failed::Unavailable))),
            "the panic is a failed operation, not the caller's"
        );
        assert!(
            client.breaker.is_open(),
            "the failed probe re-opened the breaker"
        );
        std::thread::sleep(cooldown * 2);
        assert_eq!(
            client.breaker.admit(Instant::now()),
            Verdict::Probe,
            "after the cooldown a new probe goes (not stuck half-open)"
        );
    }

    /// The server's error replies, as a command's result sees them.
    fn reply_error(line: &str) -> RedisError {
        let v = ::redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap();
        v.extract_error().unwrap_err()
    }

    #[test]
    fn per_key_refusals_and_server_wide_errors_are_told_apart() {
        for per_key in [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "ERR Error running script",
            "OOM command not allowed when used memory > 'maxmemory'.",
        ] {
            let e = reply_error(per_key);
            assert!(refused(&e), "{per_key}: {e:?} code {:?}", e.code());
        }
        for server_wide in [
            "NOAUTH Authentication required.",
            "NOPERM this user has no permissions",
            "BUSY Redis is busy running a script.",
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica.",
            "MISCONF Redis is configured to save RDB snapshots",
        ] {
            let e = reply_error(server_wide);
            assert!(!refused(&e), "{server_wide}: {e:?} code {:?}", e.code());
        }
        assert!(!refused(&RedisError::from(std::io::Error::from(
            std::io::ErrorKind::TimedOut
        ))));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let b = Breaker::new(2, Duration::from_secs(1));
        let t = Instant::now();
        b.report(false, t);
        b.report(true, t);
        assert!(!b.report(false, t));
        assert!(!b.is_open());
    }
}

//! A Redis Cluster over the tier's own connections: every operation, routing and redirects
//! included, ends by its deadline.
//!
//! A slot map (`CLUSTER SLOTS`, shared by the pooled connections) says which primary serves
//! each of the 16384 slots; a command goes to its key's slot's primary (a pipeline: one
//! sub-pipeline per node involved, sent in turn), a command without a key (`PUBLISH`, `PING`)
//! to any node. A `MOVED` reply (the slot has a new owner: a resharding, a failover) updates
//! the map and re-sends the command to the new owner; an `ASK` reply (the slot is being
//! migrated and the key is already on the target) re-sends it there after `ASKING`. At most
//! [`MAX_REDIRECTS`] redirects per command. Every write and read on every node's connection is
//! given what is left of the operation's deadline, so connecting to a node learned from a
//! redirect, the redirects themselves, and every byte of every reply are bounded together.
//!
//! The map is fetched when the first connection opens, again by a connection that opens after
//! a node failed (the map may be stale), and by `invalidate_all`'s scan (which must know every
//! primary); between those, `MOVED` replies keep it up to date slot by slot. A connection opens
//! one connection per primary; a primary it cannot reach is tried again (within their
//! deadlines) by the operations that need it, so the other primaries' keys are served
//! meanwhile.

use super::{left, Deadlined, Dial};
use ::redis::{cmd, ConnectionLike, FromRedisValue, RedisError, RedisResult, Value};
use parking_lot::Mutex;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// Slots of a Redis Cluster.
const SLOTS: usize = 16384;
/// Redirects (`MOVED`, `ASK`) followed per command before its error is returned.
pub(crate) const MAX_REDIRECTS: usize = 5;
/// No known owner.
const NONE: u16 = u16::MAX;

/// A node: host and port.
pub(crate) type Node = (String, u16);

/// Which primary serves each slot.
#[derive(Clone)]
struct Slots {
    nodes: Vec<Node>,
    /// Per slot: an index into `nodes`, or [`NONE`].
    owner: Vec<u16>,
}

impl Slots {
    fn node(&mut self, node: &Node) -> u16 {
        match self.nodes.iter().position(|n| n == node) {
            Some(i) => i as u16,
            None => {
                self.nodes.push(node.clone());
                (self.nodes.len() - 1) as u16
            }
        }
    }
}

/// A cluster: where to start, how to connect, and the slot map.
pub(crate) struct Cluster {
    seeds: Vec<Node>,
    dial: Dial,
    map: Mutex<Map>,
}

struct Map {
    slots: Option<Arc<Slots>>,
    /// A node failed: the next connection to open fetches the map again.
    stale: bool,
}

impl Cluster {
    pub(crate) fn new(seeds: Vec<Node>, dial: Dial) -> Self {
        Cluster {
            seeds,
            dial,
            map: Mutex::new(Map {
                slots: None,
                stale: true,
            }),
        }
    }

    /// `MOVED`: `slot` is served by `node` from now on.
    fn moved(&self, slot: u16, node: &Node) -> Arc<Slots> {
        let mut m = self.map.lock();
        let mut s = match &m.slots {
            Some(s) => (**s).clone(),
            None => Slots {
                nodes: Vec::new(),
                owner: vec![NONE; SLOTS],
            },
        };
        let i = s.node(node);
        s.owner[usize::from(slot) % SLOTS] = i;
        let s = Arc::new(s);
        m.slots = Some(Arc::clone(&s));
        s
    }
}

/// The tier's connections to a cluster's nodes, for one operation at a time.
pub(crate) struct ClusterConn {
    cluster: Arc<Cluster>,
    slots: Arc<Slots>,
    conns: Vec<(Node, Deadlined)>,
    deadline: Instant,
    /// False after a node's connection failed.
    open: bool,
}

/// One command of a packed pipeline: its bytes and its arguments' bytes.
struct Packed {
    range: Range<usize>,
    args: Vec<Range<usize>>,
}

/// A redirect reply.
struct Redirect {
    ask: bool,
    slot: u16,
    node: Node,
}

impl ClusterConn {
    /// Connects to every primary (fetching the slot map first if it is not known or may be
    /// stale), by `deadline`.
    pub(crate) fn open(cluster: Arc<Cluster>, deadline: Instant) -> RedisResult<Self> {
        let known = {
            let m = cluster.map.lock();
            if m.stale {
                None
            } else {
                m.slots.clone()
            }
        };
        let mut c = ClusterConn {
            cluster,
            slots: Arc::new(Slots {
                nodes: Vec::new(),
                owner: vec![NONE; SLOTS],
            }),
            conns: Vec::new(),
            deadline,
            open: true,
        };
        match known {
            Some(s) => c.slots = s,
            None => c.refresh()?,
        }
        // A primary that cannot be reached now (down, failing over) is tried again by the
        // operations that need it; the others serve their keys meanwhile.
        let mut failed = None;
        let mut connected = 0;
        for node in c.slots.nodes.clone() {
            match c.conn(&node) {
                Ok(_) => connected += 1,
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) if connected == 0 => Err(e),
            Some(_) => {
                c.cluster.map.lock().stale = true;
                Ok(c)
            }
            None => Ok(c),
        }
    }

    /// Starts an operation that must end by `deadline`; takes the latest slot map.
    pub(crate) fn begin(&mut self, deadline: Instant) {
        self.deadline = deadline;
        for (_, c) in &mut self.conns {
            c.set_deadline(deadline);
        }
        if let Some(s) = &self.cluster.map.lock().slots {
            self.slots = Arc::clone(s);
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open && self.conns.iter().all(|(_, c)| c.is_open())
    }

    /// Every primary, from a fresh `CLUSTER SLOTS`.
    pub(crate) fn primaries(&mut self) -> RedisResult<Vec<Node>> {
        self.refresh()?;
        let mut nodes: Vec<Node> = Vec::new();
        for &i in &self.slots.owner {
            if i != NONE {
                let n = &self.slots.nodes[usize::from(i)];
                if !nodes.contains(n) {
                    nodes.push(n.clone());
                }
            }
        }
        Ok(nodes)
    }

    /// Sends one packed command to `node`.
    pub(crate) fn on_node(&mut self, node: &Node, packed: &[u8]) -> RedisResult<Value> {
        self.guard(|c| {
            let i = c.conn(node)?;
            c.conns[i].1.req_packed_command(packed)
        })
    }

    /// Fails the connection (and marks the map possibly stale) if `f` fails.
    fn guard<T>(&mut self, f: impl FnOnce(&mut Self) -> RedisResult<T>) -> RedisResult<T> {
        let r = f(self);
        if r.is_err() {
            self.open = false;
            self.cluster.map.lock().stale = true;
        }
        r
    }

    /// Fetches the slot map from a connected node, a seed, or a known node, in that order.
    fn refresh(&mut self) -> RedisResult<()> {
        let mut candidates: Vec<Node> = self.conns.iter().map(|(n, _)| n.clone()).collect();
        candidates.extend(self.cluster.seeds.iter().cloned());
        candidates.extend(self.slots.nodes.iter().cloned());
        let mut last = None;
        for node in candidates {
            left(self.deadline)?;
            let got = self.conn(&node).and_then(|i| {
                let v: Value = cmd("CLUSTER").arg("SLOTS").query(&mut self.conns[i].1)?;
                parse_slots(v, &node.0)
            });
            match got {
                Ok(s) => {
                    let s = Arc::new(s);
                    let mut m = self.cluster.map.lock();
                    m.slots = Some(Arc::clone(&s));
                    m.stale = false;
                    drop(m);
                    self.slots = s;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no cluster node to ask for slots").into()
        }))
    }

    /// The index in `conns` of an open connection to `node`, connecting if needed (by the
    /// deadline).
    fn conn(&mut self, node: &Node) -> RedisResult<usize> {
        if let Some(i) = self.conns.iter().position(|(n, _)| n == node) {
            if self.conns[i].1.is_open() {
                return Ok(i);
            }
            self.conns.swap_remove(i);
        }
        let c = Deadlined::open(&node.0, node.1, &self.cluster.dial, self.deadline)?;
        self.conns.push((node.clone(), c));
        Ok(self.conns.len() - 1)
    }

    /// Where a command goes: its key's primary, or (no key, or no known owner) any node.
    fn route(&self, bytes: &[u8], p: &Packed) -> Node {
        if let Some(key) = key_of(bytes, p) {
            let owner = self.slots.owner[usize::from(slot(key))];
            if owner != NONE {
                return self.slots.nodes[usize::from(owner)].clone();
            }
        }
        if let Some((n, _)) = self.conns.first() {
            return n.clone();
        }
        self.slots
            .nodes
            .first()
            .or(self.cluster.seeds.first())
            .cloned()
            .unwrap_or_default()
    }

    /// Sends a packed pipeline: each command to its node (one sub-pipeline per node), then
    /// the redirects, all by the deadline.
    pub(crate) fn req_packed_commands(
        &mut self,
        bytes: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.guard(|c| c.pipeline(bytes, offset, count))
    }

    fn pipeline(&mut self, bytes: &[u8], offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        let cmds = split(bytes)?;
        let mut groups: Vec<(Node, Vec<usize>)> = Vec::new();
        for (i, p) in cmds.iter().enumerate() {
            let node = self.route(bytes, p);
            match groups.iter_mut().find(|(n, _)| *n == node) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((node, vec![i])),
            }
        }
        let mut replies: Vec<Value> = vec![Value::Nil; cmds.len()];
        for (node, idx) in groups {
            let mut buf = Vec::new();
            for &i in &idx {
                buf.extend_from_slice(&bytes[cmds[i].range.clone()]);
            }
            let c = self.conn(&node)?;
            let got = self.conns[c].1.req_packed_commands(&buf, 0, idx.len())?;
            for (i, v) in idx.into_iter().zip(got) {
                replies[i] = v;
            }
        }
        for (i, p) in cmds.iter().enumerate() {
            let mut hops = 0;
            while let Some(r) = redirect(&replies[i]) {
                if hops == MAX_REDIRECTS {
                    break;
                }
                hops += 1;
                replies[i] = self.follow(r, &bytes[p.range.clone()])?;
            }
        }
        Ok(replies.into_iter().skip(offset).take(count).collect())
    }

    /// Re-sends a command where a redirect says.
    fn follow(&mut self, r: Redirect, packed: &[u8]) -> RedisResult<Value> {
        let c = self.conn(&r.node)?;
        if r.ask {
            let mut buf = cmd("ASKING").get_packed_command();
            buf.extend_from_slice(packed);
            let mut got = self.conns[c].1.req_packed_commands(&buf, 1, 1)?;
            Ok(got.pop().unwrap_or(Value::Nil))
        } else {
            self.slots = self.cluster.moved(r.slot, &r.node);
            self.conns[c].1.req_packed_command(packed)
        }
    }
}

/// A `MOVED slot host:port` or `ASK slot host:port` reply.
fn redirect(v: &Value) -> Option<Redirect> {
    let Value::ServerError(e) = v else {
        return None;
    };
    let ask = match e.code() {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    let mut parts = e.details()?.split_whitespace();
    let slot = parts.next()?.parse().ok()?;
    let (host, port) = parts.next()?.rsplit_once(':')?;
    Some(Redirect {
        ask,
        slot,
        node: (host.to_owned(), port.parse().ok()?),
    })
}

/// The slot map of a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, …], replicas…],
/// …]` (an empty host: the node that answered, `asked`).
fn parse_slots(v: Value, asked: &str) -> RedisResult<Slots> {
    let mut s = Slots {
        nodes: Vec::new(),
        owner: vec![NONE; SLOTS],
    };
    let Value::Array(ranges) = v else {
        return Err(bad("CLUSTER SLOTS: not an array"));
    };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let (Some(start), Some(end), Some(Value::Array(primary))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let (start, end) = (
            usize::from_redis_value(start.clone())?,
            usize::from_redis_value(end.clone())?,
        );
        let host = primary
            .first()
            .map(|v| String::from_redis_value(v.clone()))
            .transpose()?
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| asked.to_owned());
        let Some(port) = primary.get(1) else { continue };
        let port = u16::from_redis_value(port.clone())?;
        let i = s.node(&(host, port));
        for slot in start..=end.min(SLOTS - 1) {
            s.owner[slot] = i;
        }
    }
    Ok(s)
}

fn bad(what: &'static str) -> RedisError {
    io::Error::new(io::ErrorKind::InvalidData, what).into()
}

/// Splits a packed pipeline (`*N\r\n` then `N` times `$len\r\n<bytes>\r\n`) into commands.
fn split(bytes: &[u8]) -> RedisResult<Vec<Packed>> {
    fn number(bytes: &[u8], at: &mut usize, lead: u8) -> RedisResult<usize> {
        if bytes.get(*at) != Some(&lead) {
            return Err(bad("packed command: unexpected byte"));
        }
        let start = *at + 1;
        let end = start
            + bytes[start..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("packed command: no line end"))?;
        let n = std::str::from_utf8(&bytes[start..end])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("packed command: bad length"))?;
        *at = end + 2;
        Ok(n)
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let start = at;
        let n = number(bytes, &mut at, b'*')?;
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            let len = number(bytes, &mut at, b'$')?;
            let end = at
                .checked_add(len)
                .filter(|&end| end.saturating_add(2) <= bytes.len())
                .ok_or_else(|| bad("packed command: truncated"))?;
            args.push(at..end);
            at = end + 2;
        }
        out.push(Packed {
            range: start..at,
            args,
        });
    }
    Ok(out)
}

/// The key that decides where a command goes, if any: the first key of a script, nothing for
/// commands about no key, else the first argument.
fn key_of<'a>(bytes: &'a [u8], p: &Packed) -> Option<&'a [u8]> {
    let arg = |i: usize| p.args.get(i).map(|r| &bytes[r.clone()]);
    let name = arg(0)?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"FCALL" => {
            let keys: usize = std::str::from_utf8(arg(2)?).ok()?.parse().ok()?;
            if keys == 0 {
                None
            } else {
                arg(3)
            }
        }
        b"PUBLISH" | b"PING" | b"SCAN" | b"INFO" | b"CLUSTER" | b"ASKING" | b"ECHO" => None,
        _ => arg(1),
    }
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the first non-empty `{…}`), or
/// of the whole key, modulo 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            Some(&rest[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_redis_crate_s() {
        for key in [
            &b"123456789"[..],
            b"foo",
            b"somekey",
            b"foo{hash_tag}",
            b"{}x",
            b"a{b}c{d}",
            b"{",
            b"ns:v{k}",
            b"",
        ] {
            let theirs = format!("{:?}", ::redis::cluster_routing::Slot::for_key(key));
            assert_eq!(format!("Slot({})", slot(key)), theirs, "{key:?}");
        }
        assert_eq!(slot(b"somekey"), 11058);
        assert_eq!(slot(b"foo{hash_tag}"), 2515);
    }

    #[test]
    fn packed_pipelines_split_and_route_by_key() {
        let mut p = ::redis::pipe();
        p.cmd("HMGET").arg("k{a}").arg("d");
        p.cmd("EVAL").arg("return 1").arg(2).arg("x{b}").arg("y{b}");
        p.cmd("PUBLISH").arg("ch").arg("m\r\nx");
        let bytes = p.get_packed_pipeline();
        let cmds = split(&bytes).unwrap();
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[2].range.end, bytes.len());
        assert_eq!(key_of(&bytes, &cmds[0]), Some(&b"k{a}"[..]));
        assert_eq!(key_of(&bytes, &cmds[1]), Some(&b"x{b}"[..]));
        assert_eq!(key_of(&bytes, &cmds[2]), None);
        assert!(split(b"*1\r\n$5\r\nab").is_err());
    }

    #[test]
    fn redirects_are_parsed() {
        let v = ::redis::parse_redis_value(b"-MOVED 3999 127.0.0.1:6381\r\n").unwrap();
        let r = redirect(&v).unwrap();
        assert!(!r.ask);
        assert_eq!((r.slot, r.node), (3999, ("127.0.0.1".to_owned(), 6381)));
        let v = ::redis::parse_redis_value(b"-ASK 1 ::1:7000\r\n").unwrap();
        let r = redirect(&v).unwrap();
        assert!(r.ask);
        assert_eq!(r.node, ("::1".to_owned(), 7000));
        let v = ::redis::parse_redis_value(b"-ERR no\r\n").unwrap();
        assert!(redirect(&v).is_none());
    }
}

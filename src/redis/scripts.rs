//! The Lua scripts that order writes in Redis: each runs atomically on the server, so a load's
//! write-back, an insert and an invalidation of one key are decided in one place (see the
//! module docs of [`crate::redis`] for the guarantee and the key layout).

/// Deletes the lease only if it still holds our token (another instance may own it now).
pub(crate) const RELEASE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0";

/// Replaces a key of another type (an older layout, a stray write) so that the script after it
/// can use the hash: a bad key is repaired by the next write, not left failing.
macro_rules! repair {
    () => {
        "local t = redis.call('type', KEYS[1]).ok \
         if t ~= 'hash' and t ~= 'none' then redis.call('del', KEYS[1]) end "
    };
}

/// Reads a local `old` (a stored counter as Redis returned it: a string, or `false`) as a
/// number, and the server's clock in microseconds as a local `now`. A stored value that is
/// not a counter — not a number, negative, fractional, or more than 2^41 µs (25 days) ahead
/// of the clock — counts as 0: a stray write. Counters this tier writes are at most the clock
/// plus one per write made within the same microsecond, so the horizon keeps them far below
/// 2^53, where Lua's numbers stop counting by one (a stray value just below it counted up
/// to it would turn to 0 at the next write: the counter would go back), and tolerates the
/// server's clock stepping back by up to 25 days.
macro_rules! counter {
    () => {
        "local t = redis.call('time') \
         local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
         old = tonumber(old or '0') or 0 \
         if old < 0 or old > now + 2199023255552 or old ~= math.floor(old) then old = 0 end "
    };
}

/// A local `v` past a local `old` (the stored counter, read as a number or `nil`), and at
/// least the server's clock in microseconds (a local `now`), so that the counter keeps
/// increasing when its key is lost and written again. A stored value that is not a counter
/// counts as 0 and is replaced ([`counter!`]). Needs `redis.replicate_commands()` first
/// (`TIME`).
macro_rules! past_the_clock {
    () => {
        concat!(counter!(), "local v = math.max(old + 1, now) ")
    };
}

/// Replaces the epoch key if it is of another type (a stray write), so that the script after
/// it can read and set it as a string.
macro_rules! repair_epoch {
    () => {
        "local t = redis.call('type', KEYS[1]).ok \
         if t ~= 'string' and t ~= 'none' then redis.call('del', KEYS[1]) end "
    };
}

/// Advances the key's version (a local `v`, [`past_the_clock!`]), so that versions keep
/// increasing when the key's hash expires and is written again (an instance remembers the
/// version of its own last write of a key, and ignores messages older than it).
macro_rules! next_version {
    () => {
        concat!(
            "redis.replicate_commands() \
             local old = redis.call('hget', KEYS[1], 'v') ",
            past_the_clock!(),
            "redis.call('hset', KEYS[1], 'v', string.format('%.0f', v)) "
        )
    };
}

/// A new invalidate-all epoch: KEYS = epoch. As a key's version ([`past_the_clock!`]), so
/// that an epoch lost with its key (a restart without persistence, `FLUSHALL`, an eviction)
/// comes back above every epoch a load may have read before. Returns the new epoch.
pub(crate) const NEXT_EPOCH: &str = concat!(
    "redis.replicate_commands() ",
    repair_epoch!(),
    "local old = redis.call('get', KEYS[1]) ",
    past_the_clock!(),
    "redis.call('set', KEYS[1], string.format('%.0f', v)) \
     return v"
);

/// The namespace's invalidate-all epoch, as a read sees it: KEYS = epoch. An absent epoch (never
/// set, or lost: a restart without persistence, `FLUSHALL`, an eviction) is set first, as
/// [`NEXT_EPOCH`] would, so that a value a load wrote back with the epoch it read before the
/// loss (its key's version lost too, the write-back found the key absent as it had read it) is
/// below the epoch every later read sees: not a value. So is an epoch that is not a counter
/// (a stray write, of another type or not a number [`counter!`] accepts): every script then
/// sees the same epoch (one that [`NEXT_EPOCH`] would read as 0 and replace by the clock
/// would go back below what loads read before). Returns the epoch.
pub(crate) const EPOCH: &str = concat!(
    "redis.replicate_commands() ",
    repair_epoch!(),
    "local stored = redis.call('get', KEYS[1]) \
     local old = stored ",
    counter!(),
    "if stored and old > 0 then return string.format('%.0f', old) end \
     local e = string.format('%.0f', math.max(1, now)) \
     redis.call('set', KEYS[1], e) \
     return e"
);

/// A load's write-back: KEYS = value, lease; ARGV = version read, bytes, px, epoch read, lease
/// token ('' without a lease). Stores only if nothing wrote or invalidated the key since the
/// load read it, and (with a lease) only while the lease is ours; releases the lease.
/// Returns 1 stored, 0 superseded, -1 lease lost.
pub(crate) const WRITE_BACK: &str = concat!(
    "redis.replicate_commands() ",
    repair!(),
    // The version as a read returns it ([`READ`]): a stored one that is not a counter is 0.
    "local old = redis.call('hget', KEYS[1], 'v') ",
    counter!(),
    "if string.format('%.0f', old) ~= ARGV[1] then \
       if ARGV[5] ~= '' and redis.call('get', KEYS[2]) == ARGV[5] then redis.call('del', KEYS[2]) end \
       return 0 end \
     if ARGV[5] ~= '' then \
       if redis.call('get', KEYS[2]) ~= ARGV[5] then return -1 end \
       redis.call('del', KEYS[2]) end \
     redis.call('hset', KEYS[1], 'd', ARGV[2], 'e', ARGV[4]) \
     redis.call('pexpire', KEYS[1], ARGV[3]) \
     return 1"
);

/// An insert: KEYS = value; ARGV = bytes, px. Returns the new version.
pub(crate) const INSERT: &str = concat!(
    repair!(),
    next_version!(),
    "redis.call('hset', KEYS[1], 'd', ARGV[1]) \
     redis.call('hdel', KEYS[1], 'e') \
     redis.call('pexpire', KEYS[1], ARGV[2]) \
     return v"
);

/// An invalidation: KEYS = value, lease; ARGV = tombstone px. Leaves a tombstone (the version,
/// no value), revokes the lease. Returns the new version.
pub(crate) const TOMBSTONE: &str = concat!(
    repair!(),
    next_version!(),
    "redis.call('hdel', KEYS[1], 'd', 'e') \
     redis.call('pexpire', KEYS[1], ARGV[1]) \
     redis.call('del', KEYS[2]) \
     return v"
);

/// A read of a key's hash: KEYS = value; ARGV = the largest value to return, in bytes. A key
/// of another type reads as absent (no error: a lease taken in the same round trip is then
/// used, and the write-back repairs the key).
/// Returns {value, version, epoch, oversized}: the value (nil if absent, or if larger than
/// `ARGV[1]`: then oversized is 1), so that a value written by an instance with a larger
/// `max_value_size` is never carried over the link (it would time out the read and count
/// against the breaker for every key). The version as the scripts count it ([`counter!`]):
/// one that is not a counter (a stray write) reads as none, so that no instance remembers a
/// version the next write of the key starts again below (a stray version beyond the horizon,
/// remembered, hid later tombstones and dropped the instance's own inserts).
pub(crate) const READ: &str = concat!(
    "if redis.call('type', KEYS[1]).ok ~= 'hash' then \
       return {false, false, false, 0} end \
     local f = redis.call('hmget', KEYS[1], 'v', 'e') \
     local old = f[1] ",
    counter!(),
    "local v = false \
     if old > 0 then v = string.format('%.0f', old) end \
     if redis.call('hstrlen', KEYS[1], 'd') > tonumber(ARGV[1]) then \
       return {false, v, f[2], 1} end \
     return {redis.call('hget', KEYS[1], 'd'), v, f[2], 0}"
);

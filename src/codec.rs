//! Codecs: how keys and values become bytes for a shared second tier (feature `redis`).
//!
//! A [`Codec<T>`] turns a `T` into bytes and back. The same codec must be used by every
//! instance that shares a namespace: the bytes of a key name its entry in Redis, and the bytes
//! of a value are what another instance decodes.
//!
//! Built in: [`Plain`] for strings, byte vectors and integers (no dependency), and, with the
//! `serde` feature, [`Json`] for any `Serialize + DeserializeOwned` type.

use crate::settings::BoxError;

/// Turns a `T` into bytes and back.
///
/// `encode` must be deterministic for keys (equal keys give equal bytes), since the bytes name
/// the entry in the shared tier. A decode error is counted (`RemoteStats::errors`) and treated
/// as a miss of the second tier: the value is loaded instead; it never fails a request.
///
/// # Example
///
/// ```
/// use herdcache::codec::Codec;
///
/// /// Points as two little-endian `i32`s.
/// struct PointCodec;
/// impl Codec<(i32, i32)> for PointCodec {
///     fn encode(&self, p: &(i32, i32), out: &mut Vec<u8>) -> Result<(), herdcache::BoxError> {
///         out.extend_from_slice(&p.0.to_le_bytes());
///         out.extend_from_slice(&p.1.to_le_bytes());
///         Ok(())
///     }
///     fn decode(&self, b: &[u8]) -> Result<(i32, i32), herdcache::BoxError> {
///         let b: [u8; 8] = b.try_into()?;
///         let x = i32::from_le_bytes(b[..4].try_into()?);
///         let y = i32::from_le_bytes(b[4..].try_into()?);
///         Ok((x, y))
///     }
/// }
///
/// let mut buf = Vec::new();
/// PointCodec.encode(&(3, -4), &mut buf).unwrap();
/// assert_eq!(PointCodec.decode(&buf).unwrap(), (3, -4));
/// ```
pub trait Codec<T>: Send + Sync + 'static {
    /// Appends the bytes of `value` to `out`.
    ///
    /// # Errors
    ///
    /// When `value` cannot be encoded: a load's write-back is then skipped, and an `insert`
    /// of it leaves a tombstone in Redis instead (as for a value above
    /// `RedisTier::max_value_size`), so that no instance reads an older value from there.
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), BoxError>;

    /// Rebuilds a value from bytes `encode` produced.
    ///
    /// # Errors
    ///
    /// When the bytes are not a valid encoding (e.g. written by an instance with another
    /// codec or another version of the type).
    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError>;
}

/// A codec without dependencies for `String` (UTF-8), `Vec<u8>` (as is) and the integer types
/// (decimal text, so keys read well in `redis-cli`).
///
/// ```
/// use herdcache::codec::{Codec, Plain};
/// let mut buf = Vec::new();
/// Plain.encode(&42u64, &mut buf).unwrap();
/// assert_eq!(buf, b"42");
/// assert_eq!(<Plain as Codec<u64>>::decode(&Plain, b"42").unwrap(), 42);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Plain;

impl Codec<String> for Plain {
    fn encode(&self, value: &String, out: &mut Vec<u8>) -> Result<(), BoxError> {
        out.extend_from_slice(value.as_bytes());
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<String, BoxError> {
        Ok(String::from_utf8(bytes.to_vec())?)
    }
}

impl Codec<Vec<u8>> for Plain {
    fn encode(&self, value: &Vec<u8>, out: &mut Vec<u8>) -> Result<(), BoxError> {
        out.extend_from_slice(value);
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, BoxError> {
        Ok(bytes.to_vec())
    }
}

macro_rules! plain_integers {
    ($($t:ty),*) => {$(
        impl Codec<$t> for Plain {
            fn encode(&self, value: &$t, out: &mut Vec<u8>) -> Result<(), BoxError> {
                use std::io::Write;
                write!(out, "{value}")?;
                Ok(())
            }
            fn decode(&self, bytes: &[u8]) -> Result<$t, BoxError> {
                Ok(std::str::from_utf8(bytes)?.parse()?)
            }
        }
    )*};
}

plain_integers!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize);

/// JSON through serde (feature `serde`), for any `Serialize + DeserializeOwned` type.
///
/// ```
/// use herdcache::codec::{Codec, Json};
/// let mut buf = Vec::new();
/// Json.encode(&vec![1u32, 2], &mut buf).unwrap();
/// assert_eq!(buf, b"[1,2]");
/// let back: Vec<u32> = Json.decode(&buf).unwrap();
/// assert_eq!(back, vec![1, 2]);
/// ```
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

#[cfg(feature = "serde")]
impl<T> Codec<T> for Json
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), BoxError> {
        serde_json::to_writer(out, value)?;
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round<T: PartialEq + std::fmt::Debug, C: Codec<T>>(c: &C, v: T) {
        let mut buf = Vec::new();
        c.encode(&v, &mut buf).unwrap();
        assert_eq!(c.decode(&buf).unwrap(), v);
    }

    #[test]
    fn plain_round_trips_and_rejects_garbage() {
        round(&Plain, "héllo".to_string());
        round(&Plain, vec![0u8, 255, 10]);
        round(&Plain, u64::MAX);
        round(&Plain, i64::MIN);
        assert!(<Plain as Codec<u32>>::decode(&Plain, b"12x").is_err());
        assert!(<Plain as Codec<String>>::decode(&Plain, &[0xff, 0xfe]).is_err());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_round_trips_and_rejects_garbage() {
        round(&Json, (1u8, "a".to_string(), vec![Some(2.5f64), None]));
        assert!(<Json as Codec<Vec<u32>>>::decode(&Json, b"{").is_err());
    }
}

//! PURE: decoded AVL records -> PostgreSQL binary COPY rows for the `telemetry` table.
//!
//! Called on the shards (hence its place under `shard`), so the writer threads only
//! concatenate ready-made rows into their COPY stream; the column order is [`COLUMNS`] (see
//! `migrations/V1__telemetry.sql`).

use xxhash_rust::xxh3::xxh3_64;

use crate::protocol::{AvlData, AvlRecord, Imei, IoValue};

/// The COPY column list, in the order the rows are encoded.
pub const COLUMNS: &str =
    "imei, ts, received_at, codec, priority, lat, lon, alt, angle, sats, speed, \
                           event_io, gen_type, io_ids, io_values, nx_ids, nx_values, rec_hash";
const NCOLS: i16 = 18;

/// The binary COPY header: signature, flags, header extension length.
pub const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The binary COPY trailer.
pub const COPY_TRAILER: &[u8] = &[0xff, 0xff];

const INT4_OID: u32 = 23;
const INT8_OID: u32 = 20;
const BYTEA_OID: u32 = 17;

/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// First timestamp PostgreSQL refuses (year 294277), in PostgreSQL microseconds.
const PG_END_TIMESTAMP_US: i64 = 9_223_371_331_200_000_000;

/// A device time in ms since the Unix epoch as a PostgreSQL timestamptz. Times past the end of
/// PostgreSQL's range (garbage clocks) become `infinity`, so one bad clock cannot fail a batch.
pub fn pg_timestamp_from_unix_ms(ms: u64) -> i64 {
    let us = ms as i128 * 1000 - PG_EPOCH_OFFSET_US as i128;
    if us >= PG_END_TIMESTAMP_US as i128 {
        i64::MAX
    } else {
        us as i64
    }
}

/// A gateway clock reading (µs since the Unix epoch) as a PostgreSQL timestamptz.
pub fn pg_timestamp_from_unix_us(us: i64) -> i64 {
    us - PG_EPOCH_OFFSET_US
}

/// The identity of a record among the same device's records at the same timestamp: a hash of
/// its exact wire bytes, so a resend is recognised and a distinct record is kept.
pub fn record_hash(r: &AvlRecord<'_>) -> i64 {
    xxh3_64(r.raw()) as i64
}

#[inline]
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Writes a one-dimensional array whose elements `each` appends (each with its own length
/// prefix); the field length and element count are patched in afterwards.
fn array(out: &mut Vec<u8>, oid: u32, each: impl FnOnce(&mut Vec<u8>) -> u32) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]); // field length, patched
    out.extend_from_slice(&1i32.to_be_bytes()); // ndim, patched to 0 when empty
    out.extend_from_slice(&0i32.to_be_bytes()); // has nulls
    out.extend_from_slice(&oid.to_be_bytes());
    let dims = out.len();
    out.extend_from_slice(&[0; 4]); // dim length, patched
    out.extend_from_slice(&1i32.to_be_bytes()); // lower bound
    let n = each(out);
    if n == 0 {
        out.truncate(dims);
        out[start + 4..start + 8].copy_from_slice(&0i32.to_be_bytes());
    } else {
        out[dims..dims + 4].copy_from_slice(&(n as i32).to_be_bytes());
    }
    let len = (out.len() - start - 4) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Bytes of a field of `n` data bytes.
const fn f(n: usize) -> usize {
    4 + n
}
/// Bytes of an array field of `n` elements (header: ndim, has-nulls, oid, and one dimension
/// when not empty).
const fn arr(n: usize, elements: usize) -> usize {
    if n == 0 {
        f(12)
    } else {
        f(20) + elements
    }
}
/// Bytes of a record's row outside its IO arrays.
const ROW_FIXED: usize = 2
    + f(8) * 3 // imei, ts, received_at
    + f(2) * 3 // codec, priority, alt
    + f(8) * 2 // lat, lon
    + f(4) * 3 // angle, speed, event_io
    + f(2) // sats
    + f(8); // rec_hash

/// Exactly the bytes [`encode_rows`] appends for `avl`, computed without encoding: a shard
/// reserves this much of its memory budget before it encodes a frame.
pub fn rows_len(avl: &AvlData<'_>) -> usize {
    let mut total = 0;
    for r in avl.records() {
        let (mut fixed, mut nx, mut nx_bytes) = (0usize, 0usize, 0usize);
        r.for_each_io(|e| match e.value {
            IoValue::Nx(b) => {
                nx += 1;
                nx_bytes += f(b.len());
            }
            _ => fixed += 1,
        });
        let gen_type = if r.gen_type().is_some() { f(2) } else { 4 };
        total += ROW_FIXED
            + gen_type
            + arr(fixed, fixed * f(4))
            + arr(fixed, fixed * f(8))
            + arr(nx, nx * f(4))
            + arr(nx, nx_bytes);
    }
    total
}

/// Appends one COPY row per record of `avl` (no header or trailer). `received_at_us` is the
/// gateway's clock, µs since the Unix epoch.
pub fn encode_rows(imei: Imei, avl: &AvlData<'_>, received_at_us: i64, out: &mut Vec<u8>) {
    let received = pg_timestamp_from_unix_us(received_at_us).to_be_bytes();
    let codec = (avl.codec().id() as i16).to_be_bytes();
    for r in avl.records() {
        out.extend_from_slice(&NCOLS.to_be_bytes());
        field(out, &(imei.as_u64() as i64).to_be_bytes());
        field(out, &pg_timestamp_from_unix_ms(r.ts_ms()).to_be_bytes());
        field(out, &received);
        field(out, &codec);
        field(out, &(r.priority() as i16).to_be_bytes());
        field(out, &r.lat().to_be_bytes());
        field(out, &r.lon().to_be_bytes());
        field(out, &r.alt().to_be_bytes());
        field(out, &(r.angle() as i32).to_be_bytes());
        field(out, &(r.sats() as i16).to_be_bytes());
        field(out, &(r.speed() as i32).to_be_bytes());
        field(out, &(r.event_io() as i32).to_be_bytes());
        match r.gen_type() {
            Some(g) => field(out, &(g as i16).to_be_bytes()),
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        array(out, INT4_OID, |o| {
            let mut n = 0;
            r.for_each_io(|e| {
                if !matches!(e.value, IoValue::Nx(_)) {
                    field(o, &(e.id as i32).to_be_bytes());
                    n += 1;
                }
            });
            n
        });
        array(out, INT8_OID, |o| {
            let mut n = 0;
            r.for_each_io(|e| {
                if let Some(v) = e.value.as_u64() {
                    field(o, &(v as i64).to_be_bytes());
                    n += 1;
                }
            });
            n
        });
        // Variable-length values exist only in Codec 8E (and are few): the plain iterator.
        let nx = || {
            r.io().filter_map(|e| match e.value {
                IoValue::Nx(b) => Some((e.id, b)),
                _ => None,
            })
        };
        array(out, INT4_OID, |o| {
            let mut n = 0;
            for (id, _) in nx() {
                field(o, &(id as i32).to_be_bytes());
                n += 1;
            }
            n
        });
        array(out, BYTEA_OID, |o| {
            let mut n = 0;
            for (_, b) in nx() {
                field(o, b);
                n += 1;
            }
            n
        });
        field(out, &record_hash(&r).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(pg_timestamp_from_unix_ms(946_684_800_000), 0);
        assert_eq!(pg_timestamp_from_unix_ms(0), -PG_EPOCH_OFFSET_US);
        assert_eq!(pg_timestamp_from_unix_ms(u64::MAX), i64::MAX);
    }

    #[test]
    fn empty_array_is_zero_dimensional() {
        let mut out = Vec::new();
        array(&mut out, INT4_OID, |_| 0);
        // length 12: ndim 0, no nulls, oid
        assert_eq!(out, [0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 23]);
    }
}

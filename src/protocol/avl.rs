//! AVL data: Codec 8, 8 Extended and 16 record arrays, decoded as borrowed views. PURE.
//!
//! [`AvlData::parse`] walks every record once to validate lengths and counts; after that the
//! record and IO iterators re-read the same borrowed bytes without copying or allocating.

use zerocopy::byteorder::{BigEndian, I16, I32, U16, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::{Codec, DecodeError};

/// The 24 bytes every record starts with, in wire layout (longitude comes first).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub struct RecordHeader {
    ts_ms: U64<BigEndian>,
    priority: u8,
    lon: I32<BigEndian>,
    lat: I32<BigEndian>,
    alt: I16<BigEndian>,
    angle: U16<BigEndian>,
    sats: u8,
    speed: U16<BigEndian>,
}

const HEADER_LEN: usize = std::mem::size_of::<RecordHeader>();
const _: () = assert!(HEADER_LEN == 24);

/// The validated record array of one AVL frame or datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvlData<'a> {
    codec: Codec,
    count: u8,
    records: &'a [u8],
}

impl<'a> AvlData<'a> {
    /// Parses `data` = codec id, count1, records, count2 (what a TCP frame's data length counts).
    ///
    /// # Errors
    /// Unknown or non-AVL codec, count1 != count2, a length that runs past the bytes present,
    /// an IO total that differs from the sum of its groups, or bytes left after the last record.
    pub fn parse(data: &'a [u8]) -> Result<AvlData<'a>, DecodeError> {
        if data.len() < 3 {
            return Err(DecodeError::Truncated { what: "avl data" });
        }
        let codec = Codec::from_id(data[0]).ok_or(DecodeError::UnknownCodec(data[0]))?;
        if !codec.is_avl() {
            return Err(DecodeError::UnknownCodec(data[0]));
        }
        let count = data[1];
        let count2 = data[data.len() - 1];
        if count != count2 {
            return Err(DecodeError::CountMismatch {
                first: count,
                last: count2,
            });
        }
        let records = &data[2..data.len() - 1];
        let mut rest = records;
        for _ in 0..count {
            let len = record_len(codec, rest)?;
            rest = &rest[len..];
        }
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes {
                extra: rest.len() as u32,
            });
        }
        Ok(AvlData {
            codec,
            count,
            records,
        })
    }

    /// Which codec the records are in.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// How many records the frame holds (and how many an ack accepts).
    pub fn count(&self) -> u8 {
        self.count
    }

    /// The records' wire bytes (between count1 and count2).
    pub fn records_bytes(&self) -> &'a [u8] {
        self.records
    }

    /// The records, in wire order, borrowing the frame.
    pub fn records(&self) -> Records<'a> {
        Records {
            codec: self.codec,
            rest: self.records,
            left: self.count,
        }
    }
}

/// Iterator over the records of a validated [`AvlData`].
#[derive(Clone, Debug)]
pub struct Records<'a> {
    codec: Codec,
    rest: &'a [u8],
    left: u8,
}

impl<'a> Iterator for Records<'a> {
    type Item = AvlRecord<'a>;

    fn next(&mut self) -> Option<AvlRecord<'a>> {
        if self.left == 0 {
            return None;
        }
        // Validated by AvlData::parse; a failure here cannot happen, and ends the iteration.
        let len = record_len(self.codec, self.rest).ok()?;
        let (raw, rest) = self.rest.split_at(len);
        self.rest = rest;
        self.left -= 1;
        AvlRecord::from_raw(self.codec, raw)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

impl ExactSizeIterator for Records<'_> {}

/// Byte sizes of a codec's IO element fields.
struct IoLayout {
    /// event IO id width
    event: usize,
    /// generation type byte present
    gen_type: bool,
    /// width of the total count and of each group count
    count: usize,
    /// width of each IO id
    id: usize,
    /// an NX (variable length) group follows the fixed ones
    nx: bool,
}

fn layout(codec: Codec) -> IoLayout {
    match codec {
        Codec::C8 => IoLayout {
            event: 1,
            gen_type: false,
            count: 1,
            id: 1,
            nx: false,
        },
        Codec::C8E => IoLayout {
            event: 2,
            gen_type: false,
            count: 2,
            id: 2,
            nx: true,
        },
        Codec::C16 => IoLayout {
            event: 2,
            gen_type: true,
            count: 1,
            id: 2,
            nx: false,
        },
        // Non-AVL codecs never reach here: AvlData::parse refuses them.
        _ => IoLayout {
            event: 1,
            gen_type: false,
            count: 1,
            id: 1,
            nx: false,
        },
    }
}

const WIDTHS: [usize; 4] = [1, 2, 4, 8];

#[inline]
fn read_be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64)
}

#[inline]
fn take<'a>(
    buf: &'a [u8],
    at: usize,
    n: usize,
    what: &'static str,
) -> Result<&'a [u8], DecodeError> {
    buf.get(at..at + n).ok_or(DecodeError::Truncated { what })
}

/// Length in bytes of the record at the start of `buf`, checking every inner length and the
/// IO total against the group counts.
fn record_len(codec: Codec, buf: &[u8]) -> Result<usize, DecodeError> {
    let l = layout(codec);
    let mut at = HEADER_LEN + l.event + l.gen_type as usize;
    let total = read_be(take(buf, at, l.count, "record")?);
    at += l.count;
    let mut sum = 0u64;
    for w in WIDTHS {
        let n = read_be(take(buf, at, l.count, "io group")?);
        at += l.count;
        sum += n;
        at += n as usize * (l.id + w);
    }
    if l.nx {
        let n = read_be(take(buf, at, 2, "nx group")?);
        at += 2;
        sum += n;
        for _ in 0..n {
            let len = read_be(take(buf, at + l.id, 2, "nx element")?) as usize;
            at += l.id + 2 + len;
        }
    }
    if at > buf.len() {
        return Err(DecodeError::Truncated {
            what: "io elements",
        });
    }
    if total != sum {
        return Err(DecodeError::IoCountMismatch {
            total: total as u16,
            sum: sum as u16,
        });
    }
    Ok(at)
}

/// One AVL record, borrowing its bytes from the frame.
#[derive(Clone, Copy, Debug)]
pub struct AvlRecord<'a> {
    codec: Codec,
    header: &'a RecordHeader,
    event_io: u16,
    gen_type: Option<u8>,
    /// From the IO total count to the end of the record.
    io: &'a [u8],
    raw: &'a [u8],
}

impl<'a> AvlRecord<'a> {
    fn from_raw(codec: Codec, raw: &'a [u8]) -> Option<AvlRecord<'a>> {
        let (header, rest) = RecordHeader::ref_from_prefix(raw).ok()?;
        let l = layout(codec);
        let event_io = read_be(rest.get(..l.event)?) as u16;
        let gen_type = if l.gen_type {
            Some(*rest.get(l.event)?)
        } else {
            None
        };
        let io = rest.get(l.event + l.gen_type as usize..)?;
        Some(AvlRecord {
            codec,
            header,
            event_io,
            gen_type,
            io,
            raw,
        })
    }

    /// The record's exact wire bytes (what identifies a resend).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
    /// Device time, milliseconds since the Unix epoch (UTC).
    pub fn ts_ms(&self) -> u64 {
        self.header.ts_ms.get()
    }
    /// 0 low, 1 high, 2 panic.
    pub fn priority(&self) -> u8 {
        self.header.priority
    }
    /// Longitude in degrees x 10^7.
    pub fn lon_e7(&self) -> i32 {
        self.header.lon.get()
    }
    /// Latitude in degrees x 10^7.
    pub fn lat_e7(&self) -> i32 {
        self.header.lat.get()
    }
    /// Longitude in degrees.
    pub fn lon(&self) -> f64 {
        self.lon_e7() as f64 / 1e7
    }
    /// Latitude in degrees.
    pub fn lat(&self) -> f64 {
        self.lat_e7() as f64 / 1e7
    }
    /// Altitude in metres.
    pub fn alt(&self) -> i16 {
        self.header.alt.get()
    }
    /// Heading, degrees from north.
    pub fn angle(&self) -> u16 {
        self.header.angle.get()
    }
    /// Satellites in use; 0 means no valid fix.
    pub fn sats(&self) -> u8 {
        self.header.sats
    }
    /// Speed in km/h.
    pub fn speed(&self) -> u16 {
        self.header.speed.get()
    }
    /// The IO id that triggered the record (0 when none).
    pub fn event_io(&self) -> u16 {
        self.event_io
    }
    /// Generation type (Codec 16 only).
    pub fn gen_type(&self) -> Option<u8> {
        self.gen_type
    }
    /// Total IO element count the record declares.
    pub fn io_total(&self) -> u16 {
        let l = layout(self.codec);
        read_be(&self.io[..l.count]) as u16
    }
    /// Every IO element, in wire order (1-, 2-, 4-, 8-byte groups, then NX).
    pub fn io(&self) -> IoIter<'a> {
        let l = layout(self.codec);
        let mut it = IoIter {
            buf: self.io,
            at: l.count,
            left: 0,
            group: 0,
            id_w: l.id as u8,
            count_w: l.count as u8,
            last_group: if l.nx { 4 } else { 3 },
        };
        it.left = it.read_count().unwrap_or(0);
        it
    }
    /// Calls `f` with every IO element, in wire order: the same elements as [`Self::io`], by
    /// internal iteration, which lets each group's loop run with the codec's widths as
    /// constants (the hot path: row encoding on the shards).
    #[inline]
    pub fn for_each_io(&self, mut f: impl FnMut(IoElement<'a>)) {
        let _ = match self.codec {
            Codec::C8 => walk_groups::<1, 1>(self.io, false, &mut f),
            Codec::C8E => walk_groups::<2, 2>(self.io, true, &mut f),
            _ => walk_groups::<2, 1>(self.io, false, &mut f),
        };
    }

    /// An owned copy, for tests, tools and the load generator.
    pub fn to_owned_record(&self) -> Record {
        Record {
            ts_ms: self.ts_ms(),
            priority: self.priority(),
            lon: self.lon_e7(),
            lat: self.lat_e7(),
            alt: self.alt(),
            angle: self.angle(),
            sats: self.sats(),
            speed: self.speed(),
            event_io: self.event_io(),
            gen_type: self.gen_type(),
            io: self
                .io()
                .map(|e| (e.id, e.value.to_owned_value()))
                .collect(),
        }
    }
}

/// The groups of one record's IO block (from its total count on), `ID` bytes per IO id and
/// `CNT` bytes per count. Stops quietly at a length that runs past the bytes (validated records
/// never do).
#[inline(always)]
fn walk_groups<'a, const ID: usize, const CNT: usize>(
    buf: &'a [u8],
    nx: bool,
    f: &mut impl FnMut(IoElement<'a>),
) -> Option<()> {
    let mut at = CNT;
    walk_group::<ID, CNT, 1>(buf, &mut at, f)?;
    walk_group::<ID, CNT, 2>(buf, &mut at, f)?;
    walk_group::<ID, CNT, 4>(buf, &mut at, f)?;
    walk_group::<ID, CNT, 8>(buf, &mut at, f)?;
    if nx {
        let n = be_uint(buf.get(at..)?, 2)?;
        at += 2;
        for _ in 0..n {
            let id = be_uint(buf.get(at..)?, ID)? as u16;
            let len = be_uint(buf.get(at + ID..)?, 2)? as usize;
            let v = buf.get(at + ID + 2..at + ID + 2 + len)?;
            at += ID + 2 + len;
            f(IoElement {
                id,
                value: IoValue::Nx(v),
            });
        }
    }
    Some(())
}

#[inline(always)]
fn walk_group<'a, const ID: usize, const CNT: usize, const W: usize>(
    buf: &'a [u8],
    at: &mut usize,
    f: &mut impl FnMut(IoElement<'a>),
) -> Option<()> {
    let n = be_uint(buf.get(*at..)?, CNT)? as usize;
    *at += CNT;
    let len = n * (ID + W);
    let body = buf.get(*at..*at + len)?;
    *at += len;
    for e in body.chunks_exact(ID + W) {
        let id = if ID == 1 {
            e[0] as u16
        } else {
            u16::from_be_bytes([e[0], e[1]])
        };
        let v = &e[ID..];
        let value = match W {
            1 => IoValue::U8(v[0]),
            2 => IoValue::U16(u16::from_be_bytes([v[0], v[1]])),
            4 => IoValue::U32(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
            _ => IoValue::U64(u64::from_be_bytes([
                v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
            ])),
        };
        f(IoElement { id, value });
    }
    Some(())
}

/// An IO element value as it travels: a fixed-width unsigned integer or NX bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoValue<'a> {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    /// Codec 8E variable-length value (VIN, DTC list, beacons): opaque bytes.
    Nx(&'a [u8]),
}

impl IoValue<'_> {
    /// The numeric value of a fixed-width element; `None` for NX.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            IoValue::U8(v) => Some(v as u64),
            IoValue::U16(v) => Some(v as u64),
            IoValue::U32(v) => Some(v as u64),
            IoValue::U64(v) => Some(v),
            IoValue::Nx(_) => None,
        }
    }
    fn to_owned_value(self) -> OwnedIoValue {
        match self {
            IoValue::U8(v) => OwnedIoValue::U8(v),
            IoValue::U16(v) => OwnedIoValue::U16(v),
            IoValue::U32(v) => OwnedIoValue::U32(v),
            IoValue::U64(v) => OwnedIoValue::U64(v),
            IoValue::Nx(b) => OwnedIoValue::Nx(b.to_vec()),
        }
    }
}

/// One IO element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoElement<'a> {
    pub id: u16,
    pub value: IoValue<'a>,
}

/// Iterator over a record's IO elements.
///
/// The codec's field widths are fixed when it is made, so the per-element path is two
/// fixed-width big-endian reads with their bounds checks.
#[derive(Clone, Debug)]
pub struct IoIter<'a> {
    buf: &'a [u8],
    at: usize,
    /// Elements left in the current group.
    left: u64,
    /// 0..=3: the fixed groups of 1, 2, 4, 8 bytes; 4: NX.
    group: u8,
    id_w: u8,
    count_w: u8,
    last_group: u8,
}

#[inline(always)]
fn be_uint(b: &[u8], w: usize) -> Option<u64> {
    Some(match w {
        1 => *b.first()? as u64,
        2 => u16::from_be_bytes(b.get(..2)?.try_into().ok()?) as u64,
        4 => u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as u64,
        _ => u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
    })
}

impl IoIter<'_> {
    /// Reads the element count of the group starting at `at`.
    fn read_count(&mut self) -> Option<u64> {
        let w = if self.group == 4 {
            2
        } else {
            self.count_w as usize
        };
        let n = be_uint(self.buf.get(self.at..)?, w)?;
        self.at += w;
        Some(n)
    }

    #[cold]
    fn open_next_group(&mut self) -> Option<()> {
        if self.group >= self.last_group {
            return None;
        }
        self.group += 1;
        self.left = self.read_count()?;
        Some(())
    }
}

impl<'a> Iterator for IoIter<'a> {
    type Item = IoElement<'a>;

    #[inline]
    fn next(&mut self) -> Option<IoElement<'a>> {
        while self.left == 0 {
            self.open_next_group()?;
        }
        self.left -= 1;
        let rest = self.buf.get(self.at..)?;
        let id_w = self.id_w as usize;
        let id = be_uint(rest, id_w)? as u16;
        let rest = rest.get(id_w..)?;
        let value = match self.group {
            0 => IoValue::U8(*rest.first()?),
            1 => IoValue::U16(be_uint(rest, 2)? as u16),
            2 => IoValue::U32(be_uint(rest, 4)? as u32),
            3 => IoValue::U64(be_uint(rest, 8)?),
            _ => {
                let len = be_uint(rest, 2)? as usize;
                let v = rest.get(2..2 + len)?;
                self.at += id_w + 2 + len;
                return Some(IoElement {
                    id,
                    value: IoValue::Nx(v),
                });
            }
        };
        self.at += id_w + (1usize << self.group);
        Some(IoElement { id, value })
    }
}

// ===== owned records and encoding =====

/// An owned IO value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedIoValue {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    Nx(Vec<u8>),
}

impl OwnedIoValue {
    /// 0..=3 for the fixed groups by width, 4 for NX: the wire order of groups.
    fn group(&self) -> usize {
        match self {
            OwnedIoValue::U8(_) => 0,
            OwnedIoValue::U16(_) => 1,
            OwnedIoValue::U32(_) => 2,
            OwnedIoValue::U64(_) => 3,
            OwnedIoValue::Nx(_) => 4,
        }
    }
}

/// An owned AVL record: what tests and the load generator build, and what encoders take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub ts_ms: u64,
    pub priority: u8,
    /// degrees x 10^7
    pub lon: i32,
    /// degrees x 10^7
    pub lat: i32,
    pub alt: i16,
    pub angle: u16,
    pub sats: u8,
    pub speed: u16,
    pub event_io: u16,
    /// Codec 16 only.
    pub gen_type: Option<u8>,
    /// IO elements; encoding writes them grouped by width in the order given within a group,
    /// so a decoded record is in wire order: groups 1, 2, 4, 8 bytes, then NX.
    pub io: Vec<(u16, OwnedIoValue)>,
}

/// Why a record cannot be encoded in a codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("codec {0:#04x} does not carry AVL records")]
    NotAvl(u8),
    #[error("IO id {0} does not fit the codec's id width")]
    IoIdTooWide(u16),
    #[error("event IO id {0} does not fit the codec's width")]
    EventIdTooWide(u16),
    #[error("NX values exist only in Codec 8 Extended")]
    NxNotSupported,
    #[error("too many IO elements for the codec's count width")]
    TooManyIo,
    #[error("NX value longer than 65535 bytes")]
    NxTooLong,
    #[error("more than 255 records in one frame")]
    TooManyRecords,
}

fn put_be(out: &mut Vec<u8>, v: u64, width: usize) {
    out.extend_from_slice(&v.to_be_bytes()[8 - width..]);
}

/// Appends one record in `codec`'s layout.
///
/// # Errors
/// When a field does not fit the codec (see [`EncodeError`]).
pub fn encode_record(codec: Codec, r: &Record, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if !codec.is_avl() {
        return Err(EncodeError::NotAvl(codec.id()));
    }
    let l = layout(codec);
    let max_count: u64 = if l.count == 1 { 0xff } else { 0xffff };
    out.extend_from_slice(&r.ts_ms.to_be_bytes());
    out.push(r.priority);
    out.extend_from_slice(&r.lon.to_be_bytes());
    out.extend_from_slice(&r.lat.to_be_bytes());
    out.extend_from_slice(&r.alt.to_be_bytes());
    out.extend_from_slice(&r.angle.to_be_bytes());
    out.push(r.sats);
    out.extend_from_slice(&r.speed.to_be_bytes());
    if l.event == 1 && r.event_io > 0xff {
        return Err(EncodeError::EventIdTooWide(r.event_io));
    }
    put_be(out, r.event_io as u64, l.event);
    if l.gen_type {
        out.push(r.gen_type.unwrap_or(0xff));
    }
    if r.io.len() as u64 > max_count {
        return Err(EncodeError::TooManyIo);
    }
    put_be(out, r.io.len() as u64, l.count);
    for group in 0..5 {
        if group == 4 && !l.nx {
            if r.io.iter().any(|(_, v)| v.group() == 4) {
                return Err(EncodeError::NxNotSupported);
            }
            break;
        }
        let n = r.io.iter().filter(|(_, v)| v.group() == group).count();
        put_be(out, n as u64, if group == 4 { 2 } else { l.count });
        for (id, v) in r.io.iter().filter(|(_, v)| v.group() == group) {
            if l.id == 1 && *id > 0xff {
                return Err(EncodeError::IoIdTooWide(*id));
            }
            put_be(out, *id as u64, l.id);
            match v {
                OwnedIoValue::U8(x) => out.push(*x),
                OwnedIoValue::U16(x) => out.extend_from_slice(&x.to_be_bytes()),
                OwnedIoValue::U32(x) => out.extend_from_slice(&x.to_be_bytes()),
                OwnedIoValue::U64(x) => out.extend_from_slice(&x.to_be_bytes()),
                OwnedIoValue::Nx(b) => {
                    let len = u16::try_from(b.len()).map_err(|_| EncodeError::NxTooLong)?;
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }
    Ok(())
}

/// Appends codec id, count1, records, count2: the part of a TCP frame the data length counts,
/// and the tail of a UDP datagram.
///
/// # Errors
/// More than 255 records, or a record that does not fit the codec.
pub fn encode_avl_data(
    codec: Codec,
    records: &[Record],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let n = u8::try_from(records.len()).map_err(|_| EncodeError::TooManyRecords)?;
    out.push(codec.id());
    out.push(n);
    for r in records {
        encode_record(codec, r, out)?;
    }
    out.push(n);
    Ok(())
}

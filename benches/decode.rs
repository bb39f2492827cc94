//! Decode throughput of the Teltonika codec: `cargo bench --bench decode`.
//!
//! Realistic frames are built with the crate's own encoders at startup: every record carries
//! about 25 IO elements of mixed widths (Codec 8 Extended also one small NX value), 12 records a
//! frame, plus a 255-record Codec 8E frame (the protocol's maximum count). Each iteration decodes
//! the frame (CRC, framing, validation of every record) and then walks every record and every
//! IO element, folding fields into a value handed to `black_box` so nothing can be elided.
//!
//! Groups:
//! - `decode_bytes`: decode + walk, throughput in bytes of frame.
//! - `decode_records`: the same, throughput in records.
//! - `decode_parts`: where the time goes: `decode_frame` alone (CRC + validation), the walk
//!   alone over already-validated data, and a UDP datagram (no CRC).
//! - `crc16_ibm`: the CRC alone over 1 KiB, the ceiling for anything that checks the CRC.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fleetgate::protocol::crc::crc16_ibm;
use fleetgate::protocol::{
    decode_datagram, decode_frame, tcp, udp, AvlData, Codec, Frame, Imei, IoValue, OwnedIoValue,
    Record, Status,
};

/// Records per ordinary frame.
const RECORDS: usize = 12;
/// No declared-length limit gets in the way of the 255-record frame.
const NO_LIMIT: u32 = u32::MAX - 64;

/// A deterministic pseudo-random stream (xorshift), so every run builds the same frames.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One record as a vehicle tracker sends it: a moving position and ~25 IO elements (ignition,
/// movement, GSM signal, voltages, odometer, fuel, CAN counters...). `wide_ids` uses ids above
/// 255 (Codec 8E / 16); `nx` adds a small NX value (Codec 8E only).
fn record(i: usize, rng: &mut Rng, wide_ids: bool, nx: bool) -> Record {
    let id = |n: u16| if wide_ids { n + 200 } else { n };
    let mut io = Vec::new();
    // 10 one-byte values: ignition, movement, GSM signal, sleep mode, GNSS status, ...
    for (k, n) in [239u16, 240, 21, 200, 69, 1, 2, 3, 179, 180]
        .iter()
        .enumerate()
    {
        io.push((id(*n), OwnedIoValue::U8((rng.next() % 6) as u8 + k as u8)));
    }
    // 7 two-byte values: external voltage, battery voltage, speed, PDOP, HDOP, analog inputs.
    for n in [66u16, 67, 24, 181, 182, 9, 10] {
        io.push((id(n), OwnedIoValue::U16((rng.next() % 30_000) as u16)));
    }
    // 5 four-byte values: odometer, trip distance, fuel used, engine hours, cell id.
    for n in [16u16, 199, 83, 102, 205] {
        io.push((id(n), OwnedIoValue::U32((rng.next() % 100_000_000) as u32)));
    }
    // 2 eight-byte values: iButton / driver card id.
    for n in [78u16, 207] {
        io.push((id(n), OwnedIoValue::U64(rng.next())));
    }
    // The 25th: a small NX value (a BLE beacon id) where the codec has them.
    if nx {
        io.push((385, OwnedIoValue::Nx(rng.next().to_be_bytes().to_vec())));
    } else {
        io.push((id(11), OwnedIoValue::U8(1)));
    }
    Record {
        ts_ms: 1_700_000_000_000 + i as u64 * 10_000,
        priority: (i % 3 == 0) as u8,
        lon: 250_000_000 + (rng.next() % 100_000) as i32,
        lat: 546_000_000 + (rng.next() % 100_000) as i32,
        alt: 120 + (i % 7) as i16,
        angle: (rng.next() % 360) as u16,
        sats: 9 + (i % 5) as u8,
        speed: (rng.next() % 120) as u16,
        event_io: if wide_ids { 439 } else { 239 },
        gen_type: wide_ids.then_some(5),
        io,
    }
}

fn records(codec: Codec, n: usize) -> Vec<Record> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ codec.id() as u64);
    let wide = codec != Codec::C8;
    let nx = codec == Codec::C8E;
    (0..n)
        .map(|i| {
            let mut r = record(i, &mut rng, wide, nx);
            if codec != Codec::C16 {
                r.gen_type = None;
            }
            r
        })
        .collect()
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    records: u64,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (name, codec, n) in [
        ("codec8_12rec", Codec::C8, RECORDS),
        ("codec8e_12rec", Codec::C8E, RECORDS),
        ("codec16_12rec", Codec::C16, RECORDS),
        ("codec8e_255rec", Codec::C8E, 255),
    ] {
        let mut frame = Vec::new();
        tcp::encode_avl_frame(codec, &records(codec, n), &mut frame).expect("encodes");
        // The frame decodes to what was meant before anything is measured.
        assert_eq!(walk_frame(&frame).1, n as u64, "{name}");
        eprintln!("{name}: {} bytes, {n} records", frame.len());
        out.push(Case {
            name,
            frame,
            records: n as u64,
        });
    }
    out
}

/// Folds every field of every record and IO element into one value.
#[inline(always)]
fn walk(avl: &AvlData<'_>) -> (u64, u64) {
    let mut acc = 0u64;
    let mut n = 0u64;
    for r in avl.records() {
        n += 1;
        acc = acc
            .wrapping_add(r.ts_ms())
            .wrapping_add(r.lat_e7() as u64)
            .wrapping_add(r.lon_e7() as u64)
            .wrapping_add(r.alt() as u64)
            .wrapping_add(r.angle() as u64)
            .wrapping_add(r.speed() as u64)
            .wrapping_add((r.sats() ^ r.priority()) as u64)
            .wrapping_add(r.event_io() as u64);
        r.for_each_io(|e| {
            acc = acc.rotate_left(5) ^ e.id as u64;
            acc = acc.wrapping_add(match e.value {
                IoValue::Nx(b) => b.len() as u64 + b[0] as u64,
                v => v.as_u64().unwrap_or(0),
            });
        });
    }
    (acc, n)
}

#[inline(always)]
fn walk_frame(buf: &[u8]) -> (u64, u64) {
    match decode_frame(buf, NO_LIMIT) {
        Ok(Status::Complete((Frame::Avl(avl), _))) => walk(&avl),
        other => panic!("not an AVL frame: {other:?}"),
    }
}

fn bench_decode(c: &mut Criterion) {
    let cases = cases();
    let mut g = c.benchmark_group("decode_bytes");
    for case in &cases {
        g.throughput(Throughput::Bytes(case.frame.len() as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(case.name),
            &case.frame,
            |b, f| b.iter(|| walk_frame(black_box(f))),
        );
    }
    g.finish();

    let mut g = c.benchmark_group("decode_records");
    for case in &cases {
        g.throughput(Throughput::Elements(case.records));
        g.bench_with_input(
            BenchmarkId::from_parameter(case.name),
            &case.frame,
            |b, f| b.iter(|| walk_frame(black_box(f))),
        );
    }
    g.finish();

    // Where the time goes, on the 12-record Codec 8E frame.
    let c8e = &cases[1].frame;
    let mut g = c.benchmark_group("decode_parts");
    g.throughput(Throughput::Bytes(c8e.len() as u64));
    g.bench_function("codec8e_12rec/decode_frame_only", |b| {
        b.iter(|| {
            let r = decode_frame(black_box(c8e), NO_LIMIT);
            matches!(r, Ok(Status::Complete((Frame::Avl(_), _))))
        })
    });
    let data = &c8e[tcp::HEADER_LEN..c8e.len() - tcp::TRAILER_LEN];
    g.bench_function("codec8e_12rec/avl_parse_only", |b| {
        b.iter(|| AvlData::parse(black_box(data)).is_ok())
    });
    let avl = AvlData::parse(data).expect("parses");
    g.bench_function("codec8e_12rec/walk_only", |b| {
        b.iter(|| walk(black_box(&avl)))
    });
    // The same walk through the external IO iterator (`io()`) instead of `for_each_io`.
    g.bench_function("codec8e_12rec/walk_only_io_iterator", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for r in black_box(&avl).records() {
                for e in r.io() {
                    acc = acc.rotate_left(5) ^ e.id as u64;
                    acc = acc.wrapping_add(match e.value {
                        IoValue::Nx(b) => b.len() as u64 + b[0] as u64,
                        v => v.as_u64().unwrap_or(0),
                    });
                }
            }
            acc
        })
    });
    let mut dgram = Vec::new();
    let imei = Imei::from_ascii(b"352093086403655").expect("imei");
    udp::encode_datagram(
        0xcafe,
        7,
        imei,
        Codec::C8E,
        &records(Codec::C8E, RECORDS),
        &mut dgram,
    )
    .expect("encodes");
    g.throughput(Throughput::Bytes(dgram.len() as u64));
    g.bench_function("codec8e_12rec/udp_datagram", |b| {
        b.iter(|| match decode_datagram(black_box(&dgram)) {
            Ok(d) => walk(&d.avl),
            Err(e) => panic!("{e}"),
        })
    });
    g.finish();
}

fn bench_crc(c: &mut Criterion) {
    let mut rng = Rng(42);
    let buf: Vec<u8> = (0..1024).map(|_| rng.next() as u8).collect();
    let mut g = c.benchmark_group("crc16_ibm");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("1KiB", |b| b.iter(|| crc16_ibm(black_box(&buf))));
    g.finish();
}

criterion_group!(benches, bench_decode, bench_crc);
criterion_main!(benches);

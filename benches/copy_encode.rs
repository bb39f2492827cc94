//! COPY encoding cost per record: `cargo bench --bench copy_encode`.
//!
//! What a shard does for every AVL frame after decoding it (src/conn/tcp.rs): size its rows
//! for the byte budget ([`rows_len`]) and encode them as binary COPY rows ([`encode_rows`]),
//! which the writer threads then only concatenate. The frames are the load generator's own
//! (`loadgen/src/frames.rs`, compiled in here): Codec 8 Extended, 25 IO elements per record
//! (10 one-byte, 7 two-byte, 5 four-byte, 2 eight-byte values and a 17-byte NX VIN), a driving
//! vehicle's changing values; also Codec 8 and 16 (24 IO elements, no NX) for comparison.
//!
//! Throughput is in records (criterion prints elements/s; ns per record = 1e9 / that). Groups:
//! - `copy_encode`: `encode_rows` of a decoded frame into a buffer of the right size (the
//!   shard's `Vec::with_capacity(rows_len)`), per codec, 50 and 1 records per frame.
//! - `copy_rows_len`: `rows_len` alone (the budget walk: every IO element once).
//! - `copy_shard_path`: `rows_len` + allocation + `encode_rows`, as the shard runs them.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fleetgate::protocol::{decode_frame, AvlData, Codec, Frame, Imei, Status};
use fleetgate::shard::copy::{encode_rows, rows_len};

#[allow(dead_code, unused_imports)]
#[path = "../loadgen/src/frames.rs"]
mod frames;

/// The gateway's allocator, so `copy_shard_path`'s allocation costs what it costs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECEIVED_AT_US: i64 = 1_767_225_600_000_000;

struct Case {
    name: String,
    frame: Vec<u8>,
    records: u64,
    imei: Imei,
}

fn avl(frame: &[u8]) -> AvlData<'_> {
    match decode_frame(frame, u32::MAX - 64) {
        Ok(Status::Complete((Frame::Avl(avl), _))) => avl,
        other => panic!("not a complete AVL frame: {other:?}"),
    }
}

fn cases() -> Vec<Case> {
    let imei = Imei::new(350_000_000_000_042).unwrap();
    let mut out = Vec::new();
    for (codec, label) in [(Codec::C8E, "8e"), (Codec::C8, "8"), (Codec::C16, "16")] {
        for n in [50usize, 1] {
            let io = frames::default_io_per_record(codec);
            let mut gen =
                frames::FrameGen::new(codec, imei, 1_767_225_600_000, n, io, imei.as_u64());
            let mut frame = Vec::new();
            // A few frames in, so the values are a vehicle's, not the zeros it starts from.
            for _ in 0..3 {
                frame.clear();
                gen.next_tcp_frame(&mut frame);
            }
            let a = avl(&frame);
            assert_eq!(a.count() as usize, n);
            let mut rows = Vec::new();
            encode_rows(imei, &a, RECEIVED_AT_US, &mut rows);
            assert_eq!(rows.len(), rows_len(&a), "rows_len is exact");
            eprintln!(
                "codec{label}_{n}rec: {io} IO per record, frame {} bytes, COPY rows {} bytes ({} per record)",
                frame.len(),
                rows.len(),
                rows.len() / n
            );
            out.push(Case {
                name: format!("codec{label}_{n}rec_{io}io"),
                frame,
                records: n as u64,
                imei,
            });
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let cases = cases();
    let mut g = c.benchmark_group("copy_encode");
    for case in &cases {
        let a = avl(&case.frame);
        let mut buf = Vec::with_capacity(rows_len(&a));
        g.throughput(Throughput::Elements(case.records));
        g.bench_with_input(BenchmarkId::from_parameter(&case.name), &a, |b, a| {
            b.iter(|| {
                buf.clear();
                encode_rows(case.imei, black_box(a), RECEIVED_AT_US, &mut buf);
                black_box(buf.len())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("copy_rows_len");
    for case in cases.iter().filter(|c| c.records > 1) {
        let a = avl(&case.frame);
        g.throughput(Throughput::Elements(case.records));
        g.bench_with_input(BenchmarkId::from_parameter(&case.name), &a, |b, a| {
            b.iter(|| rows_len(black_box(a)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("copy_shard_path");
    for case in cases.iter().filter(|c| c.records > 1) {
        let a = avl(&case.frame);
        g.throughput(Throughput::Elements(case.records));
        g.bench_with_input(BenchmarkId::from_parameter(&case.name), &a, |b, a| {
            b.iter(|| {
                let a = black_box(a);
                let mut rows = Vec::with_capacity(rows_len(a));
                encode_rows(case.imei, a, RECEIVED_AT_US, &mut rows);
                black_box(rows)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

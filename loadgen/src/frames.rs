//! What a simulated device sends: realistic AVL records (a vehicle driving around, IO values
//! that change from record to record), encoded with fleetgate's own codec as TCP frames or UDP
//! datagrams.
//!
//! Each device keeps one set of [`Record`]s and rewrites them in place for every frame, so
//! generating a frame allocates nothing but its output buffer.

use fleetgate::protocol::tcp::encode_avl_frame;
use fleetgate::protocol::udp::encode_datagram;
use fleetgate::protocol::{Codec, Imei, OwnedIoValue, Record};

/// Width class of a fixed IO element (the group it travels in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    U8,
    U16,
    U32,
    U64,
}

/// Fixed-width IO elements of an FMB-style tracker, interleaved so that the first N of them
/// are a mix of widths. The first 24 are 10 one-byte, 7 two-byte, 5 four-byte and 2 eight-byte
/// elements (the shape used in tuning/io-representation.md).
const CATALOG: &[(u16, Width)] = &[
    (239, Width::U8),  // ignition
    (240, Width::U8),  // movement
    (66, Width::U16),  // external voltage, mV
    (16, Width::U32),  // total odometer, m
    (21, Width::U8),   // GSM signal 0-5
    (24, Width::U16),  // speed, km/h
    (11, Width::U64),  // ICCID1
    (69, Width::U8),   // GNSS status
    (181, Width::U16), // GNSS PDOP x10
    (199, Width::U32), // trip odometer, m
    (80, Width::U8),   // data mode
    (182, Width::U16), // GNSS HDOP x10
    (241, Width::U32), // active GSM operator
    (200, Width::U8),  // sleep mode
    (67, Width::U16),  // battery voltage, mV
    (1, Width::U8),    // DIN1
    (205, Width::U16), // GSM cell id
    (12, Width::U32),  // fuel used GPS
    (2, Width::U8),    // DIN2
    (206, Width::U16), // GSM area code
    (3, Width::U8),    // DIN3
    (13, Width::U32),  // fuel rate GPS
    (179, Width::U8),  // DOUT1
    (14, Width::U64),  // ICCID2
    (68, Width::U16),  // battery current, mA
    (9, Width::U16),   // AIN1, mV
    (113, Width::U8),  // battery level, %
    (17, Width::U16),  // axis X
    (18, Width::U16),  // axis Y
    (19, Width::U16),  // axis Z
    (238, Width::U64), // user id
    (10, Width::U8),   // SD status
];

/// The codec-8E variable-length element every 8E record carries: a VIN (17 ASCII bytes).
const NX_VIN_ID: u16 = 256;

/// The IO elements per record a codec gets when none are asked for: 24 fixed elements, plus
/// one NX element in Codec 8 Extended.
pub fn default_io_per_record(codec: Codec) -> usize {
    if codec == Codec::C8E {
        25
    } else {
        24
    }
}

/// Checks that `io` elements per record and `records` per frame fit `codec`.
///
/// # Errors
/// A count the codec cannot carry.
pub fn check_shape(codec: Codec, records: usize, io: usize) -> Result<(), String> {
    if records == 0 || records > 255 {
        return Err(format!("records per frame must be 1..=255, not {records}"));
    }
    let max_io = match codec {
        // One-byte IO ids: at most 256 distinct elements, and a one-byte count.
        Codec::C8 => 255,
        Codec::C16 => 255,
        _ => 65_535,
    };
    if io > max_io {
        return Err(format!(
            "codec {codec:?} carries at most {max_io} IO elements per record, not {io}"
        ));
    }
    Ok(())
}

/// The (id, width) of each fixed element, `n` of them: the catalog first, then made-up ids
/// (unknown ids are the norm in the field) that fit the codec's id width.
fn fixed_layout(codec: Codec, n: usize) -> Vec<(u16, Width)> {
    let mut out: Vec<(u16, Width)> = CATALOG.iter().copied().take(n).collect();
    let widths = [Width::U8, Width::U16, Width::U32, Width::U64];
    // Codec 8 ids are one byte: every id 0..=255 may be needed. Wider ids start past the
    // catalog's range.
    let mut candidates = if codec == Codec::C8 {
        0..=255u16
    } else {
        1000..=u16::MAX
    };
    while out.len() < n {
        let id = candidates
            .next()
            .expect("IO ids exhausted (bounded by check_shape)");
        if id != NX_VIN_ID && !out.iter().any(|&(used, _)| used == id) {
            out.push((id, widths[out.len() % 4]));
        }
    }
    out
}

/// xorshift64*: a small, fast, deterministic generator; one per device.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` (any value; 0 is fine).
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so neighbouring seeds diverge at once.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One device's record source: position, motion and counters, and the frame encoders.
pub struct FrameGen {
    codec: Codec,
    imei: Imei,
    rng: Rng,
    /// Timestamp of the next record, ms since the Unix epoch.
    next_ts: u64,
    lat: f64,
    lon: f64,
    heading: f64,
    speed: f64,
    odometer_m: f64,
    trip_m: f64,
    fuel_ml: f64,
    cell_id: u16,
    area: u16,
    records: Vec<Record>,
    /// UDP packet id of the next datagram.
    packet_id: u16,
    /// UDP AVL packet id of the next datagram.
    avl_packet_id: u8,
}

impl FrameGen {
    /// A device `imei` whose first record is stamped `first_ts_ms`; frames of
    /// `records_per_frame` records with `io_per_record` IO elements each (see
    /// [`check_shape`]). `seed` makes the device's route and values reproducible.
    pub fn new(
        codec: Codec,
        imei: Imei,
        first_ts_ms: u64,
        records_per_frame: usize,
        io_per_record: usize,
        seed: u64,
    ) -> FrameGen {
        let mut rng = Rng::new(seed);
        let nx = codec == Codec::C8E && io_per_record > 0;
        let fixed = fixed_layout(codec, io_per_record - usize::from(nx));
        let mut io: Vec<(u16, OwnedIoValue)> = fixed
            .iter()
            .map(|&(id, w)| {
                let v = match w {
                    Width::U8 => OwnedIoValue::U8(0),
                    Width::U16 => OwnedIoValue::U16(0),
                    Width::U32 => OwnedIoValue::U32(0),
                    Width::U64 => OwnedIoValue::U64(0),
                };
                (id, v)
            })
            .collect();
        if nx {
            // A plausible VIN, distinct per device.
            let vin = format!("WVWZZZ1KZ{:08}", imei.as_u64() % 100_000_000);
            io.push((NX_VIN_ID, OwnedIoValue::Nx(vin.into_bytes())));
        }
        let template = Record {
            ts_ms: 0,
            priority: 0,
            lon: 0,
            lat: 0,
            alt: 0,
            angle: 0,
            sats: 0,
            speed: 0,
            event_io: 0,
            gen_type: (codec == Codec::C16).then_some(0),
            io,
        };
        // Somewhere around Vilnius, within about a degree.
        let lat = 54.687 + (rng.unit() - 0.5) * 2.0;
        let lon = 25.280 + (rng.unit() - 0.5) * 3.0;
        FrameGen {
            codec,
            imei,
            next_ts: first_ts_ms,
            lat,
            lon,
            heading: rng.unit() * 360.0,
            speed: 20.0 + rng.unit() * 60.0,
            odometer_m: (rng.below(500_000) * 1000) as f64,
            trip_m: 0.0,
            fuel_ml: 0.0,
            cell_id: rng.below(60_000) as u16 + 1,
            area: rng.below(600) as u16 + 1,
            packet_id: rng.below(65_536) as u16,
            avl_packet_id: 0,
            records: vec![template; records_per_frame],
            rng,
        }
    }

    /// Timestamp the next record will get (ms since the Unix epoch); the last one generated is
    /// one less.
    pub fn next_ts(&self) -> u64 {
        self.next_ts
    }

    /// Records per frame.
    pub fn records_per_frame(&self) -> usize {
        self.records.len()
    }

    /// Appends the next TCP AVL frame to `out`.
    pub fn next_tcp_frame(&mut self, out: &mut Vec<u8>) {
        self.advance();
        encode_avl_frame(self.codec, &self.records, out)
            .expect("record shape checked by check_shape");
    }

    /// Appends the next UDP datagram to `out`; returns its packet id.
    pub fn next_datagram(&mut self, out: &mut Vec<u8>) -> u16 {
        self.advance();
        let (pid, avl_pid) = (self.packet_id, self.avl_packet_id);
        self.packet_id = self.packet_id.wrapping_add(1);
        self.avl_packet_id = self.avl_packet_id.wrapping_add(1);
        encode_datagram(pid, avl_pid, self.imei, self.codec, &self.records, out)
            .expect("record shape checked by check_shape");
        pid
    }

    /// Rewrites every record for the next frame: one step of driving per record, one
    /// millisecond apart (so that a run's timestamps stay close to now), values moved along.
    fn advance(&mut self) {
        for i in 0..self.records.len() {
            // Motion: a nominal second of driving per record.
            let rng = &mut self.rng;
            self.heading = (self.heading + (rng.unit() - 0.5) * 20.0).rem_euclid(360.0);
            self.speed = (self.speed + (rng.unit() - 0.5) * 8.0).clamp(0.0, 130.0);
            let step_m = self.speed / 3.6;
            let rad = self.heading.to_radians();
            self.lat += step_m * rad.cos() / 111_320.0;
            self.lon += step_m * rad.sin() / (111_320.0 * self.lat.to_radians().cos());
            self.odometer_m += step_m;
            self.trip_m += step_m;
            self.fuel_ml += step_m * 0.08;
            let moving = self.speed >= 3.0;

            let r = &mut self.records[i];
            r.ts_ms = self.next_ts;
            self.next_ts += 1;
            r.priority = u8::from(rng.below(50) == 0);
            r.lat = (self.lat * 1e7) as i32;
            r.lon = (self.lon * 1e7) as i32;
            r.alt = (120 + rng.below(40)) as i16;
            r.angle = self.heading as u16;
            r.sats = (7 + rng.below(10)) as u8;
            r.speed = self.speed as u16;
            r.event_io = if r.priority == 1 { 240 } else { 0 };
            if let Some(g) = r.gen_type.as_mut() {
                *g = if r.priority == 1 { 0 } else { 5 }; // on change / periodic
            }
            for (id, v) in r.io.iter_mut() {
                let x = rng.next_u64();
                match v {
                    OwnedIoValue::U8(b) => {
                        *b = match *id {
                            239 => 1,
                            240 => u8::from(moving),
                            21 => 3 + (x % 3) as u8,
                            69 => 1,
                            80 => 0,
                            200 => 0,
                            1..=3 => (x & 1) as u8,
                            113 => 80 + (x % 20) as u8,
                            _ => x as u8,
                        }
                    }
                    OwnedIoValue::U16(w) => {
                        *w = match *id {
                            66 => 12_600 + (x % 1_800) as u16,
                            24 => self.speed as u16,
                            181 => 8 + (x % 12) as u16,
                            182 => 6 + (x % 8) as u16,
                            67 => 4_000 + (x % 120) as u16,
                            205 => self.cell_id,
                            206 => self.area,
                            68 => (x % 300) as u16,
                            _ => x as u16,
                        }
                    }
                    OwnedIoValue::U32(d) => {
                        *d = match *id {
                            16 => self.odometer_m as u32,
                            199 => self.trip_m as u32,
                            241 => 24_602,
                            12 => self.fuel_ml as u32,
                            13 => (self.speed * 9.0) as u32,
                            _ => x as u32,
                        }
                    }
                    OwnedIoValue::U64(q) => {
                        *q = match *id {
                            11 => 8_937_000_000_000_000_000 + self.imei.as_u64() % 1_000_000_000,
                            14 => 0,
                            _ => x >> 1,
                        }
                    }
                    OwnedIoValue::Nx(_) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate::protocol::udp::decode_datagram;
    use fleetgate::protocol::{decode_frame, Frame, IoValue};
    use fleetgate::protocol::{AvlData, Status, DEFAULT_MAX_FRAME_LEN};

    fn imei() -> Imei {
        Imei::new(350_000_000_000_042).unwrap()
    }

    /// Checks one decoded frame's records against what was asked for; returns their
    /// timestamps.
    fn check_avl(avl: &AvlData<'_>, codec: Codec, records: usize, io: usize) -> Vec<u64> {
        assert_eq!(avl.codec(), codec);
        assert_eq!(avl.count() as usize, records);
        let mut ts = Vec::new();
        for r in avl.records() {
            assert_eq!(r.io_total() as usize, io, "io_total");
            let elems: Vec<_> = r.io().collect();
            assert_eq!(elems.len(), io, "decoded IO elements");
            let nx = elems
                .iter()
                .filter(|e| matches!(e.value, IoValue::Nx(_)))
                .count();
            assert_eq!(
                nx,
                usize::from(codec == Codec::C8E && io > 0),
                "one NX in 8E, none otherwise"
            );
            let mut ids: Vec<u16> = elems.iter().map(|e| e.id).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), io, "IO ids are distinct");
            assert!(r.sats() > 0 && r.lat().abs() <= 90.0 && r.lon().abs() <= 180.0);
            assert_eq!(r.gen_type().is_some(), codec == Codec::C16);
            ts.push(r.ts_ms());
        }
        ts
    }

    fn decode_tcp(buf: &[u8]) -> (AvlData<'_>, usize) {
        match decode_frame(buf, DEFAULT_MAX_FRAME_LEN).expect("frame decodes") {
            Status::Complete((Frame::Avl(avl), used)) => (avl, used),
            other => panic!("not a complete AVL frame: {other:?}"),
        }
    }

    #[test]
    fn tcp_frames_decode_with_the_requested_shape() {
        for (codec, records, io) in [
            (Codec::C8E, 10, default_io_per_record(Codec::C8E)),
            (Codec::C8, 10, default_io_per_record(Codec::C8)),
            (Codec::C16, 10, default_io_per_record(Codec::C16)),
            (Codec::C8E, 1, 1),
            (Codec::C8E, 3, 0),
            (Codec::C8, 50, 40),
            (Codec::C16, 5, 100),
            (Codec::C8E, 2, 300),
            (Codec::C8, 2, 255),
        ] {
            check_shape(codec, records, io).unwrap();
            let mut g = FrameGen::new(codec, imei(), 1_700_000_000_000, records, io, 7);
            let mut buf = Vec::new();
            g.next_tcp_frame(&mut buf);
            let first_len = buf.len();
            g.next_tcp_frame(&mut buf);
            let (avl, used) = decode_tcp(&buf);
            assert_eq!(used, first_len, "{codec:?}: the frame is exactly its bytes");
            let ts1 = check_avl(&avl, codec, records, io);
            let (avl2, used2) = decode_tcp(&buf[used..]);
            assert_eq!(used + used2, buf.len());
            let ts2 = check_avl(&avl2, codec, records, io);
            let all: Vec<u64> = ts1.into_iter().chain(ts2).collect();
            assert!(
                all.windows(2).all(|w| w[1] > w[0]),
                "{codec:?}: timestamps strictly increase"
            );
            assert_eq!(all[0], 1_700_000_000_000);
            assert_eq!(g.next_ts(), all[all.len() - 1] + 1);
        }
    }

    #[test]
    fn default_8e_record_has_mixed_widths_and_one_nx() {
        let mut g = FrameGen::new(Codec::C8E, imei(), 1_700_000_000_000, 1, 25, 1);
        let mut buf = Vec::new();
        g.next_tcp_frame(&mut buf);
        let (avl, _) = decode_tcp(&buf);
        let r = avl.records().next().unwrap();
        let mut counts = [0usize; 5];
        for e in r.io() {
            let k = match e.value {
                IoValue::U8(_) => 0,
                IoValue::U16(_) => 1,
                IoValue::U32(_) => 2,
                IoValue::U64(_) => 3,
                IoValue::Nx(b) => {
                    assert_eq!(b.len(), 17);
                    4
                }
            };
            counts[k] += 1;
        }
        assert_eq!(counts, [10, 7, 5, 2, 1]);
    }

    #[test]
    fn default_8e_sizes() {
        // Record: 24 bytes of header, event IO (2), total count (2), five group counts (10),
        // 10 x (2 + 1), 7 x (2 + 2), 5 x (2 + 4), 2 x (2 + 8), NX (2 + 2 + 17) = 167 bytes.
        // Frame: preamble and length (8), codec and counts (3), CRC field (4).
        let mut g = FrameGen::new(Codec::C8E, imei(), 1_700_000_000_000, 10, 25, 5);
        let mut buf = Vec::new();
        g.next_tcp_frame(&mut buf);
        assert_eq!(buf.len(), 8 + 3 + 10 * 167 + 4);
        buf.clear();
        g.next_datagram(&mut buf);
        assert_eq!(buf.len(), 8 + 15 + 3 + 10 * 167);
    }

    #[test]
    fn datagrams_decode_and_carry_increasing_packet_ids() {
        let mut g = FrameGen::new(Codec::C8E, imei(), 1_700_000_000_000, 4, 25, 3);
        let mut a = Vec::new();
        let pa = g.next_datagram(&mut a);
        let mut b = Vec::new();
        let pb = g.next_datagram(&mut b);
        assert_eq!(pb, pa.wrapping_add(1));
        for (buf, pid) in [(&a, pa), (&b, pb)] {
            let d = decode_datagram(buf).expect("datagram decodes");
            assert_eq!(d.packet_id, pid);
            assert_eq!(d.imei, imei());
            check_avl(&d.avl, Codec::C8E, 4, 25);
        }
    }

    #[test]
    fn shapes_the_codec_cannot_carry_are_refused() {
        assert!(check_shape(Codec::C8, 10, 256).is_err());
        assert!(check_shape(Codec::C16, 10, 256).is_err());
        assert!(check_shape(Codec::C8E, 256, 10).is_err());
        assert!(check_shape(Codec::C8E, 0, 10).is_err());
        assert!(check_shape(Codec::C8, 255, 255).is_ok());
    }

    /// Metres between two positions (equirectangular: fine at a few metres' scale).
    fn metres(a: (f64, f64), b: (f64, f64)) -> f64 {
        let lat = ((a.0 + b.0) / 2.0).to_radians();
        let dy = (b.0 - a.0) * 111_320.0;
        let dx = (b.1 - a.1) * 111_320.0 * lat.cos();
        (dx * dx + dy * dy).sqrt()
    }

    #[test]
    fn positions_move_along_a_track() {
        let mut g = FrameGen::new(Codec::C8E, imei(), 1_700_000_000_000, 10, 25, 11);
        let mut fixes = Vec::new();
        let mut buf = Vec::new();
        for _ in 0..30 {
            buf.clear();
            g.next_tcp_frame(&mut buf);
            let (avl, _) = decode_tcp(&buf);
            for r in avl.records() {
                fixes.push((r.lat(), r.lon(), r.speed(), r.angle()));
            }
        }
        let mut travelled = 0.0;
        for w in fixes.windows(2) {
            let step = metres((w[0].0, w[0].1), (w[1].0, w[1].1));
            // One nominal second of driving at most 130 km/h (36 m), plus rounding to 1e-7°.
            assert!(step <= 37.0, "a jump of {step} m");
            travelled += step;
            assert!(w[1].2 <= 130, "speed {}", w[1].2);
            assert!(w[1].3 < 360, "heading {}", w[1].3);
        }
        // 300 records at 20-80 km/h initially: well over a kilometre, and no teleporting.
        assert!(travelled > 1000.0, "travelled only {travelled} m");
        let (first, last) = (fixes[0], fixes[fixes.len() - 1]);
        assert!(
            metres((first.0, first.1), (last.0, last.1)) > 100.0,
            "it went somewhere"
        );
        // Near Vilnius, where the fleet lives.
        assert!((first.0 - 54.687).abs() < 1.5 && (first.1 - 25.28).abs() < 2.0);
    }

    /// Counts of IO values by width class: 1, 2, 4, 8 bytes, NX.
    fn widths(codec: Codec, io: usize) -> [usize; 5] {
        let mut g = FrameGen::new(codec, imei(), 1_700_000_000_000, 1, io, 1);
        let mut buf = Vec::new();
        g.next_tcp_frame(&mut buf);
        let (avl, _) = decode_tcp(&buf);
        let r = avl.records().next().unwrap();
        let mut counts = [0usize; 5];
        for e in r.io() {
            counts[match e.value {
                IoValue::U8(_) => 0,
                IoValue::U16(_) => 1,
                IoValue::U32(_) => 2,
                IoValue::U64(_) => 3,
                IoValue::Nx(_) => 4,
            }] += 1;
        }
        counts
    }

    #[test]
    fn io_elements_have_the_usual_widths_in_every_codec() {
        assert_eq!(widths(Codec::C8E, 25), [10, 7, 5, 2, 1]);
        assert_eq!(widths(Codec::C8, 24), [10, 7, 5, 2, 0]);
        assert_eq!(widths(Codec::C16, 24), [10, 7, 5, 2, 0]);
        // Past the catalogue, made-up ids keep mixing the widths.
        let w = widths(Codec::C16, 100);
        assert_eq!(w.iter().sum::<usize>(), 100);
        assert!(w[..4].iter().all(|&k| k >= 10), "{w:?}");
    }

    #[test]
    fn io_values_follow_the_vehicle() {
        let mut g = FrameGen::new(Codec::C8E, imei(), 1_700_000_000_000, 5, 25, 3);
        let mut buf = Vec::new();
        let mut odometer = Vec::new();
        for _ in 0..4 {
            buf.clear();
            g.next_tcp_frame(&mut buf);
            let (avl, _) = decode_tcp(&buf);
            for r in avl.records() {
                let io = |id: u16| r.io().find(|e| e.id == id).and_then(|e| e.value.as_u64());
                assert_eq!(
                    io(24),
                    Some(u64::from(r.speed())),
                    "IO 24 is the GNSS speed"
                );
                assert_eq!(io(239), Some(1), "ignition on");
                let mv = io(66).unwrap();
                assert!((12_600..14_400).contains(&mv), "external voltage {mv} mV");
                odometer.push(io(16).unwrap());
            }
        }
        assert!(
            odometer.windows(2).all(|w| w[1] >= w[0]),
            "the odometer never runs back"
        );
        assert!(odometer[odometer.len() - 1] > odometer[0]);
    }

    #[test]
    fn frames_differ_from_frame_to_frame() {
        let mut g = FrameGen::new(Codec::C8E, imei(), 1_700_000_000_000, 2, 25, 9);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        g.next_tcp_frame(&mut a);
        g.next_tcp_frame(&mut b);
        assert_ne!(a, b);
    }
}

//! Property tests: encode/decode round trips for every codec, and arbitrary bytes never panic.

use proptest::collection::vec;
use proptest::prelude::*;

use super::avl::{encode_avl_data, OwnedIoValue, Record};
use super::tcp::{decode_frame, encode_avl_frame, encode_command_frame, Frame};
use super::udp::{decode_datagram, encode_datagram};
use super::{AvlData, Codec, Imei, Status};

fn io_group(codec: Codec, group: usize) -> impl Strategy<Value = Vec<(u16, OwnedIoValue)>> {
    let max_id: u16 = if codec == Codec::C8 { 0xff } else { 0xffff };
    let value: BoxedStrategy<OwnedIoValue> = match group {
        0 => any::<u8>().prop_map(OwnedIoValue::U8).boxed(),
        1 => any::<u16>().prop_map(OwnedIoValue::U16).boxed(),
        2 => any::<u32>().prop_map(OwnedIoValue::U32).boxed(),
        3 => any::<u64>().prop_map(OwnedIoValue::U64).boxed(),
        _ => vec(any::<u8>(), 0..40).prop_map(OwnedIoValue::Nx).boxed(),
    };
    let max_len = if group == 4 && codec != Codec::C8E {
        0
    } else {
        12
    };
    vec((0..=max_id, value), 0..=max_len)
}

fn record(codec: Codec) -> impl Strategy<Value = Record> {
    let max_event: u16 = if codec == Codec::C8 { 0xff } else { 0xffff };
    let groups = (
        io_group(codec, 0),
        io_group(codec, 1),
        io_group(codec, 2),
        io_group(codec, 3),
        io_group(codec, 4),
    );
    (
        (
            any::<u64>(),
            0u8..=2,
            any::<i32>(),
            any::<i32>(),
            any::<i16>(),
            any::<u16>(),
            any::<u8>(),
            any::<u16>(),
        ),
        (0..=max_event, any::<u8>()),
        groups,
    )
        .prop_map(
            move |(
                (ts_ms, priority, lon, lat, alt, angle, sats, speed),
                (event_io, gen),
                (a, b, c, d, e),
            )| Record {
                ts_ms,
                priority,
                lon,
                lat,
                alt,
                angle,
                sats,
                speed,
                event_io,
                gen_type: (codec == Codec::C16).then_some(gen),
                io: [a, b, c, d, e].concat(),
            },
        )
}

fn codec_and_records() -> impl Strategy<Value = (Codec, Vec<Record>)> {
    prop_oneof![Just(Codec::C8), Just(Codec::C8E), Just(Codec::C16)]
        .prop_flat_map(|c| (Just(c), vec(record(c), 0..12)))
}

proptest! {
    #[test]
    fn avl_frames_round_trip((codec, records) in codec_and_records()) {
        let mut wire = Vec::new();
        encode_avl_frame(codec, &records, &mut wire).unwrap();
        let Status::Complete((Frame::Avl(avl), used)) = decode_frame(&wire, u32::MAX).unwrap() else {
            panic!("not an AVL frame");
        };
        prop_assert_eq!(used, wire.len());
        prop_assert_eq!(avl.codec(), codec);
        let back: Vec<Record> = avl.records().map(|r| r.to_owned_record()).collect();
        prop_assert_eq!(back, records);
        for r in avl.records() {
            let mut internal = Vec::new();
            r.for_each_io(|e| internal.push(e));
            prop_assert_eq!(internal, r.io().collect::<Vec<_>>());
        }
        // The shards reserve exactly what the row encoder writes.
        let mut rows = Vec::new();
        crate::shard::copy::encode_rows(Imei::new(1).unwrap(), &avl, 0, &mut rows);
        prop_assert_eq!(crate::shard::copy::rows_len(&avl), rows.len());
    }

    /// Any frame, cut anywhere, frames the same as whole.
    #[test]
    fn frames_split_anywhere_decode_the_same((codec, records) in codec_and_records(), cut: prop::sample::Index) {
        let mut wire = Vec::new();
        encode_avl_frame(codec, &records, &mut wire).unwrap();
        let whole = super::tcp::tests_support::frame_all(&wire);
        prop_assert_eq!(super::tcp::tests_support::frame_split(&wire, cut.index(wire.len() + 1)), whole);
    }

    #[test]
    fn udp_datagrams_round_trip((codec, records) in codec_and_records(), pid: u16, avl_id: u8, imei in 0..=Imei::MAX) {
        let imei = Imei::new(imei).unwrap();
        let mut wire = Vec::new();
        encode_datagram(pid, avl_id, imei, codec, &records, &mut wire).unwrap();
        let d = decode_datagram(&wire).unwrap();
        prop_assert_eq!((d.packet_id, d.avl_packet_id, d.imei), (pid, avl_id, imei));
        let back: Vec<Record> = d.avl.records().map(|r| r.to_owned_record()).collect();
        prop_assert_eq!(back, records);
    }

    #[test]
    fn commands_round_trip(c14: bool, kind in prop_oneof![Just(0x05u8), Just(0x06), Just(0x11)], payload in vec(any::<u8>(), 0..300), imei in 0..=Imei::MAX) {
        let imei = Imei::new(imei).unwrap();
        let codec = if c14 { Codec::C14 } else { Codec::C12 };
        let mut wire = Vec::new();
        encode_command_frame(codec, kind, c14.then_some(imei), &payload, &mut wire);
        let Status::Complete((Frame::Command(c), used)) = decode_frame(&wire, u32::MAX).unwrap() else {
            panic!("not a command frame");
        };
        prop_assert_eq!(used, wire.len());
        prop_assert_eq!((c.codec, c.kind, c.payload), (codec, kind, &payload[..]));
        prop_assert_eq!(c.imei(), c14.then_some(imei));
    }

    /// Arbitrary bytes: an item, a need for more bytes, or an error, never a panic; and every
    /// record and IO element of whatever decodes can be walked.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..600)) {
        walk(&bytes);
    }

    /// The same, starting from a valid frame with a few bytes flipped (reaches deeper checks).
    #[test]
    fn corrupted_frames_never_panic((codec, records) in codec_and_records(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let mut wire = Vec::new();
        encode_avl_data(codec, &records, &mut wire).unwrap();
        for (i, b) in flips {
            let at = i.index(wire.len());
            wire[at] = b;
        }
        // Without the CRC in the way.
        if let Ok(avl) = AvlData::parse(&wire) {
            for r in avl.records() {
                let _ = r.to_owned_record();
                r.for_each_io(|_| {});
            }
        }
        walk(&wire);
    }
}

fn walk(bytes: &[u8]) {
    let mut rest = bytes;
    while let Ok(Status::Complete((item, used))) = decode_frame(rest, 64 * 1024) {
        assert!(used > 0 && used <= rest.len());
        if let Frame::Avl(avl) = item {
            for r in avl.records() {
                let _ = r.to_owned_record();
            }
        }
        rest = &rest[used..];
    }
    if let Ok(d) = decode_datagram(bytes) {
        for r in d.avl.records() {
            let _ = r.to_owned_record();
        }
    }
}

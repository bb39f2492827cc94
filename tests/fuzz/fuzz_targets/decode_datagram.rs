//! UDP datagrams on arbitrary bytes: decode, build the ack, walk every record and IO element.
//! Nothing may panic or read out of bounds.
#![no_main]

use fleetgate::protocol::{decode_datagram, udp, IoValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let d = match decode_datagram(data) {
        Ok(d) => d,
        Err(e) => {
            let _ = (e.to_string(), e.kind());
            return;
        }
    };
    let ack = udp::encode_ack(d.packet_id, d.avl_packet_id, d.avl.count());
    assert_eq!(ack[6], d.avl.count());
    let mut acc = d.imei.as_u64();
    let mut n = 0usize;
    for r in d.avl.records() {
        n += 1;
        acc = acc
            .wrapping_add(r.ts_ms())
            .wrapping_add(r.lat().to_bits() ^ r.lon().to_bits())
            .wrapping_add(r.alt() as u64)
            .wrapping_add(u64::from(r.event_io()))
            .wrapping_add(r.gen_type().map_or(0, u64::from));
        let mut k = 0usize;
        for e in r.io() {
            k += 1;
            acc = acc.wrapping_add(u64::from(e.id));
            acc = acc.wrapping_add(match e.value {
                IoValue::Nx(b) => b.len() as u64,
                v => v.as_u64().unwrap_or(0),
            });
        }
        assert_eq!(k, usize::from(r.io_total()), "io_total");
    }
    assert_eq!(n, usize::from(d.avl.count()), "record count");
    std::hint::black_box(acc);
});

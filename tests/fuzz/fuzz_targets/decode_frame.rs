//! The TCP stream framer on arbitrary bytes: decode item after item, as a connection would,
//! and walk everything that decodes. Nothing may panic, loop or read out of bounds.
#![no_main]

use fleetgate::protocol::crc::crc16_ibm;
use fleetgate::protocol::{decode_frame, Frame, IoValue, Status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte steers: bit 0 picks a small declared-length limit, so that limits are
    // exercised too; bit 1 wraps the rest in a valid frame header and CRC, so that mutations
    // reach the AVL and command parsers instead of dying on the CRC check.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let limit = if sel & 1 == 1 {
        u32::from(sel) * 16
    } else {
        fleetgate::protocol::DEFAULT_MAX_FRAME_LEN
    };
    let framed;
    let mut buf = if sel & 2 == 2 {
        framed = frame(rest);
        &framed[..]
    } else {
        rest
    };
    loop {
        match decode_frame(buf, limit) {
            Ok(Status::Complete((frame, used))) => {
                assert!(
                    used > 0 && used <= buf.len(),
                    "used {used} of {}",
                    buf.len()
                );
                walk(&frame);
                prefixes_wait(&buf[..used], limit);
                buf = &buf[used..];
            }
            Ok(Status::Partial(n)) => {
                assert!(n > 0, "Partial(0)");
                break;
            }
            Err(e) => {
                let _ = (e.to_string(), e.kind());
                break;
            }
        }
    }
});

/// Every strict prefix of a valid item must ask for more bytes, never be an error: a TCP read
/// can end anywhere, and the answer must not depend on where.
fn prefixes_wait(item: &[u8], limit: u32) {
    for cut in 0..item.len() {
        match decode_frame(&item[..cut], limit) {
            Ok(Status::Partial(n)) => assert!(
                n > 0 && n <= item.len() - cut,
                "prefix of {cut} of {} bytes asks for {n} more",
                item.len()
            ),
            other => panic!("prefix of {cut} of a {}-byte item: {other:?}", item.len()),
        }
    }
}

/// `data` (codec id .. count2) with preamble, data length and CRC, as a device would send it.
fn frame(data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(data.len() + 12);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&(data.len() as u32).to_be_bytes());
    f.extend_from_slice(data);
    f.extend_from_slice(&u32::from(crc16_ibm(data)).to_be_bytes());
    f
}

fn walk(frame: &Frame<'_>) {
    let mut acc = 0u64;
    match frame {
        Frame::Login(imei) => {
            assert_eq!(imei.to_string().len(), 15);
        }
        Frame::Ping => {}
        Frame::Avl(avl) => {
            let mut n = 0usize;
            for r in avl.records() {
                n += 1;
                acc = acc
                    .wrapping_add(r.ts_ms())
                    .wrapping_add(r.lat().to_bits())
                    .wrapping_add(r.lon().to_bits())
                    .wrapping_add(r.alt() as u64)
                    .wrapping_add(u64::from(r.angle()) + u64::from(r.speed()))
                    .wrapping_add(u64::from(r.sats()) + u64::from(r.priority()))
                    .wrapping_add(u64::from(r.event_io()))
                    .wrapping_add(r.gen_type().map_or(0, u64::from));
                let mut k = 0usize;
                for e in r.io() {
                    k += 1;
                    acc = acc.wrapping_add(u64::from(e.id));
                    acc = acc.wrapping_add(match e.value {
                        IoValue::Nx(b) => b.iter().map(|&x| u64::from(x)).sum(),
                        v => v.as_u64().unwrap_or(0),
                    });
                }
                // Every element the record declares is walked.
                assert_eq!(k, usize::from(r.io_total()), "io_total");
                let _ = r.to_owned_record();
            }
            assert_eq!(n, usize::from(avl.count()), "record count");
        }
        Frame::Command(c) => {
            acc = acc.wrapping_add(c.ts_ms.unwrap_or(0));
            if let Some(t) = c.text() {
                acc = acc.wrapping_add(t.len() as u64);
            }
            if let Some(i) = c.imei() {
                acc = acc.wrapping_add(i.as_u64());
            }
            assert!(c.payload.len() <= c.body.len());
        }
    }
    std::hint::black_box(acc);
}

//! The TCP stream framer and frame encoders: preamble, data length, CRC. PURE.
//!
//! [`decode_frame`] is handed whatever bytes have arrived and answers with one complete item
//! and how many bytes it used, or with how many more bytes it needs at least. It keeps no
//! state, so the answer does not depend on how the stream was split into reads.

use super::avl::{encode_avl_data, AvlData, EncodeError, Record};
use super::command::{encode_command_data, CommandFrame};
use super::crc::crc16_ibm;
use super::imei::MAX_LOGIN_LEN;
use super::{Codec, DecodeError, Imei, Status};

/// Bytes before the data field: preamble (4) and data length (4).
pub const HEADER_LEN: usize = 8;
/// Bytes after the data field: the CRC field (4).
pub const TRAILER_LEN: usize = 4;
/// The lone keep-alive byte.
pub const PING: u8 = 0xFF;

/// One complete item of the device-to-server TCP stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The login: a 15-digit IMEI.
    Login(Imei),
    /// A lone 0xFF keep-alive.
    Ping,
    /// AVL data (codec 8, 8E, 16): answered with the record count once stored.
    Avl(AvlData<'a>),
    /// A command-family frame (codec 12-15): never answered with a record ack.
    Command(CommandFrame<'a>),
}

/// Decodes the first item in `buf`.
///
/// `max_frame_len` bounds the declared data length; it is checked as soon as the 8-byte header
/// is present, before any of the body is waited for.
///
/// # Errors
/// A [`DecodeError`] for bytes that cannot be a valid item; the connection should be closed.
pub fn decode_frame(
    buf: &[u8],
    max_frame_len: u32,
) -> Result<Status<(Frame<'_>, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(Status::Partial(1));
    };
    if first == PING {
        return Ok(Status::Complete((Frame::Ping, 1)));
    }
    if buf.len() < 2 {
        return Ok(Status::Partial(2 - buf.len()));
    }
    let login_len = u16::from_be_bytes([buf[0], buf[1]]);
    if login_len != 0 {
        if login_len > MAX_LOGIN_LEN {
            return Err(DecodeError::LoginLength(login_len));
        }
        let total = 2 + login_len as usize;
        if buf.len() < total {
            return Ok(Status::Partial(total - buf.len()));
        }
        let imei = Imei::from_ascii(&buf[2..total]).ok_or(DecodeError::InvalidImei)?;
        return Ok(Status::Complete((Frame::Login(imei), total)));
    }
    if buf.len() < HEADER_LEN {
        // Refuse a bad preamble as early as its bytes show it (bytes 4..8 are the length).
        if buf[2..buf.len().min(4)].iter().any(|&b| b != 0) {
            return Err(DecodeError::BadPreamble);
        }
        return Ok(Status::Partial(HEADER_LEN - buf.len()));
    }
    if buf[2] != 0 || buf[3] != 0 {
        return Err(DecodeError::BadPreamble);
    }
    let data_len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if data_len > max_frame_len {
        return Err(DecodeError::FrameTooLarge {
            declared: data_len,
            max: max_frame_len,
        });
    }
    if data_len < 3 {
        return Err(DecodeError::Truncated {
            what: "data length",
        });
    }
    let total = HEADER_LEN + data_len as usize + TRAILER_LEN;
    if buf.len() < total {
        return Ok(Status::Partial(total - buf.len()));
    }
    let data = &buf[HEADER_LEN..HEADER_LEN + data_len as usize];
    let t = &buf[HEADER_LEN + data_len as usize..total];
    let sent = u32::from_be_bytes([t[0], t[1], t[2], t[3]]);
    let computed = crc16_ibm(data);
    if sent != computed as u32 {
        return Err(DecodeError::Crc { sent, computed });
    }
    let codec = Codec::from_id(data[0]).ok_or(DecodeError::UnknownCodec(data[0]))?;
    let frame = if codec.is_avl() {
        Frame::Avl(AvlData::parse(data)?)
    } else {
        Frame::Command(CommandFrame::parse(data)?)
    };
    Ok(Status::Complete((frame, total)))
}

/// The 4-byte ack for a stored AVL frame: the number of records accepted.
pub fn encode_record_ack(accepted: u32) -> [u8; 4] {
    accepted.to_be_bytes()
}

/// Wraps the data field that `fill` appends in preamble, data length and CRC.
fn encode_framed(
    out: &mut Vec<u8>,
    fill: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    fill(out)?;
    let data_len = out.len() - start - HEADER_LEN;
    out[start + 4..start + HEADER_LEN].copy_from_slice(&(data_len as u32).to_be_bytes());
    let crc = crc16_ibm(&out[start + HEADER_LEN..]) as u32;
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// Appends a whole AVL data frame as a device sends it.
///
/// # Errors
/// See [`encode_avl_data`].
pub fn encode_avl_frame(
    codec: Codec,
    records: &[Record],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    encode_framed(out, |o| encode_avl_data(codec, records, o))
}

/// Appends a whole Codec 12 or 14 frame (`kind` 0x05 for a server command, 0x06 for a device's
/// response, 0x11 for a Codec 14 refusal).
///
/// # Panics
/// As [`encode_command_data`].
pub fn encode_command_frame(
    codec: Codec,
    kind: u8,
    imei: Option<Imei>,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let _ = encode_framed(out, |o| {
        encode_command_data(codec, kind, imei, payload, o);
        Ok(())
    });
}

/// Stream-splitting helpers shared by the codec's tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Feeds `chunks` in order through a growing buffer, draining complete items after each,
    /// and returns what came out (items as Debug text, then the error if one ended the stream).
    pub fn frame_chunks<'c>(chunks: impl IntoIterator<Item = &'c [u8]>) -> Vec<String> {
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match decode_frame(&buf, 4096) {
                    Ok(Status::Complete((item, used))) => {
                        out.push(format!("{item:?}"));
                        buf.drain(..used);
                    }
                    Ok(Status::Partial(n)) => {
                        assert!(n > 0, "Partial(0)");
                        break;
                    }
                    Err(e) => {
                        out.push(format!("error: {e}"));
                        return out;
                    }
                }
            }
        }
        if !buf.is_empty() {
            out.push(format!("partial: {} bytes", buf.len()));
        }
        out
    }

    pub fn frame_all(b: &[u8]) -> Vec<String> {
        frame_chunks([b])
    }

    pub fn frame_split(b: &[u8], at: usize) -> Vec<String> {
        let (x, y) = b.split_at(at);
        frame_chunks([x, y])
    }

    pub fn frame_bytewise(b: &[u8]) -> Vec<String> {
        frame_chunks(b.chunks(1))
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    const LOGIN: &str = "000f333536333037303432343431303133";
    const C8: &str = "000000000000003608010000016b40d8ea30010000000000000000000000000000000105021503010101425e0f01f10000601a014e0000000000000000010000c7cf";

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    #[test]
    fn ping_glued_to_login_and_frames() {
        let mut stream = vec![PING];
        stream.extend(h(LOGIN));
        stream.push(PING);
        stream.extend(h(C8));
        stream.extend(h(C8));
        stream.push(PING);
        let items = frame_all(&stream);
        assert_eq!(items.len(), 6, "{items:?}");
        assert_eq!(items[0], "Ping");
        assert!(items[1].starts_with("Login"));
        assert_eq!(items[2], "Ping");
        assert!(items[3].starts_with("Avl") && items[4].starts_with("Avl"));
        assert_eq!(items[5], "Ping");
        for at in 0..=stream.len() {
            assert_eq!(frame_split(&stream, at), items, "split at {at}");
        }
        assert_eq!(frame_bytewise(&stream), items);
    }

    #[test]
    fn every_split_of_a_long_frame_gives_the_same_items() {
        // Data lengths of 256 and more put non-zero bytes in the header's first 8 bytes.
        let recs: Vec<_> = (0..12u64)
            .map(|i| crate::protocol::Record {
                ts_ms: 1_700_000_000_000 + i,
                priority: 1,
                lon: 1,
                lat: 2,
                alt: 3,
                angle: 4,
                sats: 5,
                speed: 6,
                event_io: 7,
                gen_type: None,
                io: (0..20)
                    .map(|k| (k, crate::protocol::OwnedIoValue::U32(k as u32)))
                    .collect(),
            })
            .collect();
        let mut f = Vec::new();
        encode_avl_frame(Codec::C8E, &recs, &mut f).unwrap();
        assert!(f.len() > 1024);
        let whole = frame_all(&f);
        assert!(whole.len() == 1 && whole[0].starts_with("Avl"), "{whole:?}");
        for at in 0..=f.len() {
            assert_eq!(frame_split(&f, at), whole, "split at {at}");
        }
        assert_eq!(frame_bytewise(&f), whole);
    }

    #[test]
    fn oversize_declared_length_is_refused_before_the_body() {
        let mut head = vec![0, 0, 0, 0];
        head.extend_from_slice(&100_000u32.to_be_bytes());
        let err = decode_frame(&head, 4096).unwrap_err();
        assert_eq!(
            err,
            DecodeError::FrameTooLarge {
                declared: 100_000,
                max: 4096
            }
        );
    }

    #[test]
    fn bad_preamble_is_refused_early() {
        assert_eq!(
            decode_frame(&[0, 0, 1], 4096).unwrap_err(),
            DecodeError::BadPreamble
        );
        assert_eq!(decode_frame(&[0, 0], 4096).unwrap(), Status::Partial(6));
    }

    #[test]
    fn partial_reports_what_is_missing() {
        let f = h(C8);
        assert_eq!(
            decode_frame(&f[..10], 4096).unwrap(),
            Status::Partial(f.len() - 10)
        );
        assert_eq!(decode_frame(&[], 4096).unwrap(), Status::Partial(1));
    }

    #[test]
    fn wrong_crc_is_an_error_and_never_an_item() {
        let mut f = h(C8);
        let n = f.len();
        f[n - 1] ^= 1;
        assert!(matches!(
            decode_frame(&f, 4096),
            Err(DecodeError::Crc { .. })
        ));
    }

    #[test]
    fn count_mismatch_and_trailing_bytes() {
        // count2 altered, CRC recomputed.
        let f = h(C8);
        let mut data = f[8..f.len() - 4].to_vec();
        let last = data.len() - 1;
        data[last] = 2;
        assert_eq!(
            AvlData::parse(&data).unwrap_err(),
            DecodeError::CountMismatch { first: 1, last: 2 }
        );
        let mut data = f[8..f.len() - 4].to_vec();
        data.insert(data.len() - 1, 0);
        assert_eq!(
            AvlData::parse(&data).unwrap_err(),
            DecodeError::TrailingBytes { extra: 1 }
        );
    }

    #[test]
    fn command_frames_round_trip() {
        let mut out = Vec::new();
        encode_command_frame(Codec::C12, 0x05, None, b"getinfo", &mut out);
        assert_eq!(
            hex::encode(&out),
            "000000000000000f0c010500000007676574696e666f0100004312"
        );
        let imei = Imei::from_ascii(b"352093081452251").unwrap();
        out.clear();
        encode_command_frame(Codec::C14, 0x05, Some(imei), b"getver", &mut out);
        assert_eq!(
            hex::encode(&out),
            "00000000000000160e01050000000e0352093081452251676574766572010000d2c1"
        );
        let Status::Complete((Frame::Command(c), _)) = decode_frame(&out, 4096).unwrap() else {
            panic!()
        };
        assert_eq!(
            (c.kind, c.imei(), c.text()),
            (0x05, Some(imei), Some("getver"))
        );
    }
}

//! Command frames: Codec 12 and 14 (server commands and device answers), Codec 13 and 15
//! (one-way device messages), Codec 12 camera data. PURE.

use super::{Codec, DecodeError, Imei};

/// Codec 12/14 type: a command from the server.
pub const TYPE_COMMAND: u8 = 0x05;
/// Codec 12/14 type: the device's response.
pub const TYPE_RESPONSE: u8 = 0x06;
/// Codec 15 type: a device message.
pub const TYPE_MESSAGE: u8 = 0x0B;
/// Codec 12 type: camera data.
pub const TYPE_CAMERA: u8 = 0x0D;
/// Codec 14 type: refusal, the IMEI in the command is not the device's own.
pub const TYPE_REFUSED: u8 = 0x11;

/// A command-family frame, borrowing its payload from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandFrame<'a> {
    pub codec: Codec,
    /// Quantity (count1 == count2), normally 1.
    pub quantity: u8,
    /// Type byte: 0x05 command, 0x06 response, 0x0B message, 0x0D camera, 0x11 refusal.
    pub kind: u8,
    /// Codec 14/15: the 8-byte IMEI field, as it travels.
    pub imei_field: Option<[u8; 8]>,
    /// Codec 13/15: the message timestamp, in milliseconds since the epoch.
    pub ts_ms: Option<u64>,
    /// Everything `size` counts.
    pub body: &'a [u8],
    /// What follows the IMEI field and timestamp: the command text or data.
    pub payload: &'a [u8],
}

impl<'a> CommandFrame<'a> {
    /// Parses `data` = codec id .. quantity2 (what a TCP frame's data length counts).
    ///
    /// # Errors
    /// Quantities differ, `size` disagrees with the bytes present, or the body is too short for
    /// the codec's fixed fields.
    pub fn parse(data: &'a [u8]) -> Result<CommandFrame<'a>, DecodeError> {
        // codec(1) q1(1) type(1) size(4) payload q2(1)
        if data.len() < 8 {
            return Err(DecodeError::Truncated {
                what: "command frame",
            });
        }
        let codec = Codec::from_id(data[0]).ok_or(DecodeError::UnknownCodec(data[0]))?;
        if codec.is_avl() {
            return Err(DecodeError::UnknownCodec(data[0]));
        }
        let quantity = data[1];
        let last = data[data.len() - 1];
        if quantity != last {
            return Err(DecodeError::CountMismatch {
                first: quantity,
                last,
            });
        }
        let kind = data[2];
        let size = u32::from_be_bytes([data[3], data[4], data[5], data[6]]) as usize;
        let body = &data[7..data.len() - 1];
        if size != body.len() {
            return Err(DecodeError::SizeMismatch {
                declared: size as u32,
                present: body.len() as u32,
            });
        }
        let (imei_field, ts_ms, payload) = match codec {
            Codec::C14 => {
                let f: [u8; 8] = body
                    .get(..8)
                    .ok_or(DecodeError::Truncated {
                        what: "codec 14 imei",
                    })?
                    .try_into()
                    .unwrap_or_default();
                (Some(f), None, &body[8..])
            }
            Codec::C15 => {
                let head = body.get(..12).ok_or(DecodeError::Truncated {
                    what: "codec 15 header",
                })?;
                let ts = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                let f: [u8; 8] = head[4..12].try_into().unwrap_or_default();
                (Some(f), Some(ts as u64 * 1000), &body[12..])
            }
            Codec::C13 => {
                // The documentation says 4 bytes of seconds; its own CRC-valid example (and
                // devices in the field) carry 8 bytes of milliseconds. A 4-byte reading below
                // 2^24 seconds (1970-07) can only be the high half of a millisecond count.
                let head = body.get(..4).ok_or(DecodeError::Truncated {
                    what: "codec 13 timestamp",
                })?;
                let secs = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                match body.get(..8) {
                    Some(ms) if secs < 1 << 24 => (
                        None,
                        Some(u64::from_be_bytes(ms.try_into().unwrap_or_default())),
                        &body[8..],
                    ),
                    _ => (None, Some(secs as u64 * 1000), &body[4..]),
                }
            }
            _ => (None, None, body),
        };
        Ok(CommandFrame {
            codec,
            quantity,
            kind,
            imei_field,
            ts_ms,
            body,
            payload,
        })
    }

    /// The IMEI of a Codec 14/15 frame, when the field holds decimal digits.
    pub fn imei(&self) -> Option<Imei> {
        self.imei_field.as_ref().and_then(Imei::from_bcd_field)
    }

    /// The payload as text, when it is printable ASCII (tabs, CR and LF allowed).
    pub fn text(&self) -> Option<&'a str> {
        printable(self.payload)
    }
}

fn is_printable(b: u8) -> bool {
    (0x20..0x7f).contains(&b) || b == b'\n' || b == b'\r' || b == b'\t'
}

fn printable(b: &[u8]) -> Option<&str> {
    if b.iter().all(|&c| is_printable(c)) {
        std::str::from_utf8(b).ok()
    } else {
        None
    }
}

/// Appends the command-family body (codec .. quantity2) for Codec 12 or 14.
/// For Codec 14, `imei` is required and is written as the 8-byte IMEI field.
///
/// # Panics
/// If `codec` is not 12 or 14, if Codec 14 is given no IMEI, or the payload exceeds u32.
pub fn encode_command_data(
    codec: Codec,
    kind: u8,
    imei: Option<Imei>,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    assert!(
        matches!(codec, Codec::C12 | Codec::C14),
        "encode_command_data takes codec 12 or 14"
    );
    let field = match codec {
        Codec::C14 => Some(imei.expect("codec 14 needs an IMEI").to_bcd_field()),
        _ => None,
    };
    let size = payload.len() + field.map_or(0, |f| f.len());
    out.push(codec.id());
    out.push(1);
    out.push(kind);
    out.extend_from_slice(&u32::try_from(size).expect("payload fits u32").to_be_bytes());
    if let Some(f) = field {
        out.extend_from_slice(&f);
    }
    out.extend_from_slice(payload);
    out.push(1);
}

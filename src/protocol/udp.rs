//! UDP datagrams: channel header, AVL packet header with IMEI, AVL data; and the UDP ack. PURE.

use super::avl::{encode_avl_data, AvlData, EncodeError, Record};
use super::{Codec, DecodeError, Imei};

/// A decoded datagram, borrowing its records.
#[derive(Clone, Copy, Debug)]
pub struct UdpDatagram<'a> {
    pub packet_id: u16,
    /// The channel header's third field, `01` on real devices.
    pub not_usable: u8,
    pub avl_packet_id: u8,
    pub imei: Imei,
    pub avl: AvlData<'a>,
}

/// Length of the ack datagram.
pub const UDP_ACK_LEN: usize = 7;

/// Decodes one datagram (no CRC over UDP).
///
/// # Errors
/// The length field disagrees with the datagram, the IMEI is not 15 digits, or the AVL data is
/// bad (see [`AvlData::parse`]).
pub fn decode_datagram(buf: &[u8]) -> Result<UdpDatagram<'_>, DecodeError> {
    let head = buf
        .get(..8)
        .ok_or(DecodeError::Truncated { what: "udp header" })?;
    let len = u16::from_be_bytes([head[0], head[1]]) as usize;
    if len != buf.len() - 2 {
        return Err(DecodeError::SizeMismatch {
            declared: len as u32,
            present: (buf.len() - 2) as u32,
        });
    }
    let packet_id = u16::from_be_bytes([head[2], head[3]]);
    let not_usable = head[4];
    let avl_packet_id = head[5];
    let imei_len = u16::from_be_bytes([head[6], head[7]]) as usize;
    let digits = buf
        .get(8..8 + imei_len)
        .ok_or(DecodeError::Truncated { what: "udp imei" })?;
    let imei = Imei::from_ascii(digits).ok_or(DecodeError::InvalidImei)?;
    let avl = AvlData::parse(&buf[8 + imei_len..])?;
    Ok(UdpDatagram {
        packet_id,
        not_usable,
        avl_packet_id,
        imei,
        avl,
    })
}

/// The server's answer to a datagram: `00 05 | packet id | 01 | AVL packet id | accepted`.
pub fn encode_ack(packet_id: u16, avl_packet_id: u8, accepted: u8) -> [u8; UDP_ACK_LEN] {
    let p = packet_id.to_be_bytes();
    [0x00, 0x05, p[0], p[1], 0x01, avl_packet_id, accepted]
}

/// Appends a whole datagram as a device sends it.
///
/// # Errors
/// See [`encode_avl_data`].
pub fn encode_datagram(
    packet_id: u16,
    avl_packet_id: u8,
    imei: Imei,
    codec: Codec,
    records: &[Record],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&packet_id.to_be_bytes());
    out.push(0x01);
    out.push(avl_packet_id);
    out.extend_from_slice(&15u16.to_be_bytes());
    out.extend_from_slice(&imei.to_ascii());
    encode_avl_data(codec, records, out)?;
    let len = (out.len() - start - 2) as u16;
    out[start..start + 2].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

//! The Teltonika codec. PURE: no IO, no async, no clock; handed bytes, it answers with borrowed
//! views of them.
//!
//! - [`tcp`]: the stream framer ([`decode_frame`]) and frame encoders.
//! - [`avl`]: Codec 8 / 8E / 16 records and IO elements.
//! - [`command`]: Codec 12 / 13 / 14 / 15 frames.
//! - [`udp`]: datagrams and their ack.
//! - [`imei`]: the login and the IMEI type. [`crc`]: CRC-16/IBM.

pub mod avl;
pub mod command;
pub mod crc;
pub mod imei;
pub mod tcp;
pub mod udp;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod wiki_tests;

pub use avl::{AvlData, AvlRecord, IoElement, IoValue, OwnedIoValue, Record};
pub use command::CommandFrame;
pub use imei::Imei;
pub use tcp::{decode_frame, encode_record_ack, Frame};
pub use udp::{decode_datagram, UdpDatagram};

/// Default limit on a TCP frame's declared data length: real Codec 16 frames pass 900 bytes and
/// camera chunks reach 2 KiB, so the documentation's 1280 is too tight.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 16 * 1024;

/// The answer of a decoder that may not have all the bytes yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status<T> {
    /// A whole item.
    Complete(T),
    /// At least this many more bytes are needed; not an error.
    Partial(usize),
}

/// The codec ids of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    C8 = 0x08,
    C8E = 0x8E,
    C16 = 0x10,
    C12 = 0x0C,
    C13 = 0x0D,
    C14 = 0x0E,
    C15 = 0x0F,
}

impl Codec {
    /// The codec for an id byte, if the gateway knows it.
    pub fn from_id(id: u8) -> Option<Codec> {
        Some(match id {
            0x08 => Codec::C8,
            0x8E => Codec::C8E,
            0x10 => Codec::C16,
            0x0C => Codec::C12,
            0x0D => Codec::C13,
            0x0E => Codec::C14,
            0x0F => Codec::C15,
            _ => return None,
        })
    }
    /// The id byte.
    pub fn id(self) -> u8 {
        self as u8
    }
    /// Codec 8, 8E and 16 carry AVL records; the others are commands and messages.
    pub fn is_avl(self) -> bool {
        matches!(self, Codec::C8 | Codec::C8E | Codec::C16)
    }
}

/// Why bytes are not a valid item. Each variant is one check; none is "need more bytes".
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("login length {0} is not an IMEI")]
    LoginLength(u16),
    #[error("IMEI is not 15 decimal digits")]
    InvalidImei,
    #[error("frame preamble is not four zero bytes")]
    BadPreamble,
    #[error("declared data length {declared} exceeds the limit of {max} bytes")]
    FrameTooLarge { declared: u32, max: u32 },
    #[error("CRC mismatch: frame says {sent:#06x}, data gives {computed:#06x}")]
    Crc { sent: u32, computed: u16 },
    #[error("unknown codec id {0:#04x}")]
    UnknownCodec(u8),
    #[error("record counts differ: {first} at the start, {last} at the end")]
    CountMismatch { first: u8, last: u8 },
    #[error("truncated {what}: a length runs past the bytes present")]
    Truncated { what: &'static str },
    #[error("{extra} bytes left after the last record")]
    TrailingBytes { extra: u32 },
    #[error("IO total {total} differs from the sum of its groups {sum}")]
    IoCountMismatch { total: u16, sum: u16 },
    #[error("declared size {declared} differs from the {present} bytes present")]
    SizeMismatch { declared: u32, present: u32 },
}

impl DecodeError {
    /// A short stable name, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::LoginLength(_) => "login_length",
            DecodeError::InvalidImei => "invalid_imei",
            DecodeError::BadPreamble => "bad_preamble",
            DecodeError::FrameTooLarge { .. } => "frame_too_large",
            DecodeError::Crc { .. } => "crc",
            DecodeError::UnknownCodec(_) => "unknown_codec",
            DecodeError::CountMismatch { .. } => "count_mismatch",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
            DecodeError::IoCountMismatch { .. } => "io_count_mismatch",
            DecodeError::SizeMismatch { .. } => "size_mismatch",
        }
    }
}

"""The few Teltonika frames the tuning tools send, built by hand (no gateway code)."""
import struct


def crc16_ibm(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def framed(data: bytes) -> bytes:
    """Preamble, data length, data, CRC."""
    return b"\0\0\0\0" + struct.pack(">I", len(data)) + data + struct.pack(">I", crc16_ibm(data))


def login(imei: bytes) -> bytes:
    return struct.pack(">H", len(imei)) + imei


def avl8(ts_ms: int) -> bytes:
    """One Codec 8 record with a position and no IO elements."""
    gps = struct.pack(">iihHBH", 250000000, 546000000, 100, 90, 9, 30)
    rec = struct.pack(">QB", ts_ms, 0) + gps + bytes(6)  # event id, total, four empty groups
    return framed(bytes([0x08, 1]) + rec + bytes([1]))


def codec12(kind: int, payload: bytes) -> bytes:
    return framed(bytes([0x0C, 1, kind]) + struct.pack(">I", len(payload)) + payload + bytes([1]))

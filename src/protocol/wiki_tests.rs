//! Every worked example of the Teltonika documentation (`tests/fixtures/wiki-examples.tsv`, a
//! copy of `shared/teltonika/wiki-examples.tsv`) decodes to exactly the facts listed for it.
//!
//! Each row's `expect` column is a list of `key=value` facts; [`facts`] computes the same keys
//! from what the codec decoded, and every expected key must be present and equal.

use std::collections::BTreeMap;

use super::command::CommandFrame;
use super::crc::crc16_ibm;
use super::tcp::{decode_frame, encode_record_ack, Frame};
use super::udp::{decode_datagram, encode_ack};
use super::{AvlData, DecodeError, Imei, IoValue, Status, DEFAULT_MAX_FRAME_LEN};

#[path = "../../tests/fixtures/wiki.rs"]
mod wiki;
use wiki::{rows, Row};

fn io_list(r: &super::AvlRecord<'_>) -> String {
    r.io()
        .map(|e| match e.value {
            IoValue::Nx(b) => format!("{}:{}", e.id, hex::encode(b)),
            v => format!("{}:{}", e.id, v.as_u64().unwrap()),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn avl_facts(avl: &AvlData<'_>, f: &mut BTreeMap<String, String>) {
    f.insert("codec".into(), format!("{:02x}", avl.codec().id()));
    f.insert("records".into(), avl.count().to_string());
    let ts: Vec<String> = avl.records().map(|r| r.ts_ms().to_string()).collect();
    f.insert("ts_ms".into(), ts.join(","));
    for (i, r) in avl.records().enumerate() {
        let p = format!("r{i}.");
        let mut put = |k: &str, v: String| f.insert(format!("{p}{k}"), v);
        put("ts_ms", r.ts_ms().to_string());
        put("priority", r.priority().to_string());
        put("lat", r.lat().to_string());
        put("lon", r.lon().to_string());
        put("alt", r.alt().to_string());
        put("angle", r.angle().to_string());
        put("sats", r.sats().to_string());
        put("speed", r.speed().to_string());
        put("event_io", r.event_io().to_string());
        if let Some(g) = r.gen_type() {
            put("gen_type", g.to_string());
        }
        put("io_total", r.io_total().to_string());
        put("io", io_list(&r));
    }
}

fn command_facts(c: &CommandFrame<'_>, f: &mut BTreeMap<String, String>) {
    f.insert("quantity".into(), c.quantity.to_string());
    f.insert("type".into(), format!("{:02x}", c.kind));
    f.insert("size".into(), c.body.len().to_string());
    if let Some(i) = c.imei() {
        f.insert("imei".into(), i.to_string());
    }
    if let Some(field) = c.imei_field {
        f.insert("imei_field".into(), hex::encode(field));
    }
    if let Some(ts) = c.ts_ms {
        f.insert("ts_s".into(), (ts / 1000).to_string());
    }
    f.insert("text".into(), c.text().unwrap_or("").to_string());
    f.insert("body_hex".into(), hex::encode(c.body));
    f.insert("tail_text".into(), c.text().unwrap_or("").to_string());
}

/// The facts a row's bytes decode to, under the row's own key names.
fn facts(row: &Row) -> BTreeMap<String, String> {
    let b = &row.bytes;
    let mut f = BTreeMap::new();
    match (row.transport.as_str(), row.kind.as_str()) {
        ("tcp", "server_ack") => {
            let n = u32::from_be_bytes(b[..4].try_into().unwrap());
            assert_eq!(encode_record_ack(n), b[..]);
            f.insert("records_acked".into(), n.to_string());
        }
        ("udp", "server_ack") => {
            let (pid, avl_id, n) = (u16::from_be_bytes([b[2], b[3]]), b[5], b[6]);
            assert_eq!(encode_ack(pid, avl_id, n), b[..]);
            f.insert("len".into(), u16::from_be_bytes([b[0], b[1]]).to_string());
            f.insert("packet_id".into(), format!("{pid:04x}"));
            f.insert("not_usable".into(), format!("{:02x}", b[4]));
            f.insert("avl_packet_id".into(), format!("{avl_id:02x}"));
            f.insert("accepted".into(), n.to_string());
        }
        ("udp", _) => {
            let d = decode_datagram(b).unwrap_or_else(|e| panic!("{}: {e}", row.id));
            f.insert("udp_len".into(), (b.len() - 2).to_string());
            f.insert("packet_id".into(), format!("{:04x}", d.packet_id));
            f.insert("not_usable".into(), format!("{:02x}", d.not_usable));
            f.insert("avl_packet_id".into(), format!("{:02x}", d.avl_packet_id));
            f.insert("imei".into(), d.imei.to_string());
            avl_facts(&d.avl, &mut f);
            let ack = encode_ack(d.packet_id, d.avl_packet_id, d.avl.count());
            f.insert("ack".into(), hex::encode(ack));
        }
        ("tcp", "bad") => {
            let err = decode_frame(b, DEFAULT_MAX_FRAME_LEN).unwrap_err();
            let DecodeError::Crc { sent, computed } = err else {
                panic!("{}: {err}", row.id)
            };
            f.insert("crc".into(), format!("{sent:04x}"));
            f.insert("crc_calc".into(), format!("{computed:04x}"));
            f.insert("crc_ok".into(), "0".into());
            // What it would be without the CRC check.
            let data = &b[8..b.len() - 4];
            let c = CommandFrame::parse(data).unwrap();
            f.insert(
                "would_be".into(),
                if c.kind == 0x05 {
                    "cmd_request"
                } else {
                    "cmd_response"
                }
                .into(),
            );
            command_facts(&c, &mut f);
        }
        ("tcp", _) => {
            let Ok(Status::Complete((frame, used))) = decode_frame(b, DEFAULT_MAX_FRAME_LEN) else {
                panic!("{}: did not decode", row.id)
            };
            assert_eq!(used, b.len(), "{}: whole frame used", row.id);
            if b.len() > 12 && b[..4] == [0, 0, 0, 0] {
                let data_len = u32::from_be_bytes(b[4..8].try_into().unwrap());
                f.insert("data_len".into(), data_len.to_string());
                f.insert("crc".into(), hex::encode(&b[b.len() - 2..]));
                let ok = crc16_ibm(&b[8..b.len() - 4])
                    == u16::from_be_bytes([b[b.len() - 2], b[b.len() - 1]]);
                f.insert("crc_ok".into(), (ok as u8).to_string());
            }
            match frame {
                Frame::Login(imei) => {
                    f.insert("imei".into(), imei.to_string());
                    f.insert(
                        "imei_len".into(),
                        u16::from_be_bytes([b[0], b[1]]).to_string(),
                    );
                    f.insert(
                        "reply_accept".into(),
                        hex::encode([super::imei::LOGIN_ACCEPT]),
                    );
                    f.insert(
                        "reply_reject".into(),
                        hex::encode([super::imei::LOGIN_REJECT]),
                    );
                }
                Frame::Avl(avl) => {
                    avl_facts(&avl, &mut f);
                    f.insert(
                        "ack".into(),
                        hex::encode(encode_record_ack(avl.count() as u32)),
                    );
                }
                Frame::Command(c) => command_facts(&c, &mut f),
                Frame::Ping => panic!("{}: not a ping", row.id),
            }
        }
        other => panic!("{}: unknown row kind {other:?}", row.id),
    }
    f
}

#[test]
fn every_wiki_example_decodes_to_its_facts() {
    let rows = rows();
    assert!(rows.len() >= 19, "the fixture lost rows: {}", rows.len());
    for row in &rows {
        let got = facts(row);
        for (k, want) in &row.facts {
            let have = got
                .get(k)
                .unwrap_or_else(|| panic!("{}: no fact {k:?} computed", row.id));
            // Degrees print as "0" for the zero positions of the examples.
            let same = have == want
                || (have.parse::<f64>().ok().zip(want.parse::<f64>().ok()))
                    .is_some_and(|(a, b)| a == b);
            assert!(same, "{}: {k} is {have:?}, expected {want:?}", row.id);
        }
    }
}

#[test]
fn every_split_of_every_tcp_example_gives_the_same_items() {
    for row in rows()
        .iter()
        .filter(|r| r.transport == "tcp" && !matches!(r.kind.as_str(), "server_ack"))
    {
        let whole = super::tcp::tests_support::frame_all(&row.bytes);
        for split in 0..=row.bytes.len() {
            let got = super::tcp::tests_support::frame_split(&row.bytes, split);
            assert_eq!(got, whole, "{}: split at {split}", row.id);
        }
        // One byte at a time.
        assert_eq!(
            super::tcp::tests_support::frame_bytewise(&row.bytes),
            whole,
            "{}: byte-wise",
            row.id
        );
    }
}

#[test]
fn login_with_wrong_digits_is_refused() {
    assert_eq!(
        decode_frame(b"\x00\x0f35630704244101x", 1024).unwrap_err(),
        DecodeError::InvalidImei
    );
    assert_eq!(
        decode_frame(b"\x00\x0e35630704244101", 1024).unwrap_err(),
        DecodeError::InvalidImei
    );
    assert_eq!(
        decode_frame(b"\x01\x00", 1024).unwrap_err(),
        DecodeError::LoginLength(256)
    );
    assert_eq!(
        Imei::from_ascii(b"356307042441013").unwrap().to_string(),
        "356307042441013"
    );
}

//! `fleetgate decode`: hex frames in, one JSON object per frame out. Runs on the main thread.
//!
//! An operator tool: paste the hex of what a device sent (from a capture, a log line, the
//! documentation) and see what the gateway's codec makes of it, including the exact bytes the
//! server must answer.
//!
//! Each input is one hex string (whitespace anywhere is ignored). Over TCP one input may hold
//! several stream items (a `0xFF` ping glued to a login or a frame, two frames in one read): one
//! JSON object is printed per item, in stream order, each with its byte `offset` in the input and
//! its length `len`. With `--udp` each input is one datagram.
//!
//! Every object has `kind`: `login`, `ping`, `avl`, `command` or `error`, and `ack`: the hex of
//! the server's answer, or `null` when none is due (pings, command frames, errors). Identifiers
//! that the protocol documentation writes in hex stay hex strings: `codec` (`"8e"`), a command's
//! `type` (`"05"`), `crc`, and UDP's `packet_id` and `avl_packet_id`. Errors carry `error` (the
//! message) and `error_kind` (a short stable name: a [`DecodeError::kind`], or `hex` for input
//! that is not hex, or `incomplete` for a frame that needs more bytes).

use std::io::{BufRead, Write};
use std::process::ExitCode;

use serde_json::{json, Map, Value};

use crate::protocol::command::CommandFrame;
use crate::protocol::tcp::{HEADER_LEN, TRAILER_LEN};
use crate::protocol::{
    decode_datagram, decode_frame, encode_record_ack, udp, AvlData, AvlRecord, DecodeError, Frame,
    IoValue, Status,
};
use crate::time::utc_text;

/// Arguments of `fleetgate decode`.
#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    /// Decode as UDP datagrams
    #[arg(long)]
    pub udp: bool,
    /// Hex frames; none: one per line of standard input
    pub hex: Vec<String>,
    /// Largest data length accepted
    #[arg(long, default_value_t = crate::protocol::DEFAULT_MAX_FRAME_LEN)]
    pub max_frame_len: u32,
}

/// Decodes every input (the arguments, or else each non-blank line of standard input that does
/// not start with `#`) and prints one JSON object per item per line.
///
/// Exit status 1 when any item was an error (or standard input could not be read), 0 otherwise.
pub fn run(args: &DecodeArgs) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut bad = false;
    let emit = |input: &str, out: &mut dyn Write| -> std::io::Result<bool> {
        let mut any_error = false;
        for v in describe(input, args.udp, args.max_frame_len) {
            any_error |= v["kind"] == "error";
            writeln!(out, "{v}")?;
        }
        Ok(any_error)
    };
    let result = if args.hex.is_empty() {
        let mut r = Ok(());
        for line in std::io::stdin().lock().lines() {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("fleetgate decode: reading standard input: {e}");
                    bad = true;
                    break;
                }
            };
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            // Flushed per line, so that a pipe shows each answer as its line arrives.
            r = emit(t, &mut out).and_then(|e| {
                bad |= e;
                out.flush()
            });
            if r.is_err() {
                break;
            }
        }
        r
    } else {
        args.hex.iter().try_for_each(|h| {
            bad |= emit(h, &mut out)?;
            Ok(())
        })
    };
    let result = result.and_then(|()| out.flush());
    match result {
        // A closed pipe (`| head`) is the reader's choice, not a failure of the decode.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("fleetgate decode: writing standard output: {e}");
            ExitCode::FAILURE
        }
        _ if bad => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// Pure: one input hex string -> one JSON object per item it holds (see the module docs).
///
/// Over TCP the items are decoded in stream order until the bytes run out; a bad item or an
/// incomplete one ends the list with an `error` object (a real connection would be closed, or
/// would wait for more bytes). Bad hex gives a single `error` object.
pub fn describe(hex: &str, udp: bool, max_frame_len: u32) -> Vec<Value> {
    let clean: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
    let transport = if udp { "udp" } else { "tcp" };
    let bytes = match hex::decode(&clean) {
        Ok(b) => b,
        Err(e) => return vec![error_obj(transport, 0, format!("bad hex: {e}"), "hex")],
    };
    if udp {
        return vec![describe_datagram(&bytes)];
    }
    let mut items = Vec::new();
    let mut at = 0;
    loop {
        match decode_frame(&bytes[at..], max_frame_len) {
            Ok(Status::Complete((frame, used))) => {
                items.push(describe_frame(&frame, &bytes[at..at + used], at));
                at += used;
                if at == bytes.len() {
                    break;
                }
            }
            Ok(Status::Partial(n)) => {
                items.push(error_obj(
                    transport,
                    at,
                    format!("incomplete: {n} more bytes needed"),
                    "incomplete",
                ));
                break;
            }
            Err(e) => {
                items.push(decode_error(transport, at, &e));
                break;
            }
        }
    }
    items
}

fn error_obj(transport: &str, offset: usize, error: String, kind: &str) -> Value {
    json!({
        "kind": "error",
        "transport": transport,
        "offset": offset,
        "error": error,
        "error_kind": kind,
        "ack": null,
    })
}

fn decode_error(transport: &str, offset: usize, e: &DecodeError) -> Value {
    let mut v = error_obj(transport, offset, e.to_string(), e.kind());
    if let DecodeError::Crc { sent, computed } = *e {
        v["crc"] = json!(format!("{sent:04x}"));
        v["crc_computed"] = json!(format!("{computed:04x}"));
    }
    v
}

/// One TCP stream item; `raw` is exactly its bytes.
fn describe_frame(frame: &Frame<'_>, raw: &[u8], offset: usize) -> Value {
    let kind = match frame {
        Frame::Ping => "ping",
        Frame::Login(_) => "login",
        Frame::Avl(_) => "avl",
        Frame::Command(_) => "command",
    };
    let mut m = Map::new();
    m.insert("kind".into(), json!(kind));
    m.insert("transport".into(), json!("tcp"));
    m.insert("offset".into(), json!(offset));
    m.insert("len".into(), json!(raw.len()));
    match frame {
        Frame::Ping => {
            m.insert("ack".into(), Value::Null);
        }
        Frame::Login(imei) => {
            m.insert("imei".into(), json!(imei.to_string()));
            m.insert(
                "ack".into(),
                json!(hex::encode([crate::protocol::imei::LOGIN_ACCEPT])),
            );
        }
        Frame::Avl(avl) => {
            frame_fields(raw, &mut m);
            avl_fields(avl, &mut m);
            let ack = encode_record_ack(u32::from(avl.count()));
            m.insert("ack".into(), json!(hex::encode(ack)));
        }
        Frame::Command(c) => {
            frame_fields(raw, &mut m);
            command_fields(c, &mut m);
            m.insert("ack".into(), Value::Null);
        }
    }
    Value::Object(m)
}

/// `data_len` and `crc` of a framed (preamble, length, data, CRC) item.
fn frame_fields(raw: &[u8], m: &mut Map<String, Value>) {
    let data_len = raw.len() - HEADER_LEN - TRAILER_LEN;
    m.insert("data_len".into(), json!(data_len));
    m.insert("crc".into(), json!(hex::encode(&raw[raw.len() - 2..])));
}

fn describe_datagram(bytes: &[u8]) -> Value {
    let d = match decode_datagram(bytes) {
        Ok(d) => d,
        Err(e) => return decode_error("udp", 0, &e),
    };
    let mut m = Map::new();
    m.insert("kind".into(), json!("avl"));
    m.insert("transport".into(), json!("udp"));
    m.insert("offset".into(), json!(0));
    m.insert("len".into(), json!(bytes.len()));
    m.insert("packet_id".into(), json!(format!("{:04x}", d.packet_id)));
    m.insert(
        "avl_packet_id".into(),
        json!(format!("{:02x}", d.avl_packet_id)),
    );
    m.insert("imei".into(), json!(d.imei.to_string()));
    avl_fields(&d.avl, &mut m);
    let ack = udp::encode_ack(d.packet_id, d.avl_packet_id, d.avl.count());
    m.insert("ack".into(), json!(hex::encode(ack)));
    Value::Object(m)
}

fn avl_fields(avl: &AvlData<'_>, m: &mut Map<String, Value>) {
    m.insert("codec".into(), json!(format!("{:02x}", avl.codec().id())));
    m.insert("record_count".into(), json!(avl.count()));
    let records: Vec<Value> = avl.records().map(|r| record(&r)).collect();
    m.insert("records".into(), Value::Array(records));
}

fn record(r: &AvlRecord<'_>) -> Value {
    let io: Vec<Value> = r
        .io()
        .map(|e| match e.value {
            IoValue::Nx(b) => json!({ "id": e.id, "hex": hex::encode(b) }),
            v => json!({ "id": e.id, "value": v.as_u64() }),
        })
        .collect();
    let mut m = Map::new();
    m.insert("ts_ms".into(), json!(r.ts_ms()));
    if let Some(t) = utc_text(r.ts_ms()) {
        m.insert("time".into(), json!(t));
    }
    m.insert("priority".into(), json!(r.priority()));
    m.insert("lat".into(), json!(r.lat()));
    m.insert("lon".into(), json!(r.lon()));
    m.insert("alt".into(), json!(r.alt()));
    m.insert("angle".into(), json!(r.angle()));
    m.insert("sats".into(), json!(r.sats()));
    m.insert("speed".into(), json!(r.speed()));
    m.insert("event_io".into(), json!(r.event_io()));
    if let Some(g) = r.gen_type() {
        m.insert("gen_type".into(), json!(g));
    }
    m.insert("io_total".into(), json!(r.io_total()));
    m.insert("io".into(), Value::Array(io));
    Value::Object(m)
}

fn command_fields(c: &CommandFrame<'_>, m: &mut Map<String, Value>) {
    m.insert("codec".into(), json!(format!("{:02x}", c.codec.id())));
    m.insert("quantity".into(), json!(c.quantity));
    m.insert("type".into(), json!(format!("{:02x}", c.kind)));
    m.insert("size".into(), json!(c.body.len()));
    if let Some(field) = c.imei_field {
        m.insert("imei_field".into(), json!(hex::encode(field)));
    }
    if let Some(imei) = c.imei() {
        m.insert("imei".into(), json!(imei.to_string()));
    }
    if let Some(ts) = c.ts_ms {
        m.insert("ts_ms".into(), json!(ts));
        if let Some(t) = utc_text(ts) {
            m.insert("time".into(), json!(t));
        }
    }
    match c.text() {
        Some(t) => m.insert("text".into(), json!(t)),
        None => m.insert("hex".into(), json!(hex::encode(c.payload))),
    };
}

#[cfg(test)]
#[path = "../../tests/fixtures/wiki.rs"]
mod wiki;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DEFAULT_MAX_FRAME_LEN;

    use super::wiki::{self, rows};

    fn hex_of(id: &str) -> String {
        wiki::row(id).hex
    }

    fn fact<'f>(facts: &'f [(String, String)], k: &str) -> Option<&'f str> {
        facts.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn io_text(r: &Value) -> String {
        r["io"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| match e.get("value") {
                Some(v) => format!("{}:{}", e["id"], v),
                None => format!("{}:{}", e["id"], e["hex"].as_str().unwrap()),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn one(hex: &str, udp: bool) -> Value {
        let mut v = describe(hex, udp, DEFAULT_MAX_FRAME_LEN);
        assert_eq!(v.len(), 1, "{v:?}");
        v.pop().unwrap()
    }

    #[test]
    fn every_wiki_avl_example() {
        let mut seen = 0;
        for row in rows().iter().filter(|r| r.kind == "avl") {
            seen += 1;
            let (id, facts) = (&row.id, &row.facts[..]);
            let v = one(&row.hex, row.transport == "udp");
            assert_eq!(v["kind"], "avl", "{id}");
            assert_eq!(v["transport"], row.transport, "{id}");
            assert_eq!(v["codec"], row.codec, "{id}");
            assert_eq!(v["ack"], fact(facts, "ack").unwrap(), "{id}");
            let n: u64 = fact(facts, "records").unwrap().parse().unwrap();
            assert_eq!(v["record_count"], n, "{id}");
            let recs = v["records"].as_array().unwrap();
            assert_eq!(recs.len() as u64, n, "{id}");
            if row.transport == "tcp" {
                assert_eq!(v["data_len"].to_string(), fact(facts, "data_len").unwrap());
                assert_eq!(v["crc"], fact(facts, "crc").unwrap(), "{id}");
            } else {
                assert_eq!(v["imei"], fact(facts, "imei").unwrap(), "{id}");
                assert_eq!(v["packet_id"], fact(facts, "packet_id").unwrap());
                assert_eq!(v["avl_packet_id"], fact(facts, "avl_packet_id").unwrap());
            }
            for (i, r) in recs.iter().enumerate() {
                for key in [
                    "ts_ms", "priority", "alt", "angle", "sats", "speed", "event_io", "gen_type",
                    "io_total",
                ] {
                    if let Some(want) = fact(facts, &format!("r{i}.{key}")) {
                        assert_eq!(r[key].to_string(), want, "{id} r{i}.{key}");
                    }
                }
                for key in ["lat", "lon"] {
                    let want: f64 = fact(facts, &format!("r{i}.{key}"))
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert_eq!(r[key].as_f64(), Some(want), "{id} r{i}.{key}");
                }
                let want_io = fact(facts, &format!("r{i}.io")).unwrap();
                assert_eq!(io_text(r), want_io, "{id} r{i}.io");
                assert_eq!(r.get("gen_type").is_some(), row.codec == "10", "{id}");
            }
        }
        assert_eq!(seen, 8, "the fixture's AVL rows");
    }

    #[test]
    fn every_wiki_command_example() {
        let mut seen = 0;
        for row in rows().iter().filter(|r| {
            r.transport == "tcp" && matches!(r.kind.as_str(), "cmd_request" | "cmd_response")
        }) {
            seen += 1;
            let (id, facts) = (&row.id, &row.facts[..]);
            let v = one(&row.hex, false);
            assert_eq!(v["kind"], "command", "{id}");
            assert_eq!(v["codec"], row.codec, "{id}");
            assert_eq!(v["ack"], Value::Null, "{id}");
            assert_eq!(v["type"], fact(facts, "type").unwrap(), "{id}");
            assert_eq!(v["text"], fact(facts, "text").unwrap(), "{id}");
            assert_eq!(v["crc"], fact(facts, "crc").unwrap(), "{id}");
            assert_eq!(v["size"].to_string(), fact(facts, "size").unwrap());
            if let Some(imei) = fact(facts, "imei") {
                assert_eq!(v["imei"], imei, "{id}");
            }
        }
        assert_eq!(seen, 6);
    }

    #[test]
    fn login_example() {
        let v = one(&hex_of("wk_imei"), false);
        assert_eq!(v["kind"], "login");
        assert_eq!(v["imei"], "356307042441013");
        assert_eq!(v["ack"], "01");
    }

    #[test]
    fn device_messages_codec_13_and_15() {
        let v = one(&hex_of("wk_c15_hello"), false);
        assert_eq!((&v["kind"], &v["codec"]), (&json!("command"), &json!("0f")));
        assert_eq!(v["type"], "0b");
        assert_eq!(v["text"], "Hello!\n");
        assert_eq!(v["imei_field"], "0123456789123456");
        assert_eq!(v["ts_ms"], 1_699_440_036_000u64);
        assert_eq!(v["time"], "2023-11-08T10:40:36.000Z");
        let v = one(&hex_of("wk_c13_getinfo"), false);
        assert_eq!((&v["codec"], &v["text"]), (&json!("0d"), &json!("getinfo")));
        assert_eq!(v["ack"], Value::Null);
    }

    #[test]
    fn login_and_pings_glued_to_a_frame() {
        let login = hex_of("wk_imei");
        let c8 = hex_of("wk_c8_ex1");
        let v = describe(
            &format!("ff {login} ff {c8} {c8}"),
            false,
            DEFAULT_MAX_FRAME_LEN,
        );
        let kinds: Vec<&str> = v.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["ping", "login", "ping", "avl", "avl"]);
        assert_eq!(v[0]["ack"], Value::Null);
        assert_eq!(v[1]["imei"], "356307042441013");
        assert_eq!(v[1]["ack"], "01");
        assert_eq!(v[1]["offset"], 1);
        assert_eq!(v[3]["offset"], 1 + 17 + 1);
        assert_eq!(v[3]["ack"], "00000001");
        assert_eq!(v[4]["records"][0]["time"], "2019-06-10T10:04:46.000Z");
    }

    #[test]
    fn bad_crc_row_is_an_error() {
        let rows = rows();
        let bad: Vec<_> = rows.iter().filter(|r| r.kind == "bad").collect();
        assert!(!bad.is_empty());
        for row in bad {
            let (id, facts) = (&row.id, &row.facts[..]);
            let v = one(&row.hex, false);
            assert_eq!(v["kind"], "error", "{id}");
            assert_eq!(v["error_kind"], "crc", "{id}");
            assert_eq!(v["ack"], Value::Null, "{id}");
            assert_eq!(v["crc"], fact(facts, "crc").unwrap(), "{id}");
            assert_eq!(v["crc_computed"], fact(facts, "crc_calc").unwrap(), "{id}");
            assert_eq!(
                v["error"],
                "CRC mismatch: frame says 0x32ac, data gives 0x635e"
            );
        }
    }

    #[test]
    fn incomplete_and_bad_hex_and_garbage_after_a_frame() {
        let c8 = hex_of("wk_c8_ex1");
        let v = one(&c8[..20], false);
        assert_eq!(v["error_kind"], "incomplete");
        assert_eq!(
            v["error"],
            format!("incomplete: {} more bytes needed", (c8.len() - 20) / 2)
        );
        let v = one("abc", false);
        assert_eq!(
            (&v["kind"], &v["error_kind"]),
            (&json!("error"), &json!("hex"))
        );
        let v = one("zz", true);
        assert_eq!(
            (&v["kind"], &v["transport"]),
            (&json!("error"), &json!("udp"))
        );
        // A frame, then bytes that are not a frame: the frame, then an error at its end.
        let v = describe(&format!("{c8}00000100"), false, DEFAULT_MAX_FRAME_LEN);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0]["kind"], "avl");
        assert_eq!(v[1]["error_kind"], "bad_preamble");
        assert_eq!(v[1]["offset"], c8.len() / 2);
        // The limit on the declared length.
        let v = describe(&c8, false, 16);
        assert_eq!(v[0]["error_kind"], "frame_too_large");
        // A TCP frame is not a datagram.
        assert_eq!(one(&c8, true)["kind"], "error");
    }

    #[test]
    fn nx_values_and_non_text_payloads() {
        use crate::protocol::{tcp, Codec, OwnedIoValue, Record};
        let r = Record {
            ts_ms: 0,
            priority: 0,
            lon: 250_000_000,
            lat: -123_456_789,
            alt: -5,
            angle: 359,
            sats: 7,
            speed: 90,
            event_io: 300,
            gen_type: None,
            io: vec![
                (1, OwnedIoValue::U8(1)),
                (256, OwnedIoValue::Nx(vec![0xde, 0xad])),
                (2, OwnedIoValue::U64(u64::MAX)),
            ],
        };
        let mut f = Vec::new();
        tcp::encode_avl_frame(Codec::C8E, &[r], &mut f).unwrap();
        let v = one(&hex::encode(&f), false);
        let r0 = &v["records"][0];
        assert_eq!(r0["lat"].as_f64(), Some(-12.3456789));
        assert_eq!(r0["lon"].as_f64(), Some(25.0));
        assert_eq!(r0["alt"], -5);
        assert_eq!(r0["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(
            r0["io"],
            json!([
                {"id": 1, "value": 1},
                {"id": 2, "value": u64::MAX},
                {"id": 256, "hex": "dead"},
            ])
        );
        let mut f = Vec::new();
        tcp::encode_command_frame(Codec::C12, 0x0d, None, &[0, 1, 0xff], &mut f);
        let v = one(&hex::encode(&f), false);
        assert_eq!((&v["type"], &v["hex"]), (&json!("0d"), &json!("0001ff")));
        assert!(v.get("text").is_none());
    }
}

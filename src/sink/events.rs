//! The writer's events (see `control::events`): the outbox rows of session events and of
//! telemetry, inserted by the writer threads in the transactions of what they report.
//! [`TelemetryEvent::from_avl`] is PURE and runs on the shard that decoded the frame; the JSON
//! is made here, on the writer, off the shards' hot path.

use std::collections::HashMap;

use serde_json::{json, Map, Value};
use tokio_postgres::Client;

use super::writer::{SessionEvent, WriterBatch};
use crate::control::events::topic::{device_topic, DeviceEvent};
use crate::protocol::{AvlData, Imei, IoValue};

/// An IO value in a telemetry event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TelemetryIo {
    /// A fixed-width value (1, 2, 4 or 8 bytes).
    Num(u64),
    /// A Codec 8E variable-length value, sent as hex.
    Nx(Box<[u8]>),
}

/// A summary of one AVL frame for the `devices/{imei}/telemetry` event: how many records,
/// and the last record's fix and IO values. Built on the shard when the device wants
/// telemetry events, carried to the writer in its [`WriterBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryEvent {
    pub imei: u64,
    /// Records in the frame (summed over a device's frames in one transaction).
    pub records: u32,
    /// The last record's device time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Degrees x 10^7.
    pub lat_e7: i32,
    pub lon_e7: i32,
    pub alt: i16,
    pub angle: u16,
    pub sats: u8,
    pub speed: u16,
    /// The last record's IO elements, in wire order.
    pub io: Vec<(u16, TelemetryIo)>,
}

impl TelemetryEvent {
    /// The summary of `avl`: its record count and its last record. A frame without records
    /// gives `records: 0` and zeros, which the writer does not publish.
    pub fn from_avl(imei: Imei, avl: &AvlData<'_>) -> TelemetryEvent {
        let mut ev = TelemetryEvent {
            imei: imei.as_u64(),
            records: avl.count() as u32,
            ts_ms: 0,
            lat_e7: 0,
            lon_e7: 0,
            alt: 0,
            angle: 0,
            sats: 0,
            speed: 0,
            io: Vec::new(),
        };
        if let Some(r) = avl.records().last() {
            ev.ts_ms = r.ts_ms();
            ev.lat_e7 = r.lat_e7();
            ev.lon_e7 = r.lon_e7();
            ev.alt = r.alt();
            ev.angle = r.angle();
            ev.sats = r.sats();
            ev.speed = r.speed();
            ev.io.reserve(r.io_total() as usize);
            r.for_each_io(|e| {
                let v = match e.value {
                    IoValue::Nx(b) => TelemetryIo::Nx(b.into()),
                    v => TelemetryIo::Num(v.as_u64().unwrap_or(0)),
                };
                ev.io.push((e.id, v));
            });
        }
        ev
    }

    /// The event's `data`: `{"imei","records","time","lat","lon","alt","angle","sats",
    /// "speed","io"}`, `io` as `{"id": value}` (NX values as hex strings).
    pub fn to_json(&self) -> Value {
        let mut io = Map::with_capacity(self.io.len());
        for (id, v) in &self.io {
            let v = match v {
                TelemetryIo::Num(n) => Value::from(*n),
                TelemetryIo::Nx(b) => Value::from(hex::encode(b)),
            };
            io.insert(id.to_string(), v);
        }
        json!({
            "imei": format!("{:015}", self.imei),
            "records": self.records,
            "time": crate::time::utc_text(self.ts_ms),
            "lat": self.lat_e7 as f64 / 1e7,
            "lon": self.lon_e7 as f64 / 1e7,
            "alt": self.alt,
            "angle": self.angle,
            "sats": self.sats,
            "speed": self.speed,
            "io": io,
        })
    }
}

/// One telemetry event per device of `batches`: the latest summary (the last in batch
/// order, which is frame order) with the records of all of them. As (topic, imei, data).
pub(crate) fn telemetry_rows(
    batches: &[WriterBatch],
) -> Option<(Vec<String>, Vec<i64>, Vec<String>)> {
    // device -> (index of its latest summary, records summed); in order of first appearance.
    let mut latest: HashMap<u64, (usize, u32)> = HashMap::new();
    let mut order = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let Some(t) = b.telemetry.as_deref() else {
            continue;
        };
        if t.records == 0 {
            continue;
        }
        match latest.get_mut(&t.imei) {
            Some((at, n)) => {
                *at = i;
                *n = n.saturating_add(t.records);
            }
            None => {
                latest.insert(t.imei, (i, t.records));
                order.push(t.imei);
            }
        }
    }
    if order.is_empty() {
        return None;
    }
    let mut topics = Vec::with_capacity(order.len());
    let mut imeis = Vec::with_capacity(order.len());
    let mut data = Vec::with_capacity(order.len());
    for imei in order {
        let (at, records) = latest[&imei];
        let t = batches[at].telemetry.as_deref().expect("indexed a summary");
        let mut json = t.to_json();
        json["records"] = Value::from(records);
        topics.push(device_topic(imei, DeviceEvent::Telemetry));
        imeis.push(imei as i64);
        data.push(json.to_string());
    }
    Some((topics, imeis, data))
}

/// Inserts telemetry events (from [`telemetry_rows`]) in the caller's open transaction.
pub(crate) async fn insert_telemetry_events(
    client: &Client,
    rows: &(Vec<String>, Vec<i64>, Vec<String>),
) -> Result<u64, tokio_postgres::Error> {
    let (topics, imeis, data) = rows;
    client
        .execute(
            "INSERT INTO events (topic, imei, data)
             SELECT t, i, d::json FROM unnest($1::text[], $2::int8[], $3::text[]) AS u(t, i, d)",
            &[topics, imeis, data],
        )
        .await
}

/// The topic of a session event: `connect` -> `devices/{imei}/connected`, `disconnect` ->
/// `…/disconnected`, `login_refused` -> `…/login_refused`.
fn session_topic(ev: &SessionEvent) -> String {
    let kind = match ev.event {
        "connect" => DeviceEvent::Connected,
        "disconnect" => DeviceEvent::Disconnected,
        "login_refused" => DeviceEvent::LoginRefused,
        // Anything else is refused by device_sessions' CHECK, and the event dropped alone.
        other => return format!("devices/{:015}/{other}", ev.imei),
    };
    device_topic(ev.imei, kind)
}

/// The `data` of a session event: `imei`, (`reason` for a disconnect or a refusal),
/// `remote_addr`, `transport`, `shard`.
fn session_data(ev: &SessionEvent) -> String {
    let mut m = Map::new();
    m.insert("imei".into(), Value::from(format!("{:015}", ev.imei)));
    if ev.event != "connect" {
        m.insert("reason".into(), Value::from(ev.reason.clone()));
    }
    m.insert("remote_addr".into(), Value::from(ev.peer.clone()));
    m.insert("transport".into(), Value::from(ev.transport));
    m.insert("shard".into(), Value::from(ev.shard));
    Value::Object(m).to_string()
}

/// One statement (its own implicit transaction): `s` into `device_sessions` (but
/// `login_refused`, which is only an event) and every one of them into the outbox. Returns
/// the events inserted.
pub(crate) async fn insert_sessions(
    client: &Client,
    s: &[SessionEvent],
) -> Result<u64, tokio_postgres::Error> {
    let imei: Vec<i64> = s.iter().map(|e| e.imei as i64).collect();
    let event: Vec<&str> = s.iter().map(|e| e.event).collect();
    let at: Vec<std::time::SystemTime> = s.iter().map(|e| e.at).collect();
    let shard: Vec<i32> = s.iter().map(|e| e.shard as i32).collect();
    let transport: Vec<&str> = s.iter().map(|e| e.transport).collect();
    let peer: Vec<Option<&str>> = s.iter().map(|e| e.peer.as_deref()).collect();
    let reason: Vec<Option<&str>> = s.iter().map(|e| e.reason.as_deref()).collect();
    let topic: Vec<String> = s.iter().map(session_topic).collect();
    let data: Vec<String> = s.iter().map(session_data).collect();
    client
        .execute(
            "WITH s AS (
               SELECT * FROM unnest($1::int8[], $2::text[], $3::timestamptz[], $4::int4[],
                                    $5::text[], $6::text[], $7::text[], $8::text[], $9::text[])
                 WITH ORDINALITY AS s(imei, event, at, shard, transport, peer, reason, topic, data, n)
             ), sessions AS (
               INSERT INTO device_sessions (imei, event, at, shard, transport, peer, reason)
               SELECT imei, event, at, shard, transport, peer, reason FROM s
                WHERE event <> 'login_refused' ORDER BY n
             )
             INSERT INTO events (topic, imei, at, data)
             SELECT topic, imei, at, data::json FROM s ORDER BY n",
            &[
                &imei, &event, &at, &shard, &transport, &peer, &reason, &topic, &data,
            ],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::avl::encode_avl_data;
    use crate::protocol::{Codec, OwnedIoValue, Record};

    fn record(ts_ms: u64, io: Vec<(u16, OwnedIoValue)>) -> Record {
        Record {
            ts_ms,
            priority: 1,
            lon: 252_797_000,
            lat: 546_872_000,
            alt: 112,
            angle: 90,
            sats: 12,
            speed: 50,
            event_io: 0,
            gen_type: None,
            io,
        }
    }

    #[test]
    fn a_frame_is_summarised_by_its_last_record() {
        let recs = vec![
            record(1_700_000_000_000, vec![(1, OwnedIoValue::U8(0))]),
            record(
                1_700_000_001_000,
                vec![
                    (239, OwnedIoValue::U8(1)),
                    (66, OwnedIoValue::U16(12_345)),
                    (16, OwnedIoValue::U64(u64::MAX)),
                    (10_348, OwnedIoValue::Nx(vec![0x01, 0xab])),
                ],
            ),
        ];
        let mut data = Vec::new();
        encode_avl_data(Codec::C8E, &recs, &mut data).unwrap();
        let avl = AvlData::parse(&data).unwrap();
        let imei = Imei::new(356_307_042_441_013).unwrap();
        let ev = TelemetryEvent::from_avl(imei, &avl);
        assert_eq!(ev.records, 2);
        assert_eq!(ev.ts_ms, 1_700_000_001_000);
        assert_eq!(
            ev.to_json().to_string(),
            r#"{"imei":"356307042441013","records":2,"time":"2023-11-14T22:13:21.000Z","lat":54.6872,"lon":25.2797,"alt":112,"angle":90,"sats":12,"speed":50,"io":{"239":1,"66":12345,"16":18446744073709551615,"10348":"01ab"}}"#
        );
    }

    #[test]
    fn session_events_say_what_happened() {
        let mut ev = SessionEvent {
            imei: 42,
            event: "connect",
            at: std::time::SystemTime::now(),
            shard: 1,
            transport: "tcp",
            peer: Some("10.0.0.1:5000".into()),
            reason: None,
        };
        assert_eq!(session_topic(&ev), "devices/000000000000042/connected");
        assert_eq!(
            session_data(&ev),
            r#"{"imei":"000000000000042","remote_addr":"10.0.0.1:5000","transport":"tcp","shard":1}"#
        );
        ev.event = "disconnect";
        ev.reason = Some("idle timeout".into());
        assert_eq!(session_topic(&ev), "devices/000000000000042/disconnected");
        assert_eq!(
            session_data(&ev),
            r#"{"imei":"000000000000042","reason":"idle timeout","remote_addr":"10.0.0.1:5000","transport":"tcp","shard":1}"#
        );
        ev.event = "login_refused";
        assert_eq!(session_topic(&ev), "devices/000000000000042/login_refused");
    }
}

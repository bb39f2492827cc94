//! What the API reads and writes, and the OpenAPI document generated from it (`utoipa`). PURE
//! (no IO): request validation lives here too, with its unit tests.
//!
//! The request and response types below are the ones the handlers (de)serialize, so the
//! document describes exactly what travels. Two types come from files owned elsewhere and
//! carry no schema: [`DeviceInfo`] (the shards') and [`CommandView`] (the ledger's). They are
//! described by mirrors in [`mirror`], and a test serializes real values of both and checks
//! every field against the mirrored schema, both ways (no field missing from the document,
//! none documented that is not sent, each of the documented type), so the two cannot drift.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::control::commands::{self, CommandView, NewCommand, Payload};
use crate::protocol::{Codec, Imei};
use crate::shard::devices::DeviceInfo;

/// Largest page of `GET /api/v1/devices` and `GET /api/v1/devices/{imei}/commands`.
pub const MAX_PAGE: usize = 1000;
/// The page size when none is asked for.
pub const DEFAULT_PAGE: usize = 100;

/// Every error answer: what is wrong.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

// ===== devices =====

/// `GET /api/v1/devices` query.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DevicesQuery {
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// The last IMEI of the previous page (its `next_cursor`).
    pub cursor: Option<String>,
    /// Only IMEIs starting with these digits (1 to 15 digits).
    pub prefix: Option<String>,
}

/// One page of connected devices, in IMEI order.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DevicePage {
    #[schema(value_type = Vec<mirror::DeviceInfo>)]
    pub devices: Vec<DeviceInfo>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The last connect or disconnect of a device, from `device_sessions`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LastSession {
    /// When (RFC 3339, UTC).
    pub at: Option<String>,
    /// `connect` or `disconnect`.
    pub event: String,
    /// Why the session ended (`closed by peer`, `idle timeout`, ...), for a disconnect.
    pub reason: Option<String>,
    /// The device's address.
    pub peer: Option<String>,
    pub shard: i32,
    pub transport: String,
}

/// `GET /api/v1/devices/{imei}` of a device that is not connected.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DeviceNotConnected {
    pub error: String,
    /// Its last recorded session event; null when it never connected.
    pub last_session: Option<LastSession>,
}

/// `GET /api/v1/devices/{imei}/commands` query.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeviceCommandsQuery {
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// Only commands with a smaller id (the previous page's `next_before`).
    pub before: Option<i64>,
}

/// A device's commands, newest first.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CommandPage {
    #[schema(value_type = Vec<mirror::CommandView>)]
    pub commands: Vec<CommandView>,
    /// Pass as `before` for the next page; null on the last page.
    pub next_before: Option<i64>,
}

// ===== commands =====

/// `POST /api/v1/commands`: exactly one of `command` (text) and `hex` (bytes).
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostCommand {
    /// The device's IMEI: 15 digits, as a string.
    #[schema(example = "356307042441013")]
    pub imei: String,
    /// A text command, e.g. `setdigout 1`.
    #[schema(example = "setdigout 1")]
    pub command: Option<String>,
    /// A binary payload, as hex.
    pub hex: Option<String>,
    /// Any JSON object; returned untouched with the command (default `{}`).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Seconds the command may wait for the device (default: until sent).
    pub ttl_s: Option<u64>,
    /// Higher is sent first (default 0).
    pub priority: Option<i32>,
    /// 12 (default) or 14 (the device checks the IMEI in the frame).
    pub codec: Option<u8>,
}

/// `POST /api/v1/commands` answer.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub id: i64,
    /// `queued` (or already `sent`).
    pub state: String,
}

/// `DELETE /api/v1/commands/{id}` of a command past the queue.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CancelConflict {
    pub error: String,
    #[schema(value_type = mirror::CommandView)]
    pub command: CommandView,
}

/// A 15-digit IMEI from the API's text.
///
/// # Errors
/// What is wrong with it.
pub fn parse_imei(s: &str) -> Result<Imei, String> {
    Imei::from_ascii(s.as_bytes()).ok_or_else(|| "imei must be exactly 15 decimal digits".into())
}

/// The IMEI range of a digits prefix (`3563` -> 356300000000000..=356399999999999).
///
/// # Errors
/// The prefix is not 1 to 15 digits.
pub fn prefix_range(prefix: &str) -> Result<(Imei, Imei), String> {
    if prefix.is_empty() || prefix.len() > 15 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err("prefix must be 1 to 15 decimal digits".into());
    }
    let scale = 10u64.pow(15 - prefix.len() as u32);
    let lo: u64 = prefix.parse::<u64>().expect("digits") * scale;
    let range = (Imei::new(lo), Imei::new(lo + scale - 1));
    match range {
        (Some(lo), Some(hi)) => Ok((lo, hi)),
        _ => unreachable!("at most 15 digits"),
    }
}

/// A page size from the query.
///
/// # Errors
/// Out of 1..=[`MAX_PAGE`].
pub fn page_size(limit: Option<usize>) -> Result<usize, String> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        _ => Err(format!("limit must be 1 to {MAX_PAGE}")),
    }
}

impl PostCommand {
    /// The command the ledger takes.
    ///
    /// # Errors
    /// What is wrong with the request.
    pub fn validate(self) -> Result<NewCommand, String> {
        let imei = parse_imei(&self.imei)?;
        let payload = match (self.command, self.hex) {
            (Some(_), Some(_)) => return Err("give either command or hex, not both".into()),
            (None, None) => return Err("command or hex is required".into()),
            (Some(text), None) => Payload::Text(text),
            (None, Some(h)) => Payload::Bytes(
                hex::decode(h.trim()).map_err(|e| format!("hex is not valid hex: {e}"))?,
            ),
        };
        let len = match &payload {
            Payload::Text(t) => t.len(),
            Payload::Bytes(b) => b.len(),
        };
        if len == 0 {
            return Err("the command is empty".into());
        }
        if len > commands::MAX_PAYLOAD {
            return Err(format!(
                "the command is {len} bytes; at most {} are accepted",
                commands::MAX_PAYLOAD
            ));
        }
        let codec = match self.codec.unwrap_or(12) {
            12 => Codec::C12,
            14 => Codec::C14,
            _ => return Err("codec must be 12 or 14".into()),
        };
        let metadata = match self.metadata {
            None => serde_json::Value::Object(Default::default()),
            Some(m @ serde_json::Value::Object(_)) => m,
            Some(_) => return Err("metadata must be a JSON object".into()),
        };
        if self.ttl_s == Some(0) {
            return Err("ttl_s must be at least 1 second".into());
        }
        Ok(NewCommand {
            imei,
            payload,
            codec,
            metadata,
            ttl_s: self.ttl_s,
            priority: self.priority.unwrap_or(0),
        })
    }
}

// ===== health =====

/// `GET /healthz`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// `GET /readyz`: each check `ok` or what failed.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not ready`.
    pub status: String,
    /// The checks that failed (`database`, `shards`).
    pub failed: Vec<String>,
    /// The database answered a query.
    pub database: String,
    /// Every shard is bound and accepting.
    pub shards: String,
}

// ===== mirrors =====

/// Schemas of types defined elsewhere without one, under their own names. Never built: only
/// their schema is used, and a test holds them to the real serialization.
#[allow(dead_code)]
pub mod mirror {
    use utoipa::ToSchema;

    /// A connected device's live session.
    #[derive(ToSchema)]
    pub struct DeviceInfo {
        /// The 15 digits.
        pub imei: String,
        pub shard: usize,
        /// `tcp`.
        pub transport: String,
        pub remote_addr: Option<String>,
        /// RFC 3339, UTC.
        pub connected_since: Option<String>,
        pub last_frame_at: Option<String>,
        pub last_sent_at: Option<String>,
        pub frames_received: u64,
        pub records_received: u64,
        pub bytes_received: u64,
        pub bytes_sent: u64,
        pub commands_sent: u64,
        pub last_position: Option<Position>,
    }

    /// The last position a device reported.
    #[derive(ToSchema)]
    pub struct Position {
        /// The device's time of the fix.
        pub time: Option<String>,
        pub lat: f64,
        pub lon: f64,
        pub alt: i16,
        pub angle: u16,
        pub sats: u8,
        pub speed: u16,
    }

    /// A command and what became of it.
    #[derive(ToSchema)]
    pub struct CommandView {
        pub id: i64,
        pub imei: String,
        /// The text, when posted as text.
        pub command: Option<String>,
        /// The payload as hex, when posted as hex.
        pub hex: Option<String>,
        pub codec: i16,
        /// `queued`, `sent`, `completed`, `failed`, `expired`, `superseded` or `cancelled`.
        pub state: String,
        /// The device's answer, once completed.
        pub response: Option<String>,
        #[schema(value_type = Object)]
        pub metadata: serde_json::Value,
        pub priority: i32,
        pub attempts: i32,
        pub created_at: Option<String>,
        pub expires_at: Option<String>,
        pub sent_at: Option<String>,
        pub finished_at: Option<String>,
        pub error: Option<String>,
    }
}

// ===== the document =====

/// The OpenAPI document of `/api/v1/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetgate control API",
        description = "Devices, statistics and commands of a fleetgate gateway. Every endpoint \
            but /healthz, /readyz and /metrics needs an API key: `x-api-key: KEY` or \
            `Authorization: Bearer KEY`. Errors are `{\"error\": \"...\"}`."
    ),
    paths(
        super::handlers::healthz,
        super::handlers::readyz,
        super::handlers::metrics,
        super::handlers::openapi,
        super::handlers::list_devices,
        super::handlers::get_device,
        super::handlers::device_commands,
        super::handlers::stats,
        super::handlers::post_command,
        super::handlers::get_command,
        super::handlers::cancel_command,
    ),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// The two ways to present a key.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::SecurityScheme;
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder};
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn post(v: Value) -> Result<NewCommand, String> {
        serde_json::from_value::<PostCommand>(v)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn posted_commands_are_checked() {
        let c = post(json!({"imei": "356307042441013", "command": "setdigout 1"})).unwrap();
        assert_eq!(c.payload, Payload::Text("setdigout 1".into()));
        assert_eq!((c.codec, c.priority, c.ttl_s), (Codec::C12, 0, None));
        assert_eq!(c.metadata, json!({}));
        let c = post(
            json!({"imei": "356307042441013", "hex": "00ff", "codec": 14,
                            "metadata": {"by": "me"}, "ttl_s": 60, "priority": 5}),
        )
        .unwrap();
        assert_eq!(c.payload, Payload::Bytes(vec![0, 0xff]));
        assert_eq!((c.codec, c.priority, c.ttl_s), (Codec::C14, 5, Some(60)));
        for (bad, why) in [
            (
                json!({"imei": "35630704244101", "command": "x"}),
                "15 decimal digits",
            ),
            (
                json!({"imei": "35630704244101x", "command": "x"}),
                "15 decimal digits",
            ),
            (
                json!({"imei": "356307042441013"}),
                "command or hex is required",
            ),
            (
                json!({"imei": "356307042441013", "command": "x", "hex": "00"}),
                "not both",
            ),
            (json!({"imei": "356307042441013", "command": ""}), "empty"),
            (
                json!({"imei": "356307042441013", "hex": "0g"}),
                "not valid hex",
            ),
            (
                json!({"imei": "356307042441013", "command": "x".repeat(4097)}),
                "at most 4096",
            ),
            (
                json!({"imei": "356307042441013", "command": "x", "codec": 13}),
                "12 or 14",
            ),
            (
                json!({"imei": "356307042441013", "command": "x", "metadata": [1]}),
                "JSON object",
            ),
            (
                json!({"imei": "356307042441013", "command": "x", "ttl_s": 0}),
                "at least 1",
            ),
            (
                json!({"imei": "356307042441013", "command": "x", "colour": 1}),
                "unknown field",
            ),
            (
                json!({"imei": 356307042441013u64, "command": "x"}),
                "invalid type",
            ),
        ] {
            let e = post(bad.clone()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn prefixes_are_imei_ranges_and_pages_are_bounded() {
        let r = |p| prefix_range(p).map(|(a, b)| (a.as_u64(), b.as_u64()));
        assert_eq!(r("3563"), Ok((356_300_000_000_000, 356_399_999_999_999)));
        assert_eq!(
            r("356307042441013"),
            Ok((356_307_042_441_013, 356_307_042_441_013))
        );
        assert_eq!(r("0"), Ok((0, 99_999_999_999_999)));
        for bad in ["", "35a", "3563070424410130"] {
            assert!(prefix_range(bad).is_err());
        }
        assert_eq!(page_size(None), Ok(100));
        assert_eq!(page_size(Some(1000)), Ok(1000));
        assert!(page_size(Some(0)).is_err() && page_size(Some(1001)).is_err());
    }

    // ===== the document against the real serialization =====

    /// The document as JSON.
    fn doc() -> Value {
        serde_json::to_value(ApiDoc::openapi()).unwrap()
    }

    /// Whether `schema` admits `v`, for the subset of JSON Schema utoipa writes: `type` (a name
    /// or a list), `$ref`, `oneOf`/`anyOf`/`allOf`, `items`, and `properties`, which must be
    /// exactly the object's keys (stricter than JSON Schema: a field sent but not documented is
    /// a drift too; so an object split over `allOf` parts, as `#[serde(flatten)]` writes it,
    /// cannot be checked here). No `type`: anything.
    fn admits(doc: &Value, schema: &Value, v: &Value) -> Result<(), String> {
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            let name = r.trim_start_matches("#/components/schemas/");
            let target = &doc["components"]["schemas"][name];
            assert!(!target.is_null(), "dangling {r}");
            return admits(doc, target, v);
        }
        for key in ["oneOf", "anyOf"] {
            if let Some(alts) = schema.get(key).and_then(Value::as_array) {
                let errors: Vec<String> = alts
                    .iter()
                    .filter_map(|a| admits(doc, a, v).err())
                    .collect();
                return if errors.len() < alts.len() {
                    Ok(())
                } else {
                    Err(errors.join(" / "))
                };
            }
        }
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            return all.iter().try_for_each(|a| admits(doc, a, v));
        }
        let types: Vec<&str> = match schema.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => return Ok(()),
        };
        let ok = types.iter().any(|t| match (*t, v) {
            ("null", Value::Null) | ("string", Value::String(_)) | ("boolean", Value::Bool(_)) => {
                true
            }
            ("integer", Value::Number(n)) => n.is_i64() || n.is_u64(),
            ("number", Value::Number(_)) => true,
            ("array", Value::Array(items)) => items
                .iter()
                .all(|i| admits(doc, &schema["items"], i).is_ok()),
            ("object", Value::Object(_)) => object_matches(doc, schema, v).is_ok(),
            _ => false,
        });
        if ok {
            Ok(())
        } else {
            let detail = match v {
                Value::Object(_) => object_matches(doc, schema, v).err().unwrap_or_default(),
                _ => String::new(),
            };
            Err(format!("{v} is not {types:?} {detail}"))
        }
    }

    /// An object's keys are exactly the schema's properties (when it lists any), each admitted.
    fn object_matches(doc: &Value, schema: &Value, v: &Value) -> Result<(), String> {
        let Some(props) = schema.get("properties").and_then(Value::as_object) else {
            return Ok(());
        };
        let obj = v.as_object().unwrap();
        let sent: Vec<&String> = obj.keys().collect();
        let documented: Vec<&String> = props.keys().collect();
        let mut a = sent.clone();
        let mut b = documented.clone();
        a.sort();
        b.sort();
        if a != b {
            return Err(format!("fields sent {a:?}, documented {b:?}"));
        }
        for (k, s) in props {
            admits(doc, s, &obj[k]).map_err(|e| format!("{k}: {e}"))?;
        }
        if let Some(req) = schema.get("required").and_then(Value::as_array) {
            for r in req {
                let r = r.as_str().unwrap();
                if obj[r].is_null() {
                    return Err(format!("{r} is documented as required, sent null"));
                }
            }
        }
        Ok(())
    }

    fn check(name: &str, v: &Value) {
        let d = doc();
        let schema = &d["components"]["schemas"][name];
        assert!(schema.is_object(), "no schema {name}");
        if let Err(e) = admits(&d, schema, v) {
            panic!("{name} drifted from its documented schema: {e}");
        }
    }

    fn device(full: bool) -> DeviceInfo {
        use crate::shard::devices::Position;
        let t = full.then(|| "2024-01-01T00:00:00.000Z".to_string());
        DeviceInfo {
            imei: "356307042441013".into(),
            shard: 1,
            transport: "tcp",
            remote_addr: full.then(|| "127.0.0.1:5000".into()),
            connected_since: t.clone(),
            last_frame_at: t.clone(),
            last_sent_at: t.clone(),
            frames_received: 1,
            records_received: 2,
            bytes_received: 3,
            bytes_sent: 4,
            commands_sent: 5,
            last_position: full.then(|| Position {
                time: t.clone(),
                lat: 54.6,
                lon: 25.2,
                alt: -3,
                angle: 90,
                sats: 9,
                speed: 50,
            }),
        }
    }

    fn command(full: bool) -> CommandView {
        let t = full.then(|| "2024-01-01T00:00:00.000Z".to_string());
        CommandView {
            id: 7,
            imei: "356307042441013".into(),
            command: full.then(|| "setdigout 1".into()),
            hex: (!full).then(|| "00ff".into()),
            codec: 12,
            state: "completed".into(),
            response: full.then(|| "DOUT1:1".into()),
            metadata: json!({"by": "test"}),
            priority: 0,
            attempts: 1,
            created_at: t.clone(),
            expires_at: t.clone(),
            sent_at: t.clone(),
            finished_at: t.clone(),
            error: full.then(|| "x".into()),
        }
    }

    #[test]
    fn mirrored_schemas_match_the_real_serialization() {
        for full in [true, false] {
            check("DeviceInfo", &serde_json::to_value(device(full)).unwrap());
            check("CommandView", &serde_json::to_value(command(full)).unwrap());
        }
        check(
            "DevicePage",
            &serde_json::to_value(DevicePage {
                devices: vec![device(true), device(false)],
                next_cursor: None,
            })
            .unwrap(),
        );
        check(
            "CancelConflict",
            &serde_json::to_value(CancelConflict {
                error: "too late".into(),
                command: command(true),
            })
            .unwrap(),
        );
    }

    #[test]
    fn the_checker_catches_a_drift() {
        let mut v = serde_json::to_value(device(true)).unwrap();
        v["extra"] = json!(1);
        let d = doc();
        assert!(admits(&d, &d["components"]["schemas"]["DeviceInfo"], &v).is_err());
        let mut v = serde_json::to_value(device(true)).unwrap();
        v["shard"] = json!("one");
        assert!(admits(&d, &d["components"]["schemas"]["DeviceInfo"], &v).is_err());
        let mut v = serde_json::to_value(command(true)).unwrap();
        v.as_object_mut().unwrap().remove("state");
        assert!(admits(&d, &d["components"]["schemas"]["CommandView"], &v).is_err());
    }
}

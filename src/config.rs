//! Configuration: typed serde structs with defaults, loaded from a TOML file, overridden by
//! `FLEETGATE_<KEY>` environment variables ([`Config::load`]), then by command-line flags
//! (one merge function in `main.rs`), then validated. Read on the main thread.
//!
//! Precedence, highest first: flags, environment, file, defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The checked-in default configuration (`fleetgate print-config` prints it).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../fleetgate.toml");

/// The largest `max_frame_len` accepted: a read buffer may grow to it.
pub const MAX_FRAME_LEN_LIMIT: u32 = 1 << 20;

/// Everything `fleetgate serve` can be told.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TCP and UDP port the devices connect to (0: any free port, printed when ready).
    pub device_port: u16,
    /// Address the devices' listeners bind to.
    pub device_host: std::net::IpAddr,
    /// PostgreSQL connection string (`host=... user=...` or `postgres://...`). Empty: start a
    /// managed PostgreSQL in `data_dir`.
    pub database_url: String,
    /// Where the managed PostgreSQL lives.
    pub data_dir: PathBuf,
    /// Number of shards (glommio executors, one per core). 0: one per available core.
    pub shards: usize,
    /// Pin each shard to its own CPU (`cpu = shard_id % nproc`).
    pub pin_cpus: bool,
    /// Control-plane API address.
    pub api_addr: SocketAddr,
    /// Largest declared TCP data length accepted, in bytes; larger closes the connection.
    pub max_frame_len: u32,
    /// Seconds a new connection may take to send its login.
    pub login_timeout_s: u64,
    /// Seconds without any byte (and nothing in flight) before a connection is closed.
    pub idle_timeout_s: u64,
    /// Seconds one write of acks may take before the device is taken for one that does not
    /// read, and closed.
    pub write_timeout_s: u64,
    /// Seconds a device may take to answer a command before it is sent again (or failed).
    pub command_timeout_s: u64,
    /// Most open device connections per shard; more are refused at accept and at hand-over.
    pub max_connections_per_shard: usize,
    /// Listen backlog of each shard's TCP listener: a fleet reconnecting after an outage
    /// arrives at once (the kernel caps it at net.core.somaxconn).
    pub listen_backlog: i32,
    /// Kernel send and receive buffer of each device connection, in bytes (0: the kernel's
    /// autotuning). Trackers send little and receive less: capping them bounds the kernel's
    /// memory per connection at fleet scale (see tuning/), and a small send buffer finds a
    /// device that does not read its acks sooner.
    pub tcp_send_buffer_bytes: usize,
    pub tcp_recv_buffer_bytes: usize,
    /// Receive buffer of each shard's UDP socket. The kernel default (~208 KiB) dropped 5% of
    /// the datagrams of 500 devices with 4 in flight each (tuning/ingest.md).
    pub udp_recv_buffer_bytes: usize,
    /// AVL frames a connection may have waiting for their commit before it stops reading.
    pub max_frames_in_flight_per_connection: usize,
    /// THE MEMORY BOUND: bytes of encoded rows a shard may hold awaiting their commit (also
    /// during a database outage). A frame that does not fit waits, and its connection stops
    /// reading; the room comes back as the writer answers.
    pub max_bytes_in_flight_per_shard: usize,
    /// Device policy: `open` accepts every valid IMEI; `allow_list` accepts only enabled
    /// devices of the `devices` table.
    pub device_policy: DevicePolicyKind,
    /// Seconds between reloads of the allow-list from the `devices` table.
    pub allow_list_reload_s: u64,
    /// Writer: database connections committing in parallel (one thread each).
    pub writer_connections: usize,
    /// Writer: most records in one COPY transaction.
    pub batch_max_records: usize,
    /// Writer: milliseconds the first record of a batch may wait for more.
    pub batch_max_delay_ms: u64,
    /// Daily telemetry partitions created ahead of today.
    pub partitions_ahead_days: i32,
    /// Days of telemetry kept (whole daily partitions dropped after). 0: keep forever.
    pub retention_days: i32,
    /// Seconds the shutdown may take to flush what is in flight before it is forced.
    pub shutdown_timeout_s: u64,
    /// `tracing` filter, e.g. `info` or `fleetgate=debug` (`RUST_LOG`, when set, wins).
    pub log: String,
    /// How log records are written to standard error: `text` for people (colours only when
    /// standard error is a terminal, so a log file or a pipe holds no escape codes) or `json`,
    /// one object per line, for log shippers.
    pub log_format: LogFormat,
    /// Writer: device connect/disconnect events held at most while waiting for the database;
    /// more are dropped and counted. Telemetry never waits for them.
    pub max_session_events_queued: usize,
    /// API keys, each `"KEY:SCOPE"` with scope `read` (devices, stats, command history) or
    /// `command` (also send and cancel commands). `FLEETGATE_API_KEYS` adds more (same form,
    /// comma-separated), so that keys need not sit in a file. With no key at all the API only
    /// starts on a loopback address.
    pub api_keys: Vec<String>,
    /// This gateway's name in the command ledger (`commands.sent_by`): which gateway holds a
    /// command in flight. Empty: `<hostname>-<pid>`, resolved by `validate`.
    pub gateway_id: String,
    /// Sends of a command (first one included) before it fails for want of an answer or of
    /// delivery.
    pub command_max_attempts: i32,
    /// Telemetry events (`devices/{imei}/telemetry`, one per device per commit, with the
    /// latest position and IO values): `none` (nothing is built or written), `all`, or
    /// `opted_in` (devices whose `devices.telemetry_events` is true, re-read every
    /// `allow_list_reload_s`).
    pub telemetry_events: TelemetryEventsKind,
    /// Seconds one webhook request (connect, send, answer) may take before it counts as
    /// failed and is retried.
    pub webhook_timeout_s: u64,
    /// Longest pause, in seconds, between retries of an event a receiver did not take (the
    /// pause doubles from 0.1 s up to this).
    pub webhook_retry_max_s: u64,
    /// Where events go: `[[routes]]` tables, each with `topics` (MQTT-style filters: `+` one
    /// level, `#` the rest), `url` (`http://…`), `secret` (signs each request) and an
    /// optional `name` (default: the url) that keys its delivery state in the database.
    pub routes: Vec<RouteConfig>,
}

/// How log records are written.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Which devices' telemetry becomes events.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum TelemetryEventsKind {
    None,
    All,
    OptedIn,
}

/// One `[[routes]]` table: which events go where (see `control::events`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Keys the route's delivery state (how far it is delivered); default: the url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Topic filters; an event matching any of them goes to this route.
    pub topics: Vec<String>,
    /// `http://host[:port]/path` the events are POSTed to.
    pub url: String,
    /// Key of the HMAC-SHA256 signature of each request.
    pub secret: String,
}

/// How logins are checked.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum DevicePolicyKind {
    Open,
    AllowList,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            device_port: 5027,
            device_host: "0.0.0.0".parse().unwrap(),
            database_url: String::new(),
            data_dir: PathBuf::from("fleetgate-data"),
            shards: 0,
            pin_cpus: false,
            api_addr: "127.0.0.1:8080".parse().unwrap(),
            max_frame_len: crate::protocol::DEFAULT_MAX_FRAME_LEN,
            login_timeout_s: 30,
            idle_timeout_s: 600,
            write_timeout_s: 30,
            command_timeout_s: 30,
            max_connections_per_shard: 50_000,
            listen_backlog: 4096,
            tcp_send_buffer_bytes: 0,
            tcp_recv_buffer_bytes: 0,
            udp_recv_buffer_bytes: 8 << 20,
            max_frames_in_flight_per_connection: 16,
            max_bytes_in_flight_per_shard: 64 << 20,
            device_policy: DevicePolicyKind::Open,
            allow_list_reload_s: 10,
            writer_connections: 2,
            batch_max_records: 20_000,
            batch_max_delay_ms: 5,
            partitions_ahead_days: 7,
            retention_days: 0,
            shutdown_timeout_s: 10,
            log: "info".into(),
            log_format: LogFormat::Text,
            max_session_events_queued: 65_536,
            api_keys: Vec::new(),
            gateway_id: String::new(),
            command_max_attempts: 3,
            telemetry_events: TelemetryEventsKind::None,
            webhook_timeout_s: 10,
            webhook_retry_max_s: 60,
            routes: Vec::new(),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(
        "environment variable {var} is not a configuration option (there is no key `{key}`; \
         `fleetgate print-config` lists them, FLEETGATE_<KEY> sets key <key>)"
    )]
    UnknownEnv { var: String, key: String },
    #[error("environment variable {var} sets option `{key}`: {why}")]
    EnvValue {
        var: String,
        key: String,
        why: String,
    },
}

/// The prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "FLEETGATE_";

/// `FLEETGATE_` variables that are not `FLEETGATE_<KEY>` overrides, handled elsewhere:
/// `FLEETGATE_CONFIG`, `FLEETGATE_DATABASE_URL` and `FLEETGATE_DATA_DIR` stand for their flags
/// (clap reads them, so a flag still beats them), `FLEETGATE_PG_BIN` names the PostgreSQL
/// binaries, and `FLEETGATE_API_KEYS` has its own comma-separated form that adds keys to
/// `api_keys` rather than replacing them (`control::api::auth`).
pub const ENV_HANDLED_ELSEWHERE: &[&str] = &[
    "FLEETGATE_CONFIG",
    "FLEETGATE_DATABASE_URL",
    "FLEETGATE_DATA_DIR",
    "FLEETGATE_PG_BIN",
    crate::control::api::auth::ENV_VAR,
];

/// The `FLEETGATE_*` variables of this process, for [`Config::load`].
///
/// # Errors
/// A `FLEETGATE_*` variable whose value is not UTF-8 (named in the error).
pub fn process_env() -> Result<BTreeMap<String, String>, ConfigError> {
    let mut env = BTreeMap::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
            continue;
        };
        let value = value.into_string().map_err(|_| ConfigError::EnvValue {
            var: name.to_string(),
            key: env_key(name),
            why: "the value is not UTF-8".into(),
        })?;
        env.insert(name.to_string(), value);
    }
    Ok(env)
}

/// The configuration key a `FLEETGATE_<KEY>` variable names.
fn env_key(var: &str) -> String {
    var.strip_prefix(ENV_PREFIX)
        .unwrap_or(var)
        .to_ascii_lowercase()
}

impl Config {
    /// The file (if any) with the environment's `FLEETGATE_<KEY>` overrides applied over it:
    /// everything but the flags. `env` holds the `FLEETGATE_*` variables ([`process_env`]; a
    /// map, so that tests need not touch the process environment).
    ///
    /// Each variable is read as the value of the key it names, with the type the file would
    /// give it: for keys whose value is a string (addresses, paths, `log`, the enums) the text
    /// is taken as it is, without TOML quotes; for the others it is parsed as a TOML value
    /// (`30`, `true`, `[{ topics = ["#"], url = "http://h/", secret = "s" }]`), and text
    /// that is not one is kept as a string (which then fails to be a number, named). The
    /// merged table is then read as the file would be.
    ///
    /// # Errors
    /// The file cannot be read or parsed; a `FLEETGATE_*` variable names no key (unless it
    /// is one of [`ENV_HANDLED_ELSEWHERE`]), or its value does not fit the key.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            None => toml::Table::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                let parse = |source| ConfigError::Parse {
                    path: path.into(),
                    source,
                };
                // Read as a `Config` first: its errors point at the file's line and key.
                toml::from_str::<Config>(&text).map_err(parse)?;
                toml::from_str::<toml::Table>(&text).map_err(parse)?
            }
        };
        let defaults = toml::Table::try_from(Config::default())
            .expect("the default configuration serializes to a table");
        for (var, text) in env {
            if !var.starts_with(ENV_PREFIX) || ENV_HANDLED_ELSEWHERE.contains(&var.as_str()) {
                continue;
            }
            let key = env_key(var);
            let Some(default) = defaults.get(&key) else {
                return Err(ConfigError::UnknownEnv {
                    var: var.clone(),
                    key,
                });
            };
            let value = match default {
                toml::Value::String(_) => toml::Value::String(text.clone()),
                _ => toml::Value::deserialize(toml::de::ValueDeserializer::new(text))
                    .unwrap_or_else(|_| toml::Value::String(text.clone())),
            };
            // Checked alone, so that a bad value is reported with its variable.
            let mut alone = toml::Table::new();
            alone.insert(key.clone(), value.clone());
            if let Err(e) = toml::Value::Table(alone).try_into::<Config>() {
                return Err(ConfigError::EnvValue {
                    var: var.clone(),
                    key,
                    why: format!("{text:?}: {}", e.message().trim()),
                });
            }
            table.insert(key, value);
        }
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().trim().to_string()))
    }

    /// Reads a TOML file; unknown keys are an error.
    ///
    /// # Errors
    /// The file cannot be read or parsed.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Rejects impossible values and resolves `shards = 0` to the number of cores.
    ///
    /// # Errors
    /// The first impossible value found.
    pub fn validate(mut self) -> Result<Config, ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.shards == 0 {
            self.shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
        if self.shards > 1024 {
            return bad("shards must be at most 1024");
        }
        if !(64..=MAX_FRAME_LEN_LIMIT).contains(&self.max_frame_len) {
            return bad("max_frame_len must be 64 to 1048576 bytes");
        }
        if [
            self.login_timeout_s,
            self.idle_timeout_s,
            self.write_timeout_s,
            self.command_timeout_s,
        ]
        .contains(&0)
        {
            return bad(
                "login_timeout_s, idle_timeout_s, write_timeout_s and command_timeout_s must be positive",
            );
        }
        if self.max_connections_per_shard == 0 {
            return bad("max_connections_per_shard must be positive");
        }
        if self.listen_backlog < 1 || self.udp_recv_buffer_bytes < 65_536 {
            return bad("listen_backlog must be positive and udp_recv_buffer_bytes at least 65536");
        }
        if !(1..=1024).contains(&self.max_frames_in_flight_per_connection) {
            return bad("max_frames_in_flight_per_connection must be 1 to 1024");
        }
        if self.max_bytes_in_flight_per_shard < 1 << 20 {
            return bad("max_bytes_in_flight_per_shard must be at least 1048576 (1 MiB)");
        }
        if self.writer_connections == 0 || self.writer_connections > 64 {
            return bad("writer_connections must be 1 to 64");
        }
        if self.batch_max_records == 0 {
            return bad("batch_max_records must be positive");
        }
        if self.partitions_ahead_days < 1 || self.retention_days < 0 {
            return bad("partitions_ahead_days must be >= 1 and retention_days >= 0");
        }
        if self.max_session_events_queued == 0 {
            return bad("max_session_events_queued must be positive");
        }
        if !(1..=300).contains(&self.webhook_timeout_s) {
            return bad("webhook_timeout_s must be 1 to 300");
        }
        if !(1..=86_400).contains(&self.webhook_retry_max_s) {
            return bad("webhook_retry_max_s must be 1 to 86400");
        }
        crate::control::events::validate_routes(&self.routes)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (n, entry) in self.api_keys.iter().enumerate() {
            // The message names the entry by position: the key itself is a secret.
            if let Err(why) = crate::control::api::auth::parse_key(entry) {
                return Err(ConfigError::Invalid(format!(
                    "api_keys entry {}: {why}",
                    n + 1
                )));
            }
        }
        if self.gateway_id.is_empty() {
            self.gateway_id = format!("{}-{}", hostname(), std::process::id());
        }
        if !(1..=100).contains(&self.command_max_attempts) {
            return bad("command_max_attempts must be 1 to 100");
        }
        Ok(self)
    }

    pub fn login_timeout(&self) -> Duration {
        Duration::from_secs(self.login_timeout_s)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_s)
    }
    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_s)
    }
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_s)
    }
    pub fn batch_max_delay(&self) -> Duration {
        Duration::from_millis(self.batch_max_delay_ms)
    }
    pub fn webhook_timeout(&self) -> Duration {
        Duration::from_secs(self.webhook_timeout_s)
    }
    pub fn webhook_retry_max(&self) -> Duration {
        Duration::from_secs(self.webhook_retry_max_s)
    }
}

/// This machine's host name (`localhost` when it cannot be read), for the default `gateway_id`.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match (rc, std::str::from_utf8(&buf[..len])) {
        (0, Ok(name)) if !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_is_the_default() {
        let parsed: Config = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("no_such_key = 1").is_err());
        for c in [
            Config {
                max_frame_len: 10,
                ..Config::default()
            },
            Config {
                max_frame_len: MAX_FRAME_LEN_LIMIT + 1,
                ..Config::default()
            },
            Config {
                max_bytes_in_flight_per_shard: 1000,
                ..Config::default()
            },
            Config {
                write_timeout_s: 0,
                ..Config::default()
            },
            Config {
                api_keys: vec!["no-scope".into()],
                ..Config::default()
            },
            Config {
                api_keys: vec!["k:admin".into()],
                ..Config::default()
            },
            Config {
                command_max_attempts: 0,
                ..Config::default()
            },
        ] {
            assert!(c.validate().is_err());
        }
        assert!(Config::default().validate().is_ok());
    }

    /// A config file with `text` in a fresh temp dir, removed on drop.
    struct TempFile(PathBuf);
    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!("fg-{}-{name}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn env(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_the_defaults() {
        let file = TempFile::new(
            "precedence",
            "shards = 3\nlog = \"warn\"\nidle_timeout_s = 5\ngateway_id = \"from-file\"\n",
        );
        let c = Config::load(
            Some(&file.0),
            &env(&[
                ("FLEETGATE_SHARDS", "2"),
                ("FLEETGATE_LOG", "fleetgate=debug,tokio=warn"),
                ("FLEETGATE_LOG_FORMAT", "json"),
                ("FLEETGATE_DEVICE_HOST", "127.0.0.1"),
                ("FLEETGATE_API_ADDR", "[::1]:9090"),
                // A string key keeps digits as text.
                ("FLEETGATE_GATEWAY_ID", "123"),
                ("FLEETGATE_PIN_CPUS", "true"),
                ("FLEETGATE_MAX_BYTES_IN_FLIGHT_PER_SHARD", "1048576"),
                ("FLEETGATE_DEVICE_POLICY", "allow_list"),
                (
                    "FLEETGATE_ROUTES",
                    r##"[{ topics = ["#"], url = "http://127.0.0.1:9/h", secret = "s" }]"##,
                ),
            ]),
        )
        .unwrap();
        assert_eq!(c.shards, 2);
        assert_eq!(c.log, "fleetgate=debug,tokio=warn");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.device_host.to_string(), "127.0.0.1");
        assert_eq!(c.api_addr.to_string(), "[::1]:9090");
        assert_eq!(c.gateway_id, "123");
        assert!(c.pin_cpus);
        assert_eq!(c.max_bytes_in_flight_per_shard, 1 << 20);
        assert_eq!(c.device_policy, DevicePolicyKind::AllowList);
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].topics, ["#"]);
        // From the file where the environment says nothing; defaults where neither does.
        assert_eq!(c.idle_timeout_s, 5);
        assert_eq!(c.login_timeout_s, 30);
        assert!(c.validate().is_ok());

        let c = Config::load(Some(&file.0), &env(&[])).unwrap();
        assert_eq!((c.shards, c.log.as_str()), (3, "warn"));
        assert_eq!(
            Config::load(None, &env(&[])).unwrap(),
            Config::default(),
            "no file and no variables: the defaults"
        );
    }

    #[test]
    fn every_key_but_api_keys_has_its_variable() {
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (key, value) in &defaults {
            let var = format!("FLEETGATE_{}", key.to_ascii_uppercase());
            if ENV_HANDLED_ELSEWHERE.contains(&var.as_str()) {
                continue;
            }
            // The default itself, written as an operator would: strings without quotes.
            let text = match value {
                toml::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            let c = Config::load(None, &env(&[(&var, &text)]))
                .unwrap_or_else(|e| panic!("{var}={text}: {e}"));
            assert_eq!(c, Config::default(), "{var}={text}");
        }
        assert!(defaults.contains_key("log_format"));
    }

    #[test]
    fn variables_handled_elsewhere_are_left_alone() {
        let c = Config::load(
            None,
            &env(&[
                ("FLEETGATE_API_KEYS", "k1:command,k2:read"),
                ("FLEETGATE_CONFIG", "/no/such/file.toml"),
                ("FLEETGATE_DATABASE_URL", "host=/nowhere"),
                ("FLEETGATE_DATA_DIR", "/nowhere"),
                ("FLEETGATE_PG_BIN", "/usr/lib/postgresql/15/bin"),
                // Not ours at all.
                ("RUST_LOG", "trace"),
            ]),
        )
        .unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn an_unknown_variable_or_a_bad_value_is_named() {
        let e = Config::load(None, &env(&[("FLEETGATE_MAX_CONECTIONS_PER_SHARD", "10")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("FLEETGATE_MAX_CONECTIONS_PER_SHARD"), "{e}");
        assert!(e.contains("not a configuration option"), "{e}");

        for (var, text, key) in [
            ("FLEETGATE_DEVICE_PORT", "abc", "device_port"),
            ("FLEETGATE_DEVICE_PORT", "70000", "device_port"),
            ("FLEETGATE_DEVICE_HOST", "not-an-address", "device_host"),
            ("FLEETGATE_DEVICE_POLICY", "closed", "device_policy"),
            ("FLEETGATE_LOG_FORMAT", "xml", "log_format"),
            ("FLEETGATE_PIN_CPUS", "yes", "pin_cpus"),
            ("FLEETGATE_SHARDS", "-1", "shards"),
            ("FLEETGATE_ROUTES", "[{ url = 1 }]", "routes"),
        ] {
            let e = Config::load(None, &env(&[(var, text)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(var) && e.contains(&format!("`{key}`")) && e.contains(text),
                "{var}={text}: {e}"
            );
        }
        // A value of the right type that `validate` refuses is refused there, by option.
        let e = Config::load(None, &env(&[("FLEETGATE_MAX_FRAME_LEN", "10")]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_frame_len"), "{e}");
    }

    #[test]
    fn a_bad_file_is_named_with_its_line() {
        let file = TempFile::new("bad", "shards = 2\ndevice_port = \"x\"\n");
        let e = Config::load(Some(&file.0), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("device_port") && e.contains("line 2"), "{e}");
        let e = Config::load(Some(Path::new("/no/such/fleetgate.toml")), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/fleetgate.toml"), "{e}");
    }

    #[test]
    fn routes_are_read_and_checked() {
        let text = r##"
telemetry_events = "opted_in"
[[routes]]
name = "ops"
topics = ["devices/+/connected", "commands/#"]
url = "http://127.0.0.1:9000/hook"
secret = "s3cret"
[[routes]]
topics = ["#"]
url = "http://10.0.0.2/all"
secret = "x"
"##;
        let c: Config = toml::from_str(text).unwrap();
        assert_eq!(c.telemetry_events, TelemetryEventsKind::OptedIn);
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].name.as_deref(), Some("ops"));
        assert_eq!(c.routes[1].name, None);
        assert!(c.clone().validate().is_ok());

        let bad = text.replace("commands/#", "commands/#/x");
        let e = toml::from_str::<Config>(&bad)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("route \"ops\""), "{e}");
        let bad = text.replace("http://10.0.0.2/all", "10.0.0.2/all");
        let e = toml::from_str::<Config>(&bad)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("route #2"), "{e}");
        assert!(toml::from_str::<Config>(
            &text.replace("secret = \"x\"", "secret = \"x\"\nport = 1")
        )
        .is_err());
    }

    #[test]
    fn an_empty_gateway_id_becomes_host_and_pid_and_bad_keys_are_named_without_the_key() {
        let c = Config::default().validate().unwrap();
        assert!(c.gateway_id.ends_with(&format!("-{}", std::process::id())));
        let e = Config {
            api_keys: vec!["good:read".into(), "s3cret:root".into()],
            ..Config::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("api_keys entry 2"), "{e}");
        assert!(!e.contains("s3cret"), "the key leaked into the error: {e}");
    }
}

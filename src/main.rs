//! The `fleetgate` binary: parse the command line, load the configuration, hand over to the
//! library. Runs on the main thread.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use fleetgate::config::{Config, DevicePolicyKind, LogFormat, DEFAULT_CONFIG_TOML};

// mimalloc, unless built with `--features system-alloc` (the C library's malloc, so that
// heaptrack and other malloc tools see every allocation: tuning/idle-memory.md).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A thread-per-core gateway between Teltonika GPS trackers and PostgreSQL.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: device listeners, shards, the writer core and the API.
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate(DbArgs),
    /// Decode hex frames (arguments, or one per line of standard input) to JSON lines.
    Decode(fleetgate::cli::decode::DecodeArgs),
    /// Print the default configuration file.
    PrintConfig,
}

/// Where the database is; shared by `serve` and `migrate`.
#[derive(Args, Clone, Default)]
struct DbArgs {
    /// Configuration file (TOML); FLEETGATE_<KEY> variables override it, flags override both.
    #[arg(long, env = "FLEETGATE_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL connection string; without it a managed PostgreSQL runs in --data-dir.
    #[arg(long, env = "FLEETGATE_DATABASE_URL")]
    database_url: Option<String>,
    /// Directory of the managed PostgreSQL (and other state).
    #[arg(long, env = "FLEETGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    /// TCP and UDP port for devices (0: any free port).
    #[arg(long)]
    device_port: Option<u16>,
    /// Address the device listeners bind to.
    #[arg(long)]
    device_host: Option<std::net::IpAddr>,
    /// Number of shards (glommio executors); 0 = one per core.
    #[arg(long)]
    shards: Option<usize>,
    /// Control-plane API address.
    #[arg(long)]
    api_addr: Option<std::net::SocketAddr>,
    /// Largest declared TCP frame data length, in bytes.
    #[arg(long)]
    max_frame_len: Option<u32>,
    /// Seconds a connection may take to log in.
    #[arg(long)]
    login_timeout_s: Option<u64>,
    /// Seconds of silence before a connection is closed.
    #[arg(long)]
    idle_timeout_s: Option<u64>,
    /// Most open device connections per shard; more are refused at accept.
    #[arg(long)]
    max_connections_per_shard: Option<usize>,
    /// Device policy: open, or allow_list (enabled rows of the devices table).
    #[arg(long, value_enum)]
    device_policy: Option<DevicePolicyKind>,
    /// Days of telemetry to keep (0: forever).
    #[arg(long)]
    retention_days: Option<i32>,
    /// Seconds the shutdown may take before it is forced.
    #[arg(long)]
    shutdown_timeout_s: Option<u64>,
    /// Seconds one write of acks may take before the connection is closed.
    #[arg(long)]
    write_timeout_s: Option<u64>,
    /// Frames between decode and their ack written before a connection stops reading.
    #[arg(long)]
    max_frames_in_flight_per_connection: Option<usize>,
    /// The memory bound: bytes of rows a shard holds awaiting commit.
    #[arg(long)]
    max_bytes_in_flight_per_shard: Option<usize>,
    /// Log records as text (for people) or json (one object per line).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// Flags over the environment's `FLEETGATE_<KEY>` variables (`env`) over the file over the
/// defaults: the one place where they meet. (`FLEETGATE_CONFIG`, `FLEETGATE_DATABASE_URL` and
/// `FLEETGATE_DATA_DIR` reach here as the flags they stand for, beaten by the flags themselves.)
fn merge(
    db: &DbArgs,
    serve: Option<&ServeArgs>,
    env: &BTreeMap<String, String>,
) -> anyhow::Result<Config> {
    let mut c = Config::load(db.config.as_deref(), env)?;
    if let Some(v) = &db.database_url {
        c.database_url = v.clone();
    }
    if let Some(v) = &db.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(s) = serve {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = s.$f { c.$f = v; } )* };
        }
        set!(
            device_port,
            device_host,
            shards,
            api_addr,
            max_frame_len,
            login_timeout_s,
            idle_timeout_s,
            max_connections_per_shard,
            device_policy,
            retention_days,
            shutdown_timeout_s,
            write_timeout_s,
            max_frames_in_flight_per_connection,
            max_bytes_in_flight_per_shard,
            log_format
        );
    }
    Ok(c.validate()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Decode(args) => return fleetgate::cli::decode::run(&args),
        Command::PrintConfig => {
            print!("{DEFAULT_CONFIG_TOML}");
            return ExitCode::SUCCESS;
        }
        Command::Migrate(db) => load(&db, None).and_then(|c| {
            init_logging(&c);
            fleetgate::server::migrate_only(&c)
        }),
        Command::Serve(args) => load(&args.db, Some(&args)).and_then(|c| {
            init_logging(&c);
            fleetgate::server::serve(c)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration from this process's environment and command line.
fn load(db: &DbArgs, serve: Option<&ServeArgs>) -> anyhow::Result<Config> {
    merge(db, serve, &fleetgate::config::process_env()?)
}

/// Logs go to standard error, as text or JSON lines. Colour escape codes only when standard
/// error is a terminal: in a file, a pipe or the journal they are noise that grep and log
/// shippers trip on.
fn init_logging(c: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&c.log));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match c.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["fleetgate", "serve"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Serve(s) => s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let path = std::env::temp_dir().join(format!("fg-main-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "shards = 1\nidle_timeout_s = 7\nlogin_timeout_s = 9\nlog_format = \"json\"\n",
        )
        .unwrap();
        let env: BTreeMap<String, String> = [
            ("FLEETGATE_SHARDS", "2"),
            ("FLEETGATE_IDLE_TIMEOUT_S", "8"),
            ("FLEETGATE_LOG_FORMAT", "text"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = serve(&[
            "--config",
            path.to_str().unwrap(),
            "--shards",
            "3",
            "--log-format",
            "json",
        ]);
        let c = merge(&s.db, Some(&s), &env);
        let _ = std::fs::remove_file(&path);
        let c = c.unwrap();
        assert_eq!(c.shards, 3, "the flag beats the variable and the file");
        assert_eq!(c.log_format, LogFormat::Json, "the flag beats the variable");
        assert_eq!(c.idle_timeout_s, 8, "the variable beats the file");
        assert_eq!(c.login_timeout_s, 9, "the file beats the default");
        assert_eq!(c.write_timeout_s, 30, "the default");
    }

    #[test]
    fn an_unknown_variable_stops_serve_with_its_name() {
        let env = BTreeMap::from([("FLEETGATE_SHARD".to_string(), "2".to_string())]);
        let s = serve(&[]);
        let e = merge(&s.db, Some(&s), &env).unwrap_err().to_string();
        assert!(e.contains("FLEETGATE_SHARD "), "{e}");
    }
}

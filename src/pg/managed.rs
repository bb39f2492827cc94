//! A PostgreSQL cluster owned by the gateway: `initdb` on first run, `pg_ctl start` on a unix
//! socket inside the data dir (no TCP listener), adoption of a server left running by an earlier
//! run of the same data dir, `pg_ctl stop -m fast` on [`ManagedPostgres::stop`] and on drop.
//!
//! Authentication is `trust`: whoever reaches the socket is the database superuser. So the data
//! dir is private (mode 0700, owned by the user the server runs as) and so is the socket
//! (`unix_socket_permissions = 0700`): only that user (fleetgate's own; `postgres` when
//! fleetgate runs as root) and root can connect.
//!
//! All of it is blocking (`std::process`); the one database round trip (creating the
//! `fleetgate` database) runs on a helper thread with its own small tokio runtime, so
//! [`ManagedPostgres::start`] may be called from anywhere, async contexts included.

use std::ffi::{CString, OsString};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::PgError;

/// The binaries a managed cluster needs.
const SERVER_BINARIES: [&str; 3] = ["postgres", "initdb", "pg_ctl"];
/// Superuser created by `initdb`, with trust authentication on the unix socket (which only the
/// data dir's owner and root can reach, see [`make_private`]).
const SUPERUSER: &str = "fleetgate";
/// The database the gateway writes to.
const DATABASE: &str = "fleetgate";
/// The system user the server runs as when we are root.
const SERVER_USER: &str = "postgres";
/// Mode of the data dir and of the socket in it: owner only.
const PRIVATE_MODE: u32 = 0o700;
/// How long `pg_ctl` may wait for start or stop, and how long we wait for an adopted server.
const TIMEOUT: Duration = Duration::from_secs(120);
/// `sizeof(sockaddr_un.sun_path) - 1` on Linux: the longest unix socket path.
const SUN_PATH_MAX: usize = 107;
/// Longest socket file name PostgreSQL puts in the socket dir: `/.s.PGSQL.65535`.
const SOCKET_NAME_MAX: usize = "/.s.PGSQL.65535".len();

/// Server settings of a managed cluster (everything else stays at PostgreSQL's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// `fsync`; when off, `full_page_writes` is off too (only for tests and throwaway data:
    /// an OS crash can then corrupt the cluster). `synchronous_commit` stays on either way.
    pub fsync: bool,
    /// `shared_buffers`, in MiB.
    pub shared_buffers_mb: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            fsync: true,
            shared_buffers_mb: 512,
        }
    }
}

/// Who the server processes run as, when not as ourselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A PostgreSQL cluster living in `<data_dir>/pgdata`, listening only on a unix socket in
/// `<data_dir>`. Stopped (`pg_ctl stop -m fast`) on [`ManagedPostgres::stop`] and on drop.
#[derive(Debug)]
pub struct ManagedPostgres {
    data_dir: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    opts: PgOptions,
    run_as: Option<RunAs>,
    running: bool,
    adopted: bool,
}

impl ManagedPostgres {
    /// Start the cluster in `data_dir` (created if missing; `initdb` on first run), or adopt a
    /// server an earlier run of the same data dir left running, and create the `fleetgate`
    /// database if it is missing. The server binaries are found with [`find_bin_dir`].
    pub fn start(data_dir: &Path, opts: &PgOptions) -> Result<ManagedPostgres, PgError> {
        let bin_dir = find_bin_dir()?;
        Self::start_with_bin_dir(data_dir, opts, &bin_dir)
    }

    /// [`ManagedPostgres::start`] with the server binaries in `bin_dir`.
    pub fn start_with_bin_dir(
        data_dir: &Path,
        opts: &PgOptions,
        bin_dir: &Path,
    ) -> Result<ManagedPostgres, PgError> {
        fs::create_dir_all(data_dir)
            .map_err(|e| PgError::io(format!("creating data dir {}", data_dir.display()), e))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(|e| PgError::io(format!("resolving data dir {}", data_dir.display()), e))?;
        if data_dir.to_str().is_none() {
            return Err(PgError::io(
                format!("data dir {}", data_dir.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not UTF-8"),
            ));
        }
        let len = data_dir.as_os_str().len() + SOCKET_NAME_MAX;
        if len > SUN_PATH_MAX {
            return Err(PgError::SocketPathTooLong {
                dir: data_dir,
                len,
                max: SUN_PATH_MAX,
            });
        }

        let run_as = server_user()?;
        let pgdata = data_dir.join("pgdata");
        let log = data_dir.join("postgres.log");
        if let Some(run_as) = run_as {
            check_traversable(&data_dir, run_as)?;
            chown_if_needed(&data_dir, run_as, false)?;
            chown_if_needed(&pgdata, run_as, true)?;
            chown_if_needed(&log, run_as, false)?;
        }
        make_private(&data_dir)?;

        let mut pg = ManagedPostgres {
            socket_dir: data_dir.clone(),
            data_dir,
            pgdata,
            log,
            bin_dir: bin_dir.to_path_buf(),
            port: 0,
            opts: opts.clone(),
            run_as,
            running: false,
            adopted: false,
        };

        if !pg.pgdata.join("PG_VERSION").exists() {
            pg.initdb()?;
        }

        match pg.wait_for_running_server()? {
            Some(pid_file) => {
                tracing::info!(
                    pid = pid_file.pid,
                    port = pid_file.port,
                    data_dir = %pg.data_dir.display(),
                    "adopting the PostgreSQL server left running by an earlier run"
                );
                pg.port = pid_file.port;
                if let Some(dir) = pid_file.socket_dir {
                    pg.socket_dir = dir;
                }
                pg.running = true;
                pg.adopted = true;
            }
            None => {
                pg.port = free_port()?;
                pg.pg_ctl_start()?;
            }
        }

        // From here on, an error drops `pg`, which stops the server.
        pg.ensure_database()?;
        Ok(pg)
    }

    /// tokio-postgres connection string for the `fleetgate` database.
    pub fn connection_string(&self) -> String {
        self.connection_string_for(DATABASE)
    }

    /// tokio-postgres connection string for database `dbname` of this cluster.
    pub fn connection_string_for(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            conninfo_quote(&self.socket_dir.to_string_lossy()),
            self.port,
            SUPERUSER,
            conninfo_quote(dbname)
        )
    }

    /// The port number (only names the socket file: there is no TCP listener).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The gateway data dir this cluster lives in (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The PostgreSQL data directory (`<data_dir>/pgdata`).
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    /// The directory holding the unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server log (`<data_dir>/postgres.log`).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Where the server binaries are.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Whether [`ManagedPostgres::start`] found the server already running and adopted it.
    pub fn was_adopted(&self) -> bool {
        self.adopted
    }

    /// Whether we think the server runs (started or adopted, and not stopped since).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// `pg_ctl stop -m fast`, waiting for the server to exit. Idempotent.
    pub fn stop(&mut self) -> Result<(), PgError> {
        if !self.running {
            return Ok(());
        }
        if !matches!(read_pid_file(&self.pgdata)?, PidFileState::Live(_)) {
            // Already gone (killed, or stopped by somebody else).
            self.running = false;
            return Ok(());
        }
        let out = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.pgdata)
            .args(["-m", "fast", "-w", "-t"])
            .arg(TIMEOUT.as_secs().to_string())
            .output()
            .map_err(|e| PgError::io("running pg_ctl stop", e))?;
        if out.status.success() || !matches!(read_pid_file(&self.pgdata)?, PidFileState::Live(_)) {
            self.running = false;
            tracing::info!(data_dir = %self.data_dir.display(), "PostgreSQL stopped");
            return Ok(());
        }
        Err(PgError::StopFailed {
            dir: self.pgdata.clone(),
            status: out.status.to_string(),
            output: output_text(&out),
        })
    }

    /// Start the cluster again, on the same port, after [`ManagedPostgres::stop`]. A no-op if
    /// it runs.
    pub fn restart_after_stop(&mut self) -> Result<(), PgError> {
        if self.running {
            return Ok(());
        }
        match self.wait_for_running_server()? {
            // Somebody started it meanwhile: adopt it, as `start` would.
            Some(pid_file) => {
                self.port = pid_file.port;
                self.running = true;
                self.adopted = true;
                Ok(())
            }
            None => {
                self.adopted = false;
                self.pg_ctl_start()
            }
        }
    }

    /// `initdb` the cluster (first run).
    fn initdb(&self) -> Result<(), PgError> {
        tracing::info!(pgdata = %self.pgdata.display(), "initdb");
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.pgdata).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if !self.opts.fsync {
            cmd.arg("--no-sync");
        }
        let out = cmd.output().map_err(|e| PgError::io("running initdb", e))?;
        if !out.status.success() {
            return Err(PgError::InitdbFailed {
                dir: self.pgdata.clone(),
                status: out.status.to_string(),
                output: output_text(&out),
            });
        }
        Ok(())
    }

    /// `pg_ctl start -w` on `self.port`. Retries for a few seconds while the shared memory of
    /// a killed server is still held by its exiting children.
    fn pg_ctl_start(&mut self) -> Result<(), PgError> {
        let settings = self.server_settings();
        let started = Instant::now();
        loop {
            let log_offset = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
            tracing::info!(port = self.port, data_dir = %self.data_dir.display(), "starting PostgreSQL");
            let out = self
                .command("pg_ctl")
                .arg("start")
                .arg("-D")
                .arg(&self.pgdata)
                .arg("-l")
                .arg(&self.log)
                .args(["-w", "-t"])
                .arg(TIMEOUT.as_secs().to_string())
                .arg("-o")
                .arg(&settings)
                .output()
                .map_err(|e| PgError::io("running pg_ctl start", e))?;
            if out.status.success() {
                self.running = true;
                return Ok(());
            }
            let log_tail = log_tail(&self.log, log_offset);
            if log_tail.contains("pre-existing shared memory block")
                && started.elapsed() < Duration::from_secs(15)
            {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            return Err(PgError::StartFailed {
                dir: self.pgdata.clone(),
                reason: format!(
                    "pg_ctl start exited with {}: {}",
                    out.status,
                    output_text(&out).trim()
                ),
                log: self.log.clone(),
                log_tail,
            });
        }
    }

    /// The `-o` argument of `pg_ctl start` (pg_ctl hands it to a shell, hence the quoting).
    /// Beyond the stock settings, a write-heavy telemetry store wants fewer checkpoints: with the
    /// stock 1 GB `max_wal_size` they came every 12-21 s under load (tuning/ingest.md). The
    /// socket is owner-only, as the dir it is in (see [`make_private`]).
    fn server_settings(&self) -> String {
        let onoff = |b: bool| if b { "on" } else { "off" };
        let socket_dir = self.socket_dir.to_string_lossy();
        // unix_socket_directories is a list: double-quote the element, then shell-quote it.
        let socket_list = format!("\"{}\"", socket_dir.replace('"', "\"\""));
        format!(
            "-p {} -c listen_addresses='' -c unix_socket_directories={} \
             -c unix_socket_permissions={:04o} -c shared_buffers={}MB -c fsync={} \
             -c full_page_writes={} -c max_wal_size=4GB -c checkpoint_timeout=15min \
             -c wal_buffers=32MB",
            self.port,
            sh_quote(&socket_list),
            PRIVATE_MODE,
            self.opts.shared_buffers_mb,
            onoff(self.opts.fsync),
            onoff(self.opts.fsync),
        )
    }

    /// If a server runs on `pgdata`, wait until it is ready and return its pid file; `None`
    /// if none runs. A stale pid file of a dead server is left to `pg_ctl start`, except when
    /// its pid still exists as something else (a zombie nobody reaped, or an unrelated process
    /// after a reboot), which PostgreSQL would take for a running server: that one is removed.
    /// (PostgreSQL's shared memory interlock still refuses to start while processes of the
    /// old server live.)
    fn wait_for_running_server(&self) -> Result<Option<PidFile>, PgError> {
        let started = Instant::now();
        loop {
            let pid_file = match read_pid_file(&self.pgdata)? {
                PidFileState::Absent => return Ok(None),
                PidFileState::Stale { pid } if pid > 0 => {
                    if pid_exists(pid) {
                        let path = self.pgdata.join("postmaster.pid");
                        tracing::warn!(pid, path = %path.display(), "removing a stale pid file");
                        match fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => {
                                return Err(PgError::io(format!("removing {}", path.display()), e))
                            }
                        }
                    }
                    return Ok(None);
                }
                // No pid in it: a server writing it right now, or the remnant of a crash
                // during startup (which PostgreSQL refuses to start over): look again, and
                // remove it if it stays that way.
                PidFileState::Stale { .. } if started.elapsed() > Duration::from_secs(5) => {
                    let path = self.pgdata.join("postmaster.pid");
                    tracing::warn!(path = %path.display(), "removing an empty pid file");
                    let _ = fs::remove_file(&path);
                    return Ok(None);
                }
                PidFileState::Stale { .. } => None,
                PidFileState::Live(p) => Some(p),
            };
            if let Some(pid_file) = pid_file {
                if pid_file.status.as_deref() == Some("ready") && pid_file.port != 0 {
                    return Ok(Some(pid_file));
                }
            }
            if started.elapsed() > TIMEOUT {
                return Err(PgError::StartFailed {
                    dir: self.pgdata.clone(),
                    reason: format!(
                        "a server from an earlier run is running but did not become ready \
                         within {}s (see {}/postmaster.pid)",
                        TIMEOUT.as_secs(),
                        self.pgdata.display()
                    ),
                    log: self.log.clone(),
                    log_tail: log_tail(&self.log, 0),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Create database `fleetgate` if it is missing.
    fn ensure_database(&self) -> Result<(), PgError> {
        let url = self.connection_string_for("postgres");
        let result = super::run_blocking(async move {
            let client = super::connect_with_retry(&url, Duration::from_secs(30)).await?;
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
                .await
                .map_err(|e| PgError::db("looking up database fleetgate", e))?
                .is_some();
            if !exists {
                let sql = format!("CREATE DATABASE {DATABASE}");
                match client.batch_execute(&sql).await {
                    Ok(()) => tracing::info!("created database {DATABASE}"),
                    Err(e)
                        if e.code()
                            == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
                    Err(e) => return Err(PgError::db("creating database fleetgate", e)),
                }
            }
            Ok(())
        })?;
        result.map_err(|e| match e {
            PgError::Db { what, source } => PgError::StartFailed {
                dir: self.pgdata.clone(),
                reason: format!("{what}: {source}"),
                log: self.log.clone(),
                log_tail: log_tail(&self.log, 0),
            },
            other => other,
        })
    }

    /// A command for one of the server binaries, run as the server user when we are root.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGUSER")
            .env_remove("PGDATABASE")
            .env_remove("PGOPTIONS");
        if let Some(run_as) = self.run_as {
            cmd.uid(run_as.uid).gid(run_as.gid);
        }
        cmd
    }
}

impl Drop for ManagedPostgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping the managed PostgreSQL on drop failed");
        }
    }
}

/// Where the PostgreSQL server binaries are: `$FLEETGATE_PG_BIN`, else the highest
/// `/usr/lib/postgresql/*/bin` holding them, else `pg_config --bindir`, else `PATH`.
pub fn find_bin_dir() -> Result<PathBuf, PgError> {
    find_bin_dir_from(std::env::var_os("FLEETGATE_PG_BIN"))
}

/// [`find_bin_dir`] with the value of `FLEETGATE_PG_BIN` passed in (`None`: unset). When set
/// (and not empty) it must hold the binaries: there is no fallback then.
pub fn find_bin_dir_from(fleetgate_pg_bin: Option<OsString>) -> Result<PathBuf, PgError> {
    if let Some(value) = fleetgate_pg_bin.filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(value);
        let missing = missing_binaries(&dir);
        if missing.is_empty() {
            return Ok(dir);
        }
        return Err(PgError::BinariesNotFound {
            detail: format!(
                "FLEETGATE_PG_BIN={} does not hold {}",
                dir.display(),
                missing.join(", ")
            ),
        });
    }

    // Debian/Ubuntu layout: /usr/lib/postgresql/<version>/bin, highest version first.
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let version = name
                    .split('.')
                    .map(|p| p.parse::<u32>().ok())
                    .collect::<Option<Vec<u32>>>()?;
                Some((version, e.path().join("bin")))
            })
            .collect();
        versions.sort();
        if let Some((_, dir)) = versions
            .into_iter()
            .rev()
            .find(|(_, dir)| missing_binaries(dir).is_empty())
        {
            return Ok(dir);
        }
    }

    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if missing_binaries(&dir).is_empty() {
                return Ok(dir);
            }
        }
    }

    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| missing_binaries(d).is_empty()) {
            return Ok(dir);
        }
    }

    Err(PgError::BinariesNotFound {
        detail: "looked in $FLEETGATE_PG_BIN (unset), /usr/lib/postgresql/*/bin, \
                 `pg_config --bindir` and PATH"
            .to_string(),
    })
}

/// The server binaries `dir` lacks (as executable files).
fn missing_binaries(dir: &Path) -> Vec<&'static str> {
    SERVER_BINARIES
        .iter()
        .copied()
        .filter(|name| {
            !fs::metadata(dir.join(name))
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .collect()
}

/// The `postgres` user when we are root (PostgreSQL refuses to run as root), else `None`.
fn server_user() -> Result<Option<RunAs>, PgError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    lookup_user(SERVER_USER)
        .map(Some)
        .ok_or(PgError::NoPostgresUser)
}

/// uid and primary gid of user `name` (getpwnam_r: thread-safe).
fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    let mut buf_len = 4096usize;
    loop {
        let mut buf = vec![0 as libc::c_char; buf_len];
        // SAFETY: an all-zero passwd is a valid value (null pointers, zero ids).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the duration of the call and buf_len is buf's
        // length; on success `result` points at `pwd`, whose strings live in `buf`.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf_len < 1 << 20 {
            buf_len *= 4;
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        return Some(RunAs {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        });
    }
}

/// The server user must be able to enter every ancestor of `data_dir` (the data dir itself is
/// theirs, see [`make_private`]).
fn check_traversable(data_dir: &Path, run_as: RunAs) -> Result<(), PgError> {
    for dir in data_dir.ancestors().skip(1) {
        let meta = fs::metadata(dir)
            .map_err(|e| PgError::io(format!("inspecting {}", dir.display()), e))?;
        let mode = meta.mode();
        let bit = if meta.uid() == run_as.uid {
            0o100
        } else if meta.gid() == run_as.gid {
            0o010
        } else {
            0o001
        };
        if mode & bit == 0 {
            return Err(PgError::NotTraversable {
                user: SERVER_USER.to_string(),
                dir: dir.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
    }
    Ok(())
}

/// Mode 0700 on the data dir, which holds the socket: with trust authentication, reaching the
/// socket is being the database superuser, so only the dir's owner (the user the server runs
/// as) and root may enter it. The socket is 0700 too, but a server adopted from an earlier
/// version has a 0777 one, and those versions left the dir world-traversable: tightened here,
/// before the server is started or adopted.
fn make_private(data_dir: &Path) -> Result<(), PgError> {
    let mode = fs::metadata(data_dir)
        .map_err(|e| PgError::io(format!("inspecting {}", data_dir.display()), e))?
        .mode()
        & 0o7777;
    if mode == PRIVATE_MODE {
        return Ok(());
    }
    tracing::info!(data_dir = %data_dir.display(), from = format!("{mode:04o}"), "Making the data dir private (mode 0700).");
    fs::set_permissions(data_dir, fs::Permissions::from_mode(PRIVATE_MODE)).map_err(|e| {
        PgError::io(
            format!(
                "making the data dir {} private (mode 0700; it must belong to the user fleetgate \
                 runs as)",
                data_dir.display()
            ),
            e,
        )
    })
}

/// Give `path` (and, with `recursive`, everything under it) to the server user, if it exists
/// and is not theirs already.
fn chown_if_needed(path: &Path, run_as: RunAs, recursive: bool) -> Result<(), PgError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(PgError::io(format!("inspecting {}", path.display()), e)),
    };
    if meta.uid() == run_as.uid && meta.gid() == run_as.gid {
        return Ok(());
    }
    chown_tree(path, run_as, recursive)
}

fn chown_tree(path: &Path, run_as: RunAs, recursive: bool) -> Result<(), PgError> {
    std::os::unix::fs::lchown(path, Some(run_as.uid), Some(run_as.gid)).map_err(|e| {
        PgError::io(
            format!("giving {} to user {SERVER_USER}", path.display()),
            e,
        )
    })?;
    if recursive
        && fs::symlink_metadata(path)
            .map(|m| m.is_dir())
            .unwrap_or(false)
    {
        let entries = fs::read_dir(path)
            .map_err(|e| PgError::io(format!("listing {}", path.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| PgError::io(format!("listing {}", path.display()), e))?;
            chown_tree(&entry.path(), run_as, true)?;
        }
    }
    Ok(())
}

/// Pick a port number nobody listens on (bind 127.0.0.1:0). The server does not listen on
/// TCP; the number only names its socket, but a free one avoids confusing anybody.
fn free_port() -> Result<u16, PgError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| PgError::io("picking a free port", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| PgError::io("picking a free port", e))?
        .port();
    Ok(port)
}

/// The fields of `postmaster.pid` we use.
#[derive(Debug)]
struct PidFile {
    pid: i32,
    port: u16,
    socket_dir: Option<PathBuf>,
    status: Option<String>,
}

/// What `postmaster.pid` says.
#[derive(Debug)]
enum PidFileState {
    /// No pid file: no server.
    Absent,
    /// A pid file naming process `pid`, which is not a live postgres server.
    Stale { pid: i32 },
    /// A live server.
    Live(PidFile),
}

/// Read `postmaster.pid` and check whether its server is alive.
fn read_pid_file(pgdata: &Path) -> Result<PidFileState, PgError> {
    let path = pgdata.join("postmaster.pid");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PidFileState::Absent),
        Err(e) => return Err(PgError::io(format!("reading {}", path.display()), e)),
    };
    // Lines: pid, data dir, start time, port, socket dir, listen address, shmem key, status.
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let pid = match lines.first().and_then(|l| l.parse::<i32>().ok()) {
        Some(pid) if pid > 0 => pid,
        // Empty or half-written: a server is creating it right now, or it is garbage.
        _ => return Ok(PidFileState::Stale { pid: 0 }),
    };
    if !postgres_alive(pid) {
        return Ok(PidFileState::Stale { pid });
    }
    Ok(PidFileState::Live(PidFile {
        pid,
        port: lines.get(3).and_then(|l| l.parse().ok()).unwrap_or(0),
        socket_dir: lines
            .get(4)
            .filter(|l| !l.is_empty())
            .map(|l| PathBuf::from(*l)),
        status: lines
            .get(7)
            .filter(|l| !l.is_empty())
            .map(|l| l.to_string()),
    }))
}

/// Whether process `pid` is a live postgres server, as far as /proc tells: a pid file surviving
/// a reboot may name an unrelated process, and a killed server nobody reaped is a zombie.
fn postgres_alive(pid: i32) -> bool {
    if !pid_exists(pid) {
        return false;
    }
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.trim_start().chars().next());
        if matches!(state, Some('Z') | Some('X') | Some('x')) {
            return false;
        }
    }
    match fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(exe) => exe
            .file_name()
            .map(|n| n.to_string_lossy().starts_with("postgres"))
            .unwrap_or(false),
        Err(_) => true,
    }
}

/// Whether `kill(pid, 0)` finds the process (what PostgreSQL itself checks for its lock file).
fn pid_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The last lines of the log written since byte `offset`.
fn log_tail(log: &Path, offset: u64) -> String {
    const MAX_BYTES: u64 = 8192;
    const MAX_LINES: usize = 40;
    let Ok(mut file) = fs::File::open(log) else {
        return format!("(no log at {})", log.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.min(len).max(len.saturating_sub(MAX_BYTES));
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return format!("(cannot read {})", log.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(MAX_LINES)..].join("\n")
}

/// stdout and stderr of a finished command.
fn output_text(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

/// Quote for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Quote a libpq-style connection string value if it needs it.
fn conninfo_quote(s: &str) -> String {
    if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return s.to_string();
    }
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
        assert_eq!(conninfo_quote("/tmp/x"), "/tmp/x");
        assert_eq!(conninfo_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(conninfo_quote("it's"), "'it\\'s'");
    }

    #[test]
    fn env_dir_without_binaries_is_a_clear_error() {
        let dir = std::env::temp_dir();
        let err = find_bin_dir_from(Some(dir.into_os_string())).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("FLEETGATE_PG_BIN"), "{msg}");
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
    }
}

//! The test harness every integration test shares: a real, throwaway PostgreSQL cluster per
//! test (`TestPg::start`), in a fresh temp dir, with the migrations applied.
#![allow(dead_code)]

pub mod gateway;
pub mod receiver;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use fleetgate::pg::{migrate_blocking, ManagedPostgres, PgOptions};

/// A directory removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A fresh directory under `std::env::temp_dir()` with a short unique name (unix socket
    /// paths must stay under 108 bytes, and the cluster's socket lives in it).
    pub fn new() -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for _ in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "fg{}-{}-{:x}",
                std::process::id(),
                n,
                nanos % 0x10000
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("creating temp dir {}: {e}", path.display()),
            }
        }
        panic!("could not create a unique temp dir");
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Options for test clusters: fsync off (speed), small shared_buffers (many clusters at once).
pub fn test_options() -> PgOptions {
    PgOptions {
        fsync: false,
        shared_buffers_mb: 16,
    }
}

/// A managed cluster in its own temp dir, migrations applied. Stops the server, then removes
/// the dir, on drop.
pub struct TestPg {
    pub pg: ManagedPostgres,
    _dir: TempDir,
}

impl TestPg {
    /// Start a fresh cluster and apply the migrations; panics (failing the test) on error.
    pub fn start() -> TestPg {
        let dir = TempDir::new();
        let pg = ManagedPostgres::start(dir.path(), &test_options())
            .unwrap_or_else(|e| panic!("starting the test PostgreSQL: {e}"));
        migrate_blocking(&pg.connection_string())
            .unwrap_or_else(|e| panic!("migrating the test database: {e}"));
        TestPg { pg, _dir: dir }
    }

    /// tokio-postgres connection string of database `fleetgate`.
    pub fn url(&self) -> String {
        self.pg.connection_string()
    }

    /// The temp dir the cluster lives in.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// A connection to database `fleetgate`, driven on the current tokio runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }

    /// Runs `sql` on a fresh connection (from a test thread, not inside a runtime); panics
    /// with the statement on error.
    pub fn rows(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        block_on(async {
            self.client()
                .await
                .query(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
    }

    /// The first column (an int8) of the first row of `sql`.
    pub fn scalar(&self, sql: &str) -> i64 {
        self.rows(sql)
            .first()
            .unwrap_or_else(|| panic!("{sql}: no row"))
            .get(0)
    }

    /// Runs statements for their effect.
    pub fn execute(&self, sql: &str) {
        block_on(async {
            self.client()
                .await
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
    }
}

/// Runs `f` to completion on a runtime of its own (from a test thread, not inside one).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

impl Drop for TestPg {
    fn drop(&mut self) {
        // Stop before the dir goes away (fields drop after this, `pg` first, a no-op then).
        if let Err(e) = self.pg.stop() {
            eprintln!("stopping the test PostgreSQL: {e}");
        }
    }
}

/// Connect to `url` and spawn the connection on the current tokio runtime.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

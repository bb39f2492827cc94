//! Who may connect to the managed PostgreSQL. Its authentication is `trust` on a unix socket, so
//! whoever reaches the socket is the database superuser: only fleetgate's own OS user (and
//! root) may. Checked by running `psql` as user `nobody` against real clusters.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{connect, test_options, TempDir, TestPg};
use fleetgate::pg::ManagedPostgres;

/// uid and gid of `nobody`: another local user, with no business in the database.
const NOBODY: u32 = 65534;

/// Whether we are root, the only way to act as another user here.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `psql` from the cluster's own bin dir, asking the server who we are; as uid and gid `uid`
/// when given, else as ourselves.
fn psql(pg: &ManagedPostgres, uid: Option<u32>) -> Output {
    let mut cmd = Command::new(pg.bin_dir().join("psql"));
    cmd.args(["-X", "-w", "-At", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string()])
        .args([
            "-U",
            "fleetgate",
            "-d",
            "fleetgate",
            "-c",
            "SELECT current_user",
        ])
        // `nobody` may not enter our working directory, nor has it a home.
        .current_dir("/")
        .env("HOME", "/")
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .env_remove("PGSERVICE");
    if let Some(uid) = uid {
        // As root, std drops the supplementary groups too (setgroups(0)).
        cmd.uid(uid).gid(uid);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("running {}: {e}", pg.bin_dir().join("psql").display()))
}

/// Asserts that `nobody` is refused at the socket, and that we still get in as `fleetgate`.
fn assert_only_we_connect(pg: &ManagedPostgres) {
    let theirs = psql(pg, Some(NOBODY));
    let stderr = String::from_utf8_lossy(&theirs.stderr);
    assert!(
        !theirs.status.success(),
        "user nobody connected to the managed PostgreSQL: {} {stderr}",
        String::from_utf8_lossy(&theirs.stdout).trim()
    );
    // Refused by the file system, not by something unrelated (a psql that cannot run, a
    // server that is down): our own psql just below connects.
    assert!(stderr.contains("Permission denied"), "{stderr}");

    let ours = psql(pg, None);
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ours.stdout).trim(), "fleetgate");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test]
async fn another_local_user_cannot_connect_but_fleetgate_can() {
    if !is_root() {
        eprintln!("skipped: acting as another user (nobody) needs root");
        return;
    }
    let t = TestPg::start();
    assert_only_we_connect(&t.pg);
    // The gateway's own connection (tokio-postgres, as the writer makes it).
    let client = t.client().await;
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "fleetgate");
    assert_eq!(mode(t.pg.data_dir()), 0o700);
}

#[tokio::test]
async fn a_data_dir_left_open_by_an_earlier_version_is_made_private() {
    if !is_root() {
        eprintln!("skipped: acting as another user (nobody) needs root");
        return;
    }
    let dir = TempDir::new();
    let mut first = ManagedPostgres::start(dir.path(), &test_options()).unwrap();
    first.stop().unwrap();
    drop(first);
    // As earlier versions left it: world-readable and world-traversable.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let pg = ManagedPostgres::start(dir.path(), &test_options()).unwrap();
    assert!(!pg.was_adopted());
    assert_only_we_connect(&pg);
    assert_eq!(mode(pg.data_dir()), 0o700);
    let client = connect(&pg.connection_string()).await;
    client.simple_query("SELECT 1").await.unwrap();

    // Should the dir be opened up again while the server runs, the socket itself still
    // refuses other users.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_only_we_connect(&pg);
}

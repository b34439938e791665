//! A private PostgreSQL cluster: `initdb` into a temporary directory, served
//! on a free loopback port with fsync on and every connection logged, and
//! removed when dropped. As root (initdb refuses root) the cluster belongs
//! to the `postgres` user, as in `scripts/dev-env.sh`.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use sqlx::PgPool;
use tokio::process::Command;

pub struct Postgres {
    pub port: u16,
    base: PathBuf,
    bindir: PathBuf,
}

fn is_root() -> bool {
    // `id -u` keeps the suite free of a libc dependency.
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (scripts/dev-env.sh installs them)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

/// `program args…`, as the `postgres` user when we are root.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

async fn run(mut command: Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A new directory `<prefix>-<uuid>` under the temporary directory, owned
/// by the user the cluster runs as.
async fn owned_dir(prefix: &str) -> PathBuf {
    let base = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&base).unwrap();
    if is_root() {
        let mut chown = Command::new("chown");
        chown.arg("postgres:postgres").arg(&base);
        run(chown, "chown").await;
    }
    base
}

impl Postgres {
    /// A new cluster, started, with the schema migrated.
    pub async fn start() -> Self {
        let pg = Self {
            port: super::free_port(),
            base: owned_dir("datagate-faults-pg").await,
            bindir: bindir(),
        };
        // --no-sync only skips initdb's final flush of the fresh files (the
        // machine does not crash here); the server itself runs with fsync on.
        let mut initdb = as_owner(&pg.bindir.join("initdb"));
        initdb.arg("-D").arg(pg.data()).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        run(initdb, "initdb").await;
        pg.start_again().await;
        let pool = PgPool::connect(&pg.url())
            .await
            .expect("connect to the private PostgreSQL");
        datagate::store::postgres::migrate_up(&pool)
            .await
            .expect("migrate");
        pool.close().await;
        pg
    }

    /// A streaming replica of `primary` (`pg_basebackup -R`: a hot standby
    /// that follows it), started on a port of its own. The primary's trust
    /// authentication admits replication from loopback.
    pub async fn replica_of(primary: &Self) -> Self {
        let replica = Self {
            port: super::free_port(),
            base: owned_dir("datagate-faults-pg-replica").await,
            bindir: primary.bindir.clone(),
        };
        let mut backup = as_owner(&replica.bindir.join("pg_basebackup"));
        backup.arg("-D").arg(replica.data()).args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "--no-sync",
        ]);
        run(backup, "pg_basebackup").await;
        replica.start_again().await;
        replica
    }

    fn data(&self) -> PathBuf {
        self.base.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.base.join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A pool for arranging and checking state (not the service's).
    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url())
            .await
            .expect("connect to the private PostgreSQL")
    }

    /// `pg_ctl start`, waiting until it accepts connections (crash recovery included).
    pub async fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on -c max_connections=200 \
             -c shared_buffers=32MB -c log_connections=on",
            self.port,
            self.base.display()
        );
        let mut start = as_owner(&self.bindir.join("pg_ctl"));
        start
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "120", "start", "-o", &options]);
        run(start, "pg_ctl start").await;
    }

    /// `pg_ctl stop -m immediate`: every backend is killed without a
    /// checkpoint; the next start runs crash recovery.
    pub async fn stop_immediate(&self) {
        let mut stop = as_owner(&self.bindir.join("pg_ctl"));
        stop.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"]);
        run(stop, "pg_ctl stop -m immediate").await;
    }

    /// Datagate's backends waiting on a lock now.
    /// A session of the test's own holding `FOR UPDATE` on one product's
    /// inventory row until the transaction is dropped or rolled back.
    pub async fn lock_inventory(
        &self,
        db: &PgPool,
        product: i64,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut holder = db.begin().await.unwrap();
        sqlx::query("SELECT quantity FROM inventory WHERE product_id = $1 FOR UPDATE")
            .bind(product)
            .execute(&mut *holder)
            .await
            .unwrap();
        holder
    }

    pub async fn datagate_lock_waiters(&self, db: &PgPool) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'datagate' AND wait_event_type = 'Lock'",
        )
        .fetch_one(db)
        .await
        .unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pg_ctl = self.bindir.join("pg_ctl");
        let mut stop = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            std::process::Command::new(pg_ctl)
        };
        let _ = stop
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if std::env::var_os("KEEP_FAULT_SERVERS").is_some() {
            eprintln!("kept {}", self.base.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

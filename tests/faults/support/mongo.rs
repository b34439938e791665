//! A private nx-27017 (the MongoDB-compatible server of the development
//! environment) on a free loopback port, its data in a temporary directory
//! that outlives a kill, so a restart on the same port finds the documents
//! again. Removed when dropped (`KEEP_FAULT_SERVERS=1` keeps the directory).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::{Child, Command};

pub struct Mongo {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// `nx-27017` on PATH (`make test-faults` puts the development venv there),
/// else the development venv's.
fn program() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nx-27017"))
            .find(|p| p.exists())
    });
    on_path.unwrap_or_else(|| {
        let dev = std::env::var_os("DATAGATE_DEV_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev"),
            PathBuf::from,
        );
        dev.join("venv/bin/nx-27017")
    })
}

impl Mongo {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "datagate-faults-mongo-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let mut mongo = Self {
            port: super::free_port(),
            dir,
            child: None,
        };
        mongo.start_again().await;
        mongo
    }

    pub fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and data directory.
    pub async fn start_again(&mut self) {
        let program = program();
        let child = Command::new(&program)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--host", "127.0.0.1", "-p", &self.port.to_string()])
            // Its own pid and log files: the defaults are shared paths.
            .arg("--pid-file")
            .arg(self.dir.join("nx.pid"))
            .arg("--log-file")
            .arg(self.dir.join("nx.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} (scripts/dev-env.sh installs nx-27017): {e}",
                    program.display()
                )
            });
        self.child = Some(child);
        let port = self.port;
        super::wait_until("nx-27017 listens", Duration::from_secs(20), async || {
            super::port_open(port).await
        })
        .await;
    }

    /// SIGKILL, and reaps the process; the data directory stays.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}

impl Drop for Mongo {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        if std::env::var_os("KEEP_FAULT_SERVERS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

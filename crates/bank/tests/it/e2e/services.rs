//! The services under test: the real `bank` binary, started as `bank accounts …` or
//! `bank statements …` on a loopback port of its own, killed with SIGKILL and started again on
//! the same port with the same data (directory or database). Its output goes to a log file that a
//! failing test shows the end of.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http::Http;

/// The binary under test.
const BANK: &str = env!("CARGO_BIN_EXE_bank");
/// The longest a service may take to answer HTTP after it was started, in seconds.
pub(crate) const READY_SECS_MAX: u64 = 30;
/// How often the readiness check asks, in milliseconds.
const READY_POLL_MILLIS: u64 = 20;
/// How much of a log a failure shows, in bytes.
const LOG_TAIL_BYTES: u64 = 6 * 1024;

/// One service process (running or not) and how to start it again.
#[derive(Debug)]
pub(crate) struct Service {
    /// `accounts-1`, `statements` …: in the test's messages and the log's name.
    pub(crate) name: String,
    args: Vec<String>,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
    pub(crate) starts: u32,
    pub(crate) kills: u32,
}

impl Service {
    /// A service run as `bank {args} --listen 127.0.0.1:{port}`, not started yet; its output
    /// goes to `{dir}/{name}.log`.
    pub(crate) fn new(name: &str, args: Vec<String>, port: u16, dir: &Path) -> Service {
        Service {
            name: name.to_owned(),
            args,
            port,
            log: dir.join(format!("{name}.log")),
            child: None,
            starts: 0,
            kills: 0,
        }
    }

    /// `http://127.0.0.1:{port}`.
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts the process (it must not run). Use [`Service::wait_ready`] next.
    pub(crate) fn start(&mut self) {
        assert!(self.child.is_none(), "{} runs already", self.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BANK)
            .args(&self.args)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .env(
                "RUST_LOG",
                std::env::var("BANK_E2E_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {BANK} for {}: {e}", self.name));
        self.child = Some(child);
        self.starts += 1;
    }

    /// Waits (bounded) until the service answers HTTP — any answer: it listens once it serves.
    /// Panics, with its log, when it exited or did not answer in time.
    pub(crate) async fn wait_ready(&mut self, http: &Http) {
        let deadline = Instant::now() + Duration::from_secs(READY_SECS_MAX);
        let url = format!("{}/metrics", self.url());
        loop {
            if http
                .get(&url, None, Duration::from_millis(500))
                .await
                .is_ok()
            {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                panic!(
                    "{} exited while starting ({status}); its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer on port {} within {READY_SECS_MAX} s; its log:\n{}",
                self.name,
                self.port,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(READY_POLL_MILLIS)).await;
        }
    }

    /// Kills the process with SIGKILL and reaps it. Panics when it had exited by itself.
    pub(crate) fn kill(&mut self) {
        let mut child = self.child.take().expect("a running service");
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "{} exited by itself ({status}) before it was killed; its log:\n{}",
                self.name,
                self.log_tail()
            );
        }
        // `Child::kill` is SIGKILL on Unix.
        child.kill().unwrap();
        child.wait().unwrap();
        self.kills += 1;
    }

    /// Whether the process exited by itself (a crash): its status.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Forgets a process that exited by itself (seen by [`Service::exited`]): it may start again.
    pub(crate) fn reap(&mut self) {
        self.child = None;
    }

    /// The end of its log (all its starts).
    pub(crate) fn log_tail(&self) -> String {
        let Ok(mut file) = File::open(&self.log) else {
            return String::from("(no log)");
        };
        let length = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES)));
        let mut tail = Vec::new();
        let _ = file.read_to_end(&mut tail);
        String::from_utf8_lossy(&tail).into_owned()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

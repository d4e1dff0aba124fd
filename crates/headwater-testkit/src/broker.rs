//! Private broker processes for tests: a RabbitMQ node or a NATS server with JetStream of the
//! test's own, on loopback on free ports, with its data in a temporary directory — to stop,
//! kill (SIGKILL) and start again on the same port and data without disturbing the brokers other
//! tests share (scripts/lib/rabbitmq.sh and nats.sh start those the same way).
//!
//! Every process is ended by its id (its process group), never by name; dropping a
//! [`BrokerProcess`] kills what it started and removes its directory.
//!
//! RabbitMQ takes seconds to boot: start at most one node per test.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `rabbitmq-server` package puts the server's scripts.
pub const RABBITMQ_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";
/// The longest a RabbitMQ node may take to accept connections, in seconds.
pub const RABBITMQ_START_SECS_MAX: u64 = 60;
/// The longest a NATS server may take to accept connections, in seconds.
pub const NATS_START_SECS_MAX: u64 = 20;
/// The longest a graceful stop may take before the process group is killed, in seconds.
pub const STOP_SECS_MAX: u64 = 30;
/// How long a readiness check waits for the broker's greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a wait checks again, in milliseconds.
const POLL_MILLIS: u64 = 20;
/// How much of the server's log a failure shows, in bytes.
const LOG_TAIL_BYTES: usize = 8 * 1024;

/// Which broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerKind {
    /// A RabbitMQ node (Debian's `rabbitmq-server`), AMQP 0-9-1.
    RabbitMq,
    /// `nats-server -js`: NATS with JetStream, file storage.
    Nats,
}

/// A broker process of the test's own. Not running after [`BrokerProcess::unstarted`] and after
/// [`stop`](BrokerProcess::stop) / [`kill`](BrokerProcess::kill); its port and data stay for
/// [`start_again`](BrokerProcess::start_again).
///
/// Panics on any failure: it is test support.
#[derive(Debug)]
pub struct BrokerProcess {
    kind: BrokerKind,
    dir: tempfile::TempDir,
    /// The client port (AMQP or NATS).
    port: u16,
    /// RabbitMQ only: the Erlang distribution port and the node's own epmd port.
    dist_port: u16,
    epmd_port: u16,
    /// RabbitMQ only: the node name (its mnesia directory is named after it).
    node: String,
    /// The running server (the leader of its own process group), if any.
    child: Option<Child>,
    /// Starts so far.
    starts: u32,
}

impl BrokerProcess {
    /// Starts a broker and waits (bounded) until it accepts connections.
    pub fn start(kind: BrokerKind) -> BrokerProcess {
        let mut broker = BrokerProcess::unstarted(kind);
        broker.start_again();
        broker
    }

    /// A RabbitMQ node, started.
    pub fn rabbitmq() -> BrokerProcess {
        BrokerProcess::start(BrokerKind::RabbitMq)
    }

    /// A NATS server with JetStream, started.
    pub fn nats() -> BrokerProcess {
        BrokerProcess::start(BrokerKind::Nats)
    }

    /// A broker with its ports and data directory chosen but not started: nothing listens on
    /// [`url`](BrokerProcess::url) until [`start_again`](BrokerProcess::start_again). Panics
    /// when the broker's binary is missing (tests needing a broker fail loudly).
    pub fn unstarted(kind: BrokerKind) -> BrokerProcess {
        let program = program(kind);
        assert!(
            program.exists(),
            "{} is missing: install Debian's {} package (scripts/test does)",
            program.display(),
            match kind {
                BrokerKind::RabbitMq => "rabbitmq-server",
                BrokerKind::Nats => "nats-server",
            }
        );
        let dir = tempfile::Builder::new()
            .prefix(match kind {
                BrokerKind::RabbitMq => "headwater-rabbitmq-test.",
                BrokerKind::Nats => "headwater-nats-test.",
            })
            .tempdir()
            .unwrap();
        let [port, dist_port, epmd_port] = free_ports();
        let unique = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .rsplit('.')
            .next()
            .unwrap()
            .to_ascii_lowercase();
        let node = format!("hwt-{unique}@localhost");
        if kind == BrokerKind::RabbitMq {
            let dir = dir.path();
            std::fs::create_dir_all(dir.join("mnesia")).unwrap();
            std::fs::create_dir_all(dir.join("log")).unwrap();
            std::fs::write(dir.join("rabbitmq.conf"), "loopback_users = none\n").unwrap();
            std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
            std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        }
        BrokerProcess {
            kind,
            dir,
            port,
            dist_port,
            epmd_port,
            node,
            child: None,
            starts: 0,
        }
    }

    /// RabbitMQ: definitions (exchanges, queues, bindings … in the JSON of
    /// `rabbitmqctl export_definitions`) the node imports when it boots, before it accepts
    /// connections — topology that exists before any client can publish. Call before the start.
    pub fn rabbitmq_definitions(&mut self, json: &str) {
        assert_eq!(
            self.kind,
            BrokerKind::RabbitMq,
            "definitions are RabbitMQ's"
        );
        assert!(self.child.is_none(), "definitions are imported at boot");
        let dir = self.dir.path();
        let path = dir.join("definitions.json");
        std::fs::write(&path, json).unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "loopback_users = none\nload_definitions = {}\n",
                path.display()
            ),
        )
        .unwrap();
    }

    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    /// The URL clients connect to: `amqp://guest:guest@127.0.0.1:{port}/%2f` or
    /// `nats://127.0.0.1:{port}`. The same across restarts.
    pub fn url(&self) -> String {
        match self.kind {
            BrokerKind::RabbitMq => format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port),
            BrokerKind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// RabbitMQ: the port of the node's own epmd (which outlives the node until the drop).
    pub fn epmd_port(&self) -> Option<u16> {
        (self.kind == BrokerKind::RabbitMq).then_some(self.epmd_port)
    }

    /// The broker's data directory (mnesia or the JetStream store) and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Starts the broker (again) on the same port with the same data (what it had persisted
    /// survives), and waits (bounded) until it accepts connections. Panics if it is running.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let log_path = self.log_path();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut command = Command::new(program(self.kind));
        match self.kind {
            BrokerKind::RabbitMq => {
                self.rabbitmq_env(&mut command);
            }
            BrokerKind::Nats => {
                command.args([
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-sd",
                    &self.dir.path().join("jetstream").display().to_string(),
                ]);
            }
        }
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group: the RabbitMQ script runs the VM as a child, and both are
            // ended together by the group's id.
            .process_group(0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", self.kind));
        self.child = Some(child);
        self.starts += 1;
        let limit = Duration::from_secs(match self.kind {
            BrokerKind::RabbitMq => RABBITMQ_START_SECS_MAX,
            BrokerKind::Nats => NATS_START_SECS_MAX,
        });
        let deadline = Instant::now() + limit;
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if greets(self.kind, address) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{:?} exited while starting ({status}); its log:\n{}",
                    self.kind,
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                let log = self.log_tail();
                self.kill();
                panic!(
                    "{:?} did not accept connections on port {} within {limit:?}; its log:\n{log}",
                    self.kind, self.port
                );
            }
            std::thread::sleep(Duration::from_millis(POLL_MILLIS));
        }
    }

    /// Stops the broker gracefully (SIGTERM to its process group: RabbitMQ and NATS both shut
    /// down cleanly on it) and waits until it exited; after [`STOP_SECS_MAX`] it is killed.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            panic!("the broker is not running");
        };
        signal_group(&child, "TERM");
        let deadline = Instant::now() + Duration::from_secs(STOP_SECS_MAX);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                signal_group(&child, "KILL");
                child.wait().unwrap();
                panic!(
                    "{:?} did not stop within {STOP_SECS_MAX}s of SIGTERM; killed",
                    self.kind
                );
            }
            std::thread::sleep(Duration::from_millis(POLL_MILLIS));
        }
        self.wait_port_closed();
    }

    /// Freezes the broker (SIGSTOP to its process group): its connections stay open and take
    /// what the kernel buffers, and nothing is answered — a broker that hangs. Then
    /// [`kill`](BrokerProcess::kill) it (SIGKILL ends a stopped process too) to lose what it had
    /// not processed.
    pub fn freeze(&mut self) {
        let Some(child) = &self.child else {
            panic!("the broker is not running");
        };
        signal_group(child, "STOP");
    }

    /// Kills the broker's process group with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            panic!("the broker is not running");
        };
        signal_group(&child, "KILL");
        child.wait().unwrap();
        self.wait_port_closed();
    }

    /// The last part of the server's log (all its starts), for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let from = log.len().saturating_sub(LOG_TAIL_BYTES);
        String::from_utf8_lossy(&log[from..]).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The members of the group may outlive its leader for a moment (the VM after the RabbitMQ
    /// script): wait until the port is free, so that a start again can bind it.
    fn wait_port_closed(&self) {
        let deadline = Instant::now() + Duration::from_secs(STOP_SECS_MAX);
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        while TcpStream::connect_timeout(&address, Duration::from_millis(POLL_MILLIS * 10)).is_ok()
        {
            assert!(
                Instant::now() < deadline,
                "port {} still answers {STOP_SECS_MAX}s after the broker ended",
                self.port
            );
            std::thread::sleep(Duration::from_millis(POLL_MILLIS));
        }
    }

    /// The environment of every RabbitMQ command of this node (server and epmd), as in
    /// scripts/lib/rabbitmq.sh.
    fn rabbitmq_env(&self, command: &mut Command) {
        let dir = self.dir.path();
        command
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"));
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(&child, "KILL");
            let _ = child.wait();
        }
        if self.kind == BrokerKind::RabbitMq && self.starts > 0 {
            self.kill_epmd();
        }
    }
}

impl BrokerProcess {
    /// Ends the node's epmd (started by the VM on ERL_EPMD_PORT, detached: it outlives the
    /// node). epmd refuses `-kill` while a node is registered, which a node killed an instant ago
    /// may still be: asked again until it answers `Killed` or is gone, for a bounded time.
    fn kill_epmd(&self) {
        let deadline = Instant::now() + Duration::from_secs(STOP_SECS_MAX);
        loop {
            let mut epmd = Command::new("epmd");
            self.rabbitmq_env(&mut epmd);
            let Ok(output) = epmd
                .args(["-port", &self.epmd_port.to_string(), "-kill"])
                .stdin(Stdio::null())
                .output()
            else {
                return;
            };
            let said = String::from_utf8_lossy(&output.stdout);
            // Otherwise `Killed`, or no epmd answers on that port (`Cannot connect to local
            // epmd`, on stderr).
            if !said.contains("not allowed") {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!("the epmd on port {} refuses to end: {said}", self.epmd_port);
                return;
            }
            std::thread::sleep(Duration::from_millis(POLL_MILLIS));
        }
    }
}

fn program(kind: BrokerKind) -> PathBuf {
    match kind {
        BrokerKind::RabbitMq => Path::new(RABBITMQ_BIN_DIR).join("rabbitmq-server"),
        BrokerKind::Nats => which("nats-server").unwrap_or_else(|| PathBuf::from("nats-server")),
    }
}

/// `name` in a directory of `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Whether the broker at `address` answers as its protocol says it does, not just accepts a TCP
/// connection (a RabbitMQ node may accept before it serves): RabbitMQ answers the AMQP 0-9-1
/// protocol header with a method frame (`connection.start`), NATS greets with `INFO`.
fn greets(kind: BrokerKind, address: SocketAddr) -> bool {
    let Ok(mut socket) = TcpStream::connect_timeout(&address, GREETING_TIMEOUT) else {
        return false;
    };
    if socket.set_read_timeout(Some(GREETING_TIMEOUT)).is_err() {
        return false;
    }
    let expected: &[u8] = match kind {
        BrokerKind::RabbitMq => {
            if socket.write_all(b"AMQP\x00\x00\x09\x01").is_err() {
                return false;
            }
            // A frame of type 1 (method) on channel 0.
            &[1, 0, 0]
        }
        BrokerKind::Nats => b"INFO",
    };
    let mut greeting = vec![0; expected.len()];
    socket.read_exact(&mut greeting).is_ok() && greeting == expected
}

/// Sends `signal` to the process group `child` leads (by its id, with `kill(1)`: no unsafe code
/// for `kill(2)`). A group already gone is fine.
fn signal_group(child: &Child, signal: &str) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &group])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `N` distinct ports that were free on 127.0.0.1 a moment ago (held at once, so they differ).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

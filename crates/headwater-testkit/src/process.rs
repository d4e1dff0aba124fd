//! Child processes for crash tests: the test binary re-executed to run one child test
//! function, its stdout read line by line, killed with SIGKILL.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Marks the lines of the child's stdout meant for the parent (libtest writes its own lines
/// there too, and `test name ... ` without a line end before the test runs).
const LINE_MARK: &str = "@@ ";

/// What the parent gets from a child's stdout: the text after [`LINE_MARK`] of whole lines only
/// (a line the child was killed in the middle of writing is dropped), then `Eof`.
#[derive(Debug)]
pub enum Output {
    Line(String),
    Eof,
}

/// A running child. Dropping it kills it (a failing parent leaves no process behind).
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    lines: mpsc::Receiver<Output>,
    reader: Option<JoinHandle<()>>,
}

impl ChildProcess {
    /// Runs the test function `test` (its path in this binary, e.g. `crash::child_appender`) in
    /// a new process of this test binary, with `env` set.
    pub fn spawn(test: &str, env: &[(&str, String)]) -> ChildProcess {
        let exe = std::env::current_exe().unwrap();
        let mut command = Command::new(&exe);
        command
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("running {} again: {e}", exe.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match stdout.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.ends_with(b"\n") => {
                        let text = String::from_utf8_lossy(&line);
                        let Some(at) = text.find(LINE_MARK) else {
                            continue;
                        };
                        let text = text[at + LINE_MARK.len()..].trim_end().to_owned();
                        if tx.send(Output::Line(text)).is_err() {
                            return;
                        }
                    }
                    // A partial last line: the child died writing it.
                    Ok(_) => break,
                }
            }
            let _ = tx.send(Output::Eof);
        });
        ChildProcess {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The next line, or `None` once `deadline` passed. Panics when the child's output ended.
    pub fn line_before(&mut self, deadline: Instant) -> Option<String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok(Output::Line(line)) => Some(line),
            Ok(Output::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().unwrap();
                panic!("the child ended its output before it was killed ({status})")
            }
            Err(mpsc::RecvTimeoutError::Timeout) => None,
        }
    }

    /// Waits up to `timeout` for a line starting with `prefix`, handing the lines before it to
    /// `other`; panics on timeout.
    pub fn wait_for(
        &mut self,
        prefix: &str,
        timeout: Duration,
        mut other: impl FnMut(&str),
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.line_before(deadline) {
                Some(line) if line.starts_with(prefix) => return line,
                Some(line) => other(&line),
                None => panic!("no {prefix:?} line from the child within {timeout:?}"),
            }
        }
    }

    /// SIGKILLs the child (it must still be running), reaps it, and returns every whole line
    /// it wrote that was not read yet.
    pub fn kill(mut self) -> Vec<String> {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the child exited by itself ({status}) before it was killed");
        }
        // `Child::kill` is SIGKILL on Unix.
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "{status}"
        );
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let mut rest = Vec::new();
        while let Ok(output) = self.lines.try_recv() {
            if let Output::Line(line) = output {
                rest.push(line);
            }
        }
        rest
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes one line to stdout and flushes it: once it is written, the parent may rely on it.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(LINE_MARK.as_bytes()).unwrap();
    out.write_all(line.as_bytes()).unwrap();
    out.write_all(b"\n").unwrap();
    out.flush().unwrap();
}

//! Processes started in lab namespaces, with their output read line by line.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One line a process printed on standard output, and when the lab read it.
#[derive(Clone, Debug)]
pub struct Event {
    /// When the line was read.
    pub at: Instant,
    /// The line.
    pub line: String,
}

impl Event {
    /// The line as JSON, if it is.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.line).ok()
    }

    /// The `event` field of a JSON line (`tscf client --json`).
    pub fn name(&self) -> Option<String> {
        self.json()
            .and_then(|v| v.get("event").and_then(|e| e.as_str().map(str::to_owned)))
    }
}

/// A process started by [`Lab::spawn`](super::Lab::spawn).
pub struct Proc {
    id: usize,
    what: String,
    lines: Receiver<Event>,
    seen: Vec<Event>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// The next line, waiting at most `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<Event> {
        match self.lines.recv_timeout(timeout) {
            Ok(e) => {
                self.seen.push(e.clone());
                Some(e)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Takes every line printed so far without waiting.
    pub fn drain(&mut self) {
        while let Ok(e) = self.lines.try_recv() {
            self.seen.push(e);
        }
    }

    /// Every line read so far (see [`drain`](Self::drain)).
    pub fn seen(&self) -> &[Event] {
        &self.seen
    }

    /// The names of the JSON events read so far.
    pub fn names(&self) -> Vec<String> {
        self.seen.iter().filter_map(Event::name).collect()
    }

    /// Reads lines until a JSON line with `"event": name` (returned), waiting at most
    /// `timeout` in all.
    pub fn wait_for(&mut self, name: &str, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self.next(left)?;
            if e.name().as_deref() == Some(name) {
                return Some(e);
            }
        }
    }

    /// Reads lines until one contains `text`, waiting at most `timeout` in all.
    pub fn wait_for_text(&mut self, text: &str, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self.next(left)?;
            if e.line.contains(text) {
                return Some(e);
            }
        }
    }

    /// Every line read so far, then standard error: for failure messages.
    pub fn transcript(&self) -> String {
        let mut out = format!("--- {} ---\n", self.what);
        for e in &self.seen {
            out.push_str(&e.line);
            out.push('\n');
        }
        let stderr = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        if !stderr.is_empty() {
            out.push_str("stderr:\n");
            out.push_str(&stderr);
        }
        out
    }
}

/// The children of a lab, killed when it goes.
#[derive(Default)]
pub(super) struct Children {
    running: Vec<(usize, Child)>,
    next_id: usize,
}

impl Children {
    pub(super) fn spawn(&mut self, mut cmd: Command, what: &str) -> Proc {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let (tx, lines) = channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let event = Event {
                        at: Instant::now(),
                        line,
                    };
                    if tx.send(event).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    let mut s = stderr.lock().unwrap_or_else(|e| e.into_inner());
                    // Bounded: the start of the output is what explains a failure.
                    if s.len() < 64 * 1024 {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.running.push((id, child));
        Proc {
            id,
            what: what.to_owned(),
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub(super) fn terminate(&mut self, proc: &Proc) -> Option<i32> {
        let pid = self
            .running
            .iter()
            .find(|(id, _)| *id == proc.id)
            .and_then(|(_, c)| rustix::process::Pid::from_raw(c.id() as i32))?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        self.wait(proc, Duration::from_secs(5))
    }

    pub(super) fn wait(&mut self, proc: &Proc, timeout: Duration) -> Option<i32> {
        let i = self.running.iter().position(|(id, _)| *id == proc.id)?;
        let (_, mut child) = self.running.remove(i);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }

    pub(super) fn kill_all(&mut self) {
        for (_, mut child) in self.running.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

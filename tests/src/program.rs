//! The real `tscf` program on loopback, for tests that look at it from outside (metrics
//! scraped by Prometheus, packet captures read by tshark): processes whose standard output is
//! read line by line as it comes, stopped with SIGTERM like an operator would, and a small
//! HTTP client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::lab::tscf_binary;

/// A running `tscf` process and the lines it printed so far.
pub struct Program {
    child: Option<Child>,
    lines: Receiver<String>,
    /// Every line read, in order.
    pub printed: Vec<String>,
    name: String,
}

impl Program {
    /// Starts `tscf args…` with standard output piped; `Err` if the binary is not built.
    pub fn start(name: &str, args: &[String]) -> Result<Self, String> {
        let binary = tscf_binary()?;
        let mut child = Command::new(binary)
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("tscf {args:?}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no standard output")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            child: Some(child),
            lines,
            printed: Vec::new(),
            name: name.to_owned(),
        })
    }

    /// Reads lines until one satisfies `found` (returned), or panics at `timeout` or at the
    /// end of the output.
    pub fn wait_line(&mut self, timeout: Duration, found: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.printed.push(line.clone());
                    if found(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no such line within {timeout:?}: {:?}",
                        self.name, self.printed
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{}: ended without such a line: {:?}",
                        self.name, self.printed
                    )
                }
            }
        }
    }

    /// The word after `prefix` on a line printed so far (e.g. an address).
    pub fn after(&self, prefix: &str) -> String {
        self.printed
            .iter()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{}: no {prefix:?} in {:?}", self.name, self.printed))
            .to_owned()
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit code; kills it past that.
    pub fn stop(mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = rustix::process::Pid::from_raw(child.id() as i32)?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let (tx, exited) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match exited.recv_timeout(timeout) {
            Ok(Ok(status)) => status.code(),
            _ => {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                let _ = exited.recv();
                None
            }
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `tscf server` on loopback ports the system picks (TCP and UDP listeners, no admin
/// endpoint), with `extra` added to its configuration file and `args` to its command line;
/// returned once it printed its last address line.
pub fn server(dir: &Path, extra: &str, args: &[&str]) -> Result<Program, String> {
    let config = dir.join("server.toml");
    let text = format!("tcp = [\"127.0.0.1:0\"]\nudp = [\"127.0.0.1:0\"]\nadmin = \"\"\n{extra}");
    std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut all = vec![
        "server".to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let mut server = Program::start("tscf server", &all)?;
    server.wait_line(Duration::from_secs(20), |l| l.trim().starts_with("udp "));
    if args.contains(&"--metrics") {
        server.wait_line(Duration::from_secs(5), |l| l.trim().starts_with("metrics "));
    }
    Ok(server)
}

/// `tscf client --json args…`, returned once it printed `until` (an event name).
pub fn client(name: &str, args: &[&str], until: &str) -> Result<Program, String> {
    let mut all = vec!["client".to_owned(), "--json".to_owned()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let mut client = Program::start(name, &all)?;
    let event = format!("\"event\":\"{until}\"");
    client.wait_line(Duration::from_secs(20), |l| l.contains(&event));
    Ok(client)
}

/// The value of `key` in the JSON line of `event` a program printed.
pub fn json_field(program: &Program, event: &str, key: &str) -> String {
    program
        .printed
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == event)
        .and_then(|v| v[key].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no {event}.{key} in {:?}", program.printed))
}

/// One HTTP/1.1 GET of `target` (path and query) from `addr`: the status and the body.
pub fn http_get(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// The body of a chunked transfer.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encodes a query parameter's value.
pub fn query_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

//! A QMP client: QEMU's JSON machine protocol over its UNIX socket.
//!
//! One request at a time: write `{"execute": ..., "arguments": ...}`, read lines until the
//! reply (`return` or `error`); asynchronous events read on the way are kept in
//! [`Qmp::events`]. Every read has a deadline, so a QEMU that hangs is an error, not a hang.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::QemuError;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Who this is, for messages (`source`, `destination`).
    side: &'static str,
    /// Events received so far (`{"event": ..., "data": ...}`).
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to the socket at `path` (retrying while QEMU starts, up to `wait`), reads the
    /// greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, side: &'static str, wait: Duration) -> Result<Self, QemuError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= wait => {
                    return Err(QemuError::Io(
                        format!("connecting to the {side} QMP socket {}", path.display()),
                        e,
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let io = |e| QemuError::Io(format!("the {side} QMP socket"), e);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Self {
            reader: BufReader::new(stream),
            writer,
            side,
            events: Vec::new(),
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Protocol(format!(
                "the {side} QMP socket did not greet: {greeting}"
            )));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| QemuError::Io(format!("reading the {} QMP socket", self.side), e))?;
        if n == 0 {
            return Err(QemuError::Protocol(format!(
                "the {} QEMU closed its QMP socket",
                self.side
            )));
        }
        serde_json::from_str(&line).map_err(|e| {
            QemuError::Protocol(format!(
                "{} QMP sent malformed JSON ({e}): {line:?}",
                self.side
            ))
        })
    }

    /// Runs `command` with `arguments` (an object; `{}` for none) and returns its `return`
    /// value, or [`QemuError::Command`] with QEMU's error class and description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        let mut req = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = arguments;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| QemuError::Io(format!("writing {command} to the {} QMP", self.side), e))?;
        loop {
            let mut m = self.read_message()?;
            if let Some(r) = m.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = m.get("error") {
                return Err(QemuError::Command {
                    side: self.side,
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            if m.get("event").is_some() {
                self.events.push(m);
            } else {
                return Err(QemuError::Protocol(format!(
                    "{} QMP sent neither a reply nor an event: {m}",
                    self.side
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted QMP server: greets, then answers each request line with the next reply.
    fn server(path: &Path, replies: Vec<&'static str>) -> std::thread::JoinHandle<Vec<Value>> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(serde_json::from_str(&line).unwrap());
                w.write_all(reply.as_bytes()).unwrap();
                w.write_all(b"\n").unwrap();
            }
            seen
        })
    }

    #[test]
    fn replies_events_and_errors_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("pagehint-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.sock");
        let _ = std::fs::remove_file(&path);
        let h = server(
            &path,
            vec![
                r#"{"return": {}}"#,
                "{\"event\": \"STOP\", \"data\": {}}\n{\"return\": {\"status\": \"active\"}}",
                r#"{"error": {"class": "GenericError", "desc": "no such thing"}}"#,
            ],
        );
        let mut q = Qmp::connect(&path, "source", Duration::from_secs(5)).unwrap();
        let r = q.execute("query-migrate", json!({})).unwrap();
        assert_eq!(r["status"], "active");
        assert_eq!(q.events.len(), 1);
        match q.execute("migrate", json!({"uri": "tcp:x"})) {
            Err(QemuError::Command { class, desc, .. }) => {
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "no such thing");
            }
            other => panic!("{other:?}"),
        }
        let seen = h.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[2]["arguments"]["uri"], "tcp:x");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_closed_socket_is_a_typed_error() {
        let dir = std::env::temp_dir().join(format!("pagehint-qmp-closed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.sock");
        let _ = std::fs::remove_file(&path);
        let h = server(&path, vec![r#"{"return": {}}"#]);
        let mut q = Qmp::connect(&path, "destination", Duration::from_secs(5)).unwrap();
        h.join().unwrap();
        // The write may see the closed socket (EPIPE) or the read its end: typed either way.
        assert!(matches!(
            q.execute("query-status", json!({})),
            Err(QemuError::Protocol(_) | QemuError::Io(..))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

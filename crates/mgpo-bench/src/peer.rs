//! The PyTorch peer (`peers/torch_peer.py --serve` of this crate, embedded
//! in it as [`SCRIPT`]), driven as a child process so that its measurements
//! alternate with ours in one run: one JSON request per line on its stdin,
//! one JSON answer per line back.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::memory::RssProbe;

/// The peer script, embedded so that an installed `mgpo` (which has no
/// repository beside it) runs it too: `python -c SCRIPT ARGS...`.
/// (`benches/peers/torch_peer.py` of the repository links to this file.)
pub const SCRIPT: &str = include_str!("../peers/torch_peer.py");

/// The Python to run the peer with: `MGPO_TORCH_PYTHON` (set by
/// `scripts/setup-libtorch.sh`), else `.venv-torch/bin/python` under the
/// current directory (the repository root, for `cargo run`), else
/// `python3`.
pub fn default_python() -> PathBuf {
    if let Some(p) = std::env::var_os("MGPO_TORCH_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(".venv-torch/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// What the peer said about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// PyTorch version.
    pub torch: String,
    /// PyTorch intra-op threads.
    pub threads: usize,
    /// The interpreter that runs it.
    pub python: String,
}

/// A running peer.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// What the peer reported when it started.
    pub info: PeerInfo,
}

/// How a peer command names its script in messages.
fn script_name(script: Option<&Path>) -> String {
    match script {
        Some(s) => s.display().to_string(),
        None => "-c <embedded torch_peer.py>".to_string(),
    }
}

/// `python SCRIPT --threads N`, or `python -c <embedded script> --threads N`
/// without a script file.
fn peer_command(python: &Path, script: Option<&Path>, threads: usize) -> Command {
    let mut c = Command::new(python);
    match script {
        Some(s) => c.arg(s),
        None => c.args(["-c", SCRIPT]),
    };
    c.args(["--threads", &threads.to_string()])
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string());
    c
}

impl Peer {
    /// Starts the peer with `threads` intra-op threads and reads its hello;
    /// `script` `None` runs the embedded [`SCRIPT`].
    pub fn spawn(python: &Path, script: Option<&Path>, threads: usize) -> Result<Peer, String> {
        let mut child = peer_command(python, script, threads)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the PyTorch peer ({} {}): {e}", python.display(), script_name(script)))?;
        let stdin = child.stdin.take().ok_or("peer stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("peer stdout")?);
        let mut peer = Peer { child, stdin, stdout, info: PeerInfo { torch: String::new(), threads: 0, python: python.display().to_string() } };
        let hello = peer.read()?;
        peer.info.torch = hello["torch"].as_str().ok_or("peer: no torch version in hello")?.to_string();
        peer.info.threads = hello["threads"].as_u64().ok_or("peer: no thread count in hello")? as usize;
        Ok(peer)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).map_err(|e| format!("peer: {e}"))?;
        if n == 0 {
            return Err("the PyTorch peer exited (see its error above)".into());
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("peer answered {line:?}: {e}"))?;
        match v.get("error") {
            Some(e) => Err(format!("PyTorch peer: {}", e.as_str().unwrap_or("error"))),
            None => Ok(v),
        }
    }

    /// Sends one request and returns the answer.
    pub fn request(&mut self, req: &Value) -> Result<Value, String> {
        writeln!(self.stdin, "{req}").and_then(|()| self.stdin.flush()).map_err(|e| format!("peer: {e}"))?;
        self.read()
    }

    /// Seconds per call of a timed request (`op` and its fields in `req`).
    pub fn times(&mut self, mut req: Value, reps: usize) -> Result<Vec<f64>, String> {
        req["reps"] = json!(reps);
        let v = self.request(&req)?;
        v["times_s"]
            .as_array()
            .ok_or("peer: no times")?
            .iter()
            .map(|x| x.as_f64().ok_or_else(|| "peer: a time is not a number".to_string()))
            .collect()
    }

    /// Frees the peer's cached cases.
    pub fn drop_cache(&mut self) -> Result<(), String> {
        self.request(&json!({"op": "drop"})).map(|_| ())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// A peak-RSS probe of the peer in a fresh Python process.
pub fn probe(python: &Path, script: Option<&Path>, threads: usize, kind: &str, params: usize, dim: usize, rank: usize) -> Result<RssProbe, String> {
    let out = peer_command(python, script, threads)
        .args(["--rss", kind, "--params", &params.to_string(), "--dim", &dim.to_string(), "--rank", &rank.to_string()])
        .output()
        .map_err(|e| format!("PyTorch RSS probe {kind}: {e}"))?;
    crate::memory::parse_last_line(&out, kind)
}

//! Starts `greeter_server.py`, functions written with StateFun's Python SDK served over
//! HTTP on 127.0.0.1. Shared by the Python tests of several crates (`#[path]`); the
//! interpreter comes from STATEFUN_PYTHON, which `make test` sets up with
//! `scripts/statefun-python`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The running server; killed when dropped.
pub(crate) struct PythonFunctions {
    child: Child,
    /// The port it listens on.
    pub(crate) port: u16,
}

impl Drop for PythonFunctions {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server with `env` added to its environment (`GREETINGS_TOPIC` names the
/// greeter's Kafka egress topic).
pub(crate) fn start(env: &[(&str, &str)]) -> PythonFunctions {
    let python = std::env::var("STATEFUN_PYTHON").expect(
        "STATEFUN_PYTHON is not set: run the suite with `make test` (it installs the StateFun Python SDK), \
         or point it at a python with apache-flink-statefun==3.3.0 (scripts/statefun-python path)",
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../statefun-protocol/tests/python/greeter_server.py"
    );
    let mut child = Command::new(python)
        .arg(script)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the python function server starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("the server prints its port");
    PythonFunctions { child, port }
}

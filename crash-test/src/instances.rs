//! Instance processes of the cluster workload ([`crate::cluster`]) for the process-level
//! cluster tests: start one as a child, SIGKILL, freeze or stop it, read which
//! partitions it ran from its log, put a steady load on the cluster and check the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer as _;

use crate::cluster::{ClusterNames, check_exactly_once};

/// Keys of the workload's records.
pub const KEYS: u64 = 40;

/// One instance process of the cluster workload. Its log goes to a file (with the
/// cluster's ownership changes at info level), kept in `CLUSTER_LOG_DIR` if set, and
/// printed when a check fails.
#[derive(Debug)]
pub struct Instance {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Instance {
    /// Starts instance `name` of the `statefun-crash-test` executable `binary`: in the
    /// consumer group, or with `fixed` partitions (e.g. "0,2").
    pub fn spawn(
        binary: &str,
        names: &ClusterNames,
        name: &str,
        fixed: Option<&str>,
        dir: &Path,
        logs: &Path,
    ) -> Instance {
        let log = logs.join(format!("{}-{name}.log", names.app));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let filter = match std::env::var_os("CLUSTER_LOG_DIR") {
            Some(_) => "warn,statefun_kafka::cluster=trace,statefun_runtime::partition=debug",
            None => "warn,statefun_kafka::cluster=info",
        };
        let mut command = Command::new(binary);
        command
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .args(["cluster-instance", "--bootstrap", &names.bootstrap, "--app", &names.app])
            .args([
                "--ingress",
                &names.ingress,
                "--egress",
                &names.egress,
                "--instance",
                name,
            ]);
        if let Some(partitions) = fixed {
            command.args(["--fixed-partitions", partitions]);
        }
        let child = command
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        Instance {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.child.id());
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Closes stdin (the instance commits and leaves) and checks it exited cleanly
    /// within [`STOP_TIMEOUT`]. An instance still running then is a failure: its
    /// threads' stacks (with gdb, where installed) and its log are in the panic, and it
    /// is SIGKILLed.
    pub fn stop(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let stacks = stacks(self.child.id());
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "instance {} did not exit within {STOP_TIMEOUT:?} of its stdin closing; its threads:\n{stacks}\nlog:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "instance {} failed: {status}; log:\n{}",
            self.name,
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The partition sets the instance ran, in order (its "running partitions" lines).
    pub fn runs(&self) -> Vec<Vec<u32>> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("running partitions"))
            .filter_map(|l| {
                let list = l.split("partitions=[").nth(1)?.split(']').next()?;
                Some(
                    list.split(|c: char| !c.is_ascii_digit())
                        .filter(|d| !d.is_empty())
                        .map(|d| d.parse().unwrap())
                        .collect(),
                )
            })
            .collect()
    }

    /// How many of its log lines report a transaction refused to a zombie: by the
    /// group, because the instance is no longer a member of the current generation
    /// (KIP-447: librdkafka's `UNKNOWN_MEMBER_ID`, `ILLEGAL_GENERATION` or
    /// `FENCED_INSTANCE_ID` on the transaction's offsets), or by the transaction
    /// coordinator, whose timeout aborted the open transaction while the instance was
    /// frozen and bumped the producer's epoch ("fenced by a newer instance",
    /// `PRODUCER_FENCED`, `INVALID_PRODUCER_EPOCH`). Which one comes first depends on
    /// how long the freeze outlasts the session and transaction timeouts.
    pub fn refused_commits(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                [
                    "UNKNOWN_MEMBER_ID",
                    "ILLEGAL_GENERATION",
                    "FENCED_INSTANCE_ID",
                    "fenced by a newer instance",
                    "PRODUCER_FENCED",
                    "INVALID_PRODUCER_EPOCH",
                ]
                .iter()
                .any(|code| l.contains(code))
            })
            .count()
    }

    /// Waits until the instance runs a non-empty partition set, and returns it.
    pub async fn owned(&self, timeout: Duration) -> Vec<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(last) = self.runs().last().filter(|p| !p.is_empty()) {
                return last.clone();
            }
            assert!(
                Instant::now() < deadline,
                "instance {} ran no partitions within {timeout:?}; log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How long an instance may take to commit and leave after its stdin closes.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

impl Drop for Instance {
    /// An instance left running by a failed test is SIGKILLed, not leaked.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The stacks of every thread of process `pid`, from gdb where it is installed, else
/// each thread's name and the kernel function it waits in.
fn stacks(pid: u32) -> String {
    let gdb = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt 30"])
        .stdin(Stdio::null())
        .output();
    if let Ok(out) = gdb
        && out.status.success()
    {
        return String::from_utf8_lossy(&out.stdout).into_owned();
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten();
    tasks
        .map(|t| {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
            format!("{} waits in {}", read("comm").trim(), read("wchan").trim())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Counts the egress records visible to a read_committed reader right now.
pub async fn visible(names: &ClusterNames) -> usize {
    let (records, _) = names
        .read_egress(usize::MAX, Duration::from_millis(1500))
        .await
        .unwrap();
    records.len()
}

/// Produces `values` records in chunks of 300 every 500 ms: a steady stream, so faults
/// land while records are being processed.
pub fn steady_load(names: &ClusterNames, values: u64) -> tokio::task::JoinHandle<()> {
    let names = names.clone();
    tokio::spawn(async move {
        for chunk in 0..values / 300 {
            names.produce(chunk * 300..(chunk + 1) * 300, KEYS).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Reads the egress until every value reached both functions (or 90 s), stops the
/// instances, and checks exactly-once; prints the instances' logs on a failure.
pub async fn finish(names: &ClusterNames, values: u64, instances: Vec<Instance>) {
    let (records, repeated) = names
        .read_egress(2 * values as usize, Duration::from_secs(90))
        .await
        .unwrap();
    let logs: Vec<(String, String)> = instances.iter().map(|i| (i.name.clone(), i.log_text())).collect();
    for i in instances {
        i.stop();
    }
    if let Err(e) = check_exactly_once(&records, values, KEYS) {
        for (name, log) in logs {
            eprintln!("--- instance {name} ---\n{log}");
        }
        eprintln!("open transactions: {:?}", names.open_transactions());
        panic!("{e}");
    }
    assert_eq!(repeated, 0, "an egress id appears twice");
}

/// How many SIGKILLs the kill tests make: `STATEFUN_SOAK_KILLS`, default 3 (`make
/// soak-kafka` runs more).
pub fn kills_per_run(default: usize) -> usize {
    std::env::var("STATEFUN_SOAK_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(default)
}

/// A temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Where instance logs go: `CLUSTER_LOG_DIR` if set (kept), else a temporary directory
/// removed with this value.
#[derive(Debug)]
pub struct LogDir {
    _temporary: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl std::ops::Deref for LogDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

/// A directory for instance logs (see [`LogDir`]).
pub fn log_dir() -> LogDir {
    match std::env::var_os("CLUSTER_LOG_DIR") {
        Some(dir) => LogDir {
            _temporary: None,
            path: PathBuf::from(dir),
        },
        None => {
            let t = tempdir();
            LogDir {
                path: t.path().to_path_buf(),
                _temporary: Some(t),
            }
        }
    }
}

/// A Kafka cluster of the test's own, started with `scripts/kafka` (Apache Kafka from
/// its Maven artifacts) and stopped when dropped: for tests that kill or stop brokers,
/// which must not touch the suite's shared broker.
#[derive(Debug)]
pub struct OwnKafka {
    script: PathBuf,
    name: String,
    /// The bootstrap address (every node's PLAINTEXT listener).
    pub bootstrap: String,
}

impl OwnKafka {
    /// Starts cluster `name` of `brokers` nodes (1 or 3) on ports from `port`.
    /// `script` is the path of `scripts/kafka`.
    pub fn start(script: &Path, name: &str, brokers: u32, port: u16) -> anyhow::Result<OwnKafka> {
        let out = Command::new(script)
            .args([
                "start",
                "--name",
                name,
                "--brokers",
                &brokers.to_string(),
                "--port",
                &port.to_string(),
            ])
            .stderr(Stdio::inherit())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "scripts/kafka start --name {name} failed: {}",
            out.status
        );
        let bootstrap = String::from_utf8(out.stdout)?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        let kafka = OwnKafka {
            script: script.to_owned(),
            name: name.to_owned(),
            bootstrap,
        };
        // Every node serves once the script returns; wait until the metadata lists
        // them all too (a topic with replication factor 3 needs three registered).
        let client: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap)
            .create()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listed = client
                .fetch_metadata(None, Duration::from_secs(5))
                .map(|m| m.brokers().len())
                .unwrap_or(0);
            if listed >= brokers as usize {
                return Ok(kafka);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "cluster {name}: {listed} of {brokers} brokers in the metadata after 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Acts on node `id`: "kill" (SIGKILL), "stop" (SIGTERM), "start" (again, on its
    /// data; waits until it serves), "pause", "resume".
    pub fn node(&self, action: &str, id: i32) -> anyhow::Result<()> {
        let status = Command::new(&self.script)
            .args(["node", action, &id.to_string(), "--name", &self.name])
            .status()?;
        anyhow::ensure!(
            status.success(),
            "scripts/kafka node {action} {id} --name {} failed",
            self.name
        );
        Ok(())
    }
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).args(["stop", "--name", &self.name]).status();
    }
}

/// A run of the cluster workload by instance processes in the consumer group, named
/// "a", "b", ..., each with its own state directory, under [`steady_load`].
#[derive(Debug)]
pub struct GroupRun {
    /// The run's topics and application.
    pub names: ClusterNames,
    binary: String,
    values: u64,
    producer: tokio::task::JoinHandle<()>,
    dirs: Vec<tempfile::TempDir>,
    logs: LogDir,
}

impl GroupRun {
    /// Creates the topics on `bootstrap`, starts `n` instances of `binary` and a load
    /// of `values` records, and returns once every instance runs partitions, and 2 s
    /// more (the group settled, the work under way).
    pub async fn start(
        binary: &str,
        bootstrap: &str,
        prefix: &str,
        n: usize,
        values: u64,
    ) -> (GroupRun, Vec<Instance>) {
        let names = ClusterNames::unique(bootstrap, prefix);
        names.create_topics().await.unwrap();
        let run = GroupRun {
            producer: steady_load(&names, values),
            names,
            binary: binary.to_owned(),
            values,
            dirs: (0..n).map(|_| tempdir()).collect(),
            logs: log_dir(),
        };
        let instances: Vec<Instance> = (0..n).map(|i| run.spawn(i)).collect();
        for i in &instances {
            i.owned(Duration::from_secs(60)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        (run, instances)
    }

    /// Starts instance `i` (again: same id, same state directory).
    pub fn spawn(&self, i: usize) -> Instance {
        let name = char::from(b'a' + i as u8).to_string();
        Instance::spawn(&self.binary, &self.names, &name, None, self.dirs[i].path(), &self.logs)
    }

    /// Waits until the load is produced, then [`finish`]es with `instances`.
    pub async fn finish(self, instances: Vec<Instance>) {
        self.producer.await.unwrap();
        finish(&self.names, self.values, instances).await;
    }
}

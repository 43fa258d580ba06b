//! Crash-recovery proof for statefun-rs: a deterministic workload runs on RocksDB in a
//! child process that is killed with SIGKILL at random points and restarted until it
//! finishes; its outcome must equal that of a crash-free run with the same seed.
//!
//! Why it exists: exactly-once across crashes is the runtime's central promise, and
//! only a real kill (no destructors, no flush, torn in-flight work) tests it. The
//! workload exercises every durable path:
//! * ingress records from a replayable [`GeneratorIngress`] (resumed from the committed
//!   offset after each restart);
//! * state read-modify-write on every message;
//! * messages across partitions (transfers between accounts);
//! * short delayed messages that fire (bonuses), long ones that stay pending, and
//!   cancellations by token (holds and releases);
//! * an egress record per processed message, written to a file by a sink that keeps
//!   the record ids, so re-deliveries after a crash are visible and can be removed by
//!   id.
//!
//! In Kafka mode (`--kafka BOOTSTRAP`) the child runs on a
//! [`ChangelogBackend`] over [`KafkaChangelog`]: state changes and egress records are
//! committed in one Kafka transaction per interval, and the egress is read back from
//! its topic with `read_committed`, **without** removing anything by id: every record
//! must be there exactly once.
//!
//! The [`Outcome`] of a run is the final state of every account, the number of pending
//! delayed messages, and the egress payloads (deduplicated by record id). Any lost or
//! duplicated effect changes it.

pub mod cluster;
pub mod instances;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use statefun_kafka::{KafkaChangelog, KafkaChangelogConfig};
use statefun_runtime::egress::{Egress, EgressRecord};
use statefun_runtime::state::{ChangelogBackend, RocksDbBackend, RocksDbOptions};
use statefun_runtime::{GeneratorIngress, IngressRecord, KeyRouter, Runtime, RuntimeConfig, RuntimeHandle};
use statefun_sdk::prelude::*;

/// The account function type.
pub const ACCOUNT: TypeName = TypeName::from_static("crash/account");
/// The egress all processed messages are reported to.
pub const REPORT: TypeName = TypeName::from_static("crash/report");
/// Accounts in the workload.
pub const ACCOUNTS: u64 = 64;

const BALANCE: ValueSpec<i64> = ValueSpec::named("balance");
/// Ingress records processed at this account.
const RECORDS: ValueSpec<i64> = ValueSpec::named("records");
const BONUS_SENT: ValueSpec<i64> = ValueSpec::named("bonus_sent");
const BONUS_RECEIVED: ValueSpec<i64> = ValueSpec::named("bonus_received");

/// Delay of a bonus (fires during the run).
const BONUS_DELAY: Duration = Duration::from_millis(50);
/// Delay of a hold (never fires during the run: released, or left pending).
const HOLD_DELAY: Duration = Duration::from_secs(3600);

/// A command, the value of an ingress record or of a message between accounts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cmd {
    /// Add `amount`.
    Deposit { offset: u64, amount: i64 },
    /// Move `amount` to account `to`.
    Transfer { offset: u64, amount: i64, to: String },
    /// Credit from another account (transfer or bonus).
    Credit { offset: u64, amount: i64, bonus: bool },
    /// Send a bonus to account `to` after a short delay.
    Bonus { offset: u64, amount: i64, to: String },
    /// Park a credit to self for an hour under token `hold-<offset>`.
    Hold { offset: u64, amount: i64 },
    /// Cancel the hold of record `hold`.
    Release { offset: u64, hold: u64 },
}
json_type!(Cmd, "crash/Cmd");

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn account_of(seed: u64, offset: u64) -> String {
    format!("a{}", splitmix(seed ^ offset.wrapping_mul(31)) % ACCOUNTS)
}

/// Record `offset` of the workload with `seed`: a pure function.
pub fn record(seed: u64, offset: u64) -> IngressRecord {
    let h = splitmix(seed.wrapping_add(offset));
    let amount = (h >> 8) as i64 % 100 + 1;
    let other = format!("a{}", (h >> 20) % ACCOUNTS);
    let (key, cmd) = if offset % 11 == 1 && (offset / 11).is_multiple_of(2) {
        // Releases the hold placed by the previous record, at the same account.
        (
            account_of(seed, offset - 1),
            Cmd::Release {
                offset,
                hold: offset - 1,
            },
        )
    } else if offset.is_multiple_of(11) {
        (account_of(seed, offset), Cmd::Hold { offset, amount })
    } else if offset.is_multiple_of(5) {
        (
            account_of(seed, offset),
            Cmd::Transfer {
                offset,
                amount,
                to: other,
            },
        )
    } else if offset.is_multiple_of(7) {
        (
            account_of(seed, offset),
            Cmd::Bonus {
                offset,
                amount,
                to: other,
            },
        )
    } else {
        (account_of(seed, offset), Cmd::Deposit { offset, amount })
    };
    let value = serde_json::to_vec(&cmd).expect("commands serialize");
    IngressRecord::new(key, value)
}

fn add(ctx: &mut Context, spec: &ValueSpec<i64>, n: i64) -> Result<(), statefun_sdk::StateError> {
    let v = ctx.storage().get(spec)?.unwrap_or(0) + n;
    ctx.storage().set(spec, &v)
}

fn account(ctx: &mut Context, msg: Message) -> FunctionResult {
    let cmd: Cmd = msg.decode()?;
    let me = ctx.self_address().id().to_owned();
    let from_ingress = ctx.caller().is_none();
    if from_ingress {
        add(ctx, &RECORDS, 1)?;
    }
    let report = match &cmd {
        Cmd::Deposit { offset, amount } => {
            add(ctx, &BALANCE, *amount)?;
            format!("deposit {offset} {me} {amount}")
        }
        Cmd::Transfer { offset, amount, to } => {
            add(ctx, &BALANCE, -amount)?;
            let credit = Cmd::Credit {
                offset: *offset,
                amount: *amount,
                bonus: false,
            };
            ctx.send(Address::new(ACCOUNT, to)?, &credit)?;
            format!("transfer-out {offset} {me} {amount}")
        }
        Cmd::Credit { offset, amount, bonus } => {
            add(ctx, &BALANCE, *amount)?;
            if *bonus {
                add(ctx, &BONUS_RECEIVED, 1)?;
            }
            format!("credit {offset} {me} {amount} {bonus}")
        }
        Cmd::Bonus { offset, amount, to } => {
            add(ctx, &BONUS_SENT, 1)?;
            let credit = Cmd::Credit {
                offset: *offset,
                amount: *amount,
                bonus: true,
            };
            ctx.send_after(BONUS_DELAY, Address::new(ACCOUNT, to)?, &credit)?;
            format!("bonus {offset} {me}")
        }
        Cmd::Hold { offset, amount } => {
            let credit = Cmd::Credit {
                offset: *offset,
                amount: *amount,
                bonus: false,
            };
            let self_address = ctx.self_address().clone();
            ctx.send_after_with_token(HOLD_DELAY, self_address, &credit, format!("hold-{offset}"))?;
            format!("hold {offset} {me}")
        }
        Cmd::Release { offset, hold } => {
            ctx.cancel_delayed(format!("hold-{hold}"));
            format!("release {offset} {me}")
        }
    };
    ctx.send_egress(REPORT, &report)?;
    Ok(())
}

/// The workload's functions.
pub fn module() -> Module {
    Module::builder()
        .with_fn(
            FunctionSpec::new(ACCOUNT)
                .with_state(BALANCE)
                .with_state(RECORDS)
                .with_state(BONUS_SENT)
                .with_state(BONUS_RECEIVED),
            account,
        )
        .build()
        .expect("valid module")
}

/// Appends `<record id>\t<payload>\n` per egress record to a file, one `write` call per
/// record (a SIGKILL cannot tear a line written by one call to a local file).
struct FileEgress {
    file: Mutex<std::fs::File>,
}

impl Egress for FileEgress {
    fn send(&self, record: EgressRecord) -> Result<(), statefun_runtime::egress::Error> {
        let payload: String = record
            .message
            .decode()
            .map_err(|e| statefun_runtime::egress::Error::Rejected(e.to_string()))?;
        let id = record.id.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
        let line = format!("{id}\t{payload}\n");
        self.file
            .lock()
            .expect("egress file lock")
            .write_all(line.as_bytes())
            .map_err(|e| statefun_runtime::egress::Error::Rejected(e.to_string()))
    }
}

/// What one child process is asked to do.
#[derive(Debug, Clone)]
pub struct WorkArgs {
    /// The RocksDB directory (reused across restarts).
    pub db: PathBuf,
    /// Where checkpoints go.
    pub checkpoints: PathBuf,
    /// The egress file (appended to across restarts).
    pub egress: PathBuf,
    /// Written (atomically) with the [`FinalState`] once the workload is complete.
    pub done: PathBuf,
    /// Workload seed.
    pub seed: u64,
    /// Number of ingress records.
    pub records: u64,
    /// Runtime partitions.
    pub partitions: u32,
    /// Kafka mode: the broker and the topics.
    pub kafka: Option<KafkaArgs>,
}

/// Where a Kafka-mode run keeps its changelog and egress.
#[derive(Debug, Clone)]
pub struct KafkaArgs {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// Prefix of the topic names and the transactional id (unique per run).
    pub prefix: String,
}

impl KafkaArgs {
    /// The egress topic (created by the parent, see [`create_egress_topic`]).
    pub fn egress_topic(&self) -> String {
        format!("{}-egress", self.prefix)
    }

    fn changelog(&self, partitions: u32) -> KafkaChangelogConfig {
        KafkaChangelogConfig::new(
            &self.bootstrap,
            format!("{}-changelog", self.prefix),
            partitions,
            format!("{}-instance", self.prefix),
        )
        .egress(REPORT, self.egress_topic())
    }
}

/// The state a finished child reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// Per account: balance, records, bonuses sent, bonuses received.
    pub accounts: BTreeMap<String, [i64; 4]>,
    /// Delayed messages still pending (holds that were not released).
    pub pending_delayed: usize,
}

async fn read_accounts(h: &RuntimeHandle) -> anyhow::Result<BTreeMap<String, [i64; 4]>> {
    let mut out = BTreeMap::new();
    for i in 0..ACCOUNTS {
        let a = Address::new(ACCOUNT, format!("a{i}"))?;
        let mut v = [0i64; 4];
        for (slot, spec) in [BALANCE, RECORDS, BONUS_SENT, BONUS_RECEIVED].iter().enumerate() {
            v[slot] = h.state(&a, spec).await?.unwrap_or(0);
        }
        out.insert(a.id().to_owned(), v);
    }
    Ok(out)
}

/// The child: runs (or resumes) the workload until it is complete, then writes the
/// final state to `args.done`. Killing it at any point and running it again must lead
/// to the same final state.
pub async fn work(args: WorkArgs) -> anyhow::Result<()> {
    let options = RocksDbOptions {
        checkpoint_dir: Some(args.checkpoints.clone()),
        checkpoints_retained: 2,
        ..Default::default()
    };
    let rocks = RocksDbBackend::open(&args.db, options)?;
    let builder = Runtime::builder()
        .config(RuntimeConfig {
            partitions: args.partitions,
            checkpoint_interval_ms: 700,
            ..Default::default()
        })
        .module(module())
        .ingress(
            GeneratorIngress::new("workload", args.seed, args.records, record),
            KeyRouter::new(ACCOUNT, <Cmd as ValueType>::TYPE_NAME),
        );
    let runtime = match &args.kafka {
        Some(kafka) => {
            let changelog = KafkaChangelog::connect(kafka.changelog(args.partitions)).await?;
            let partitions = args.partitions;
            let (backend, _) = tokio::task::spawn_blocking(move || {
                ChangelogBackend::open(rocks, Arc::new(changelog), partitions, Duration::from_millis(100))
            })
            .await??;
            builder.state_backend(backend).build()?
        }
        None => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&args.egress)
                .with_context(|| format!("opening {}", args.egress.display()))?;
            builder
                .state_backend(rocks)
                .egress(REPORT, FileEgress { file: Mutex::new(file) })
                .build()?
        }
    };
    let handle = runtime.handle();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    // Complete = every ingress record processed at its account, every bonus received,
    // nothing in flight. The snapshot is read value by value, so it counts only if no
    // invocation ran while it was read: a bonus timer firing between two reads of one
    // account would otherwise tear it (seen under load: the balance read before the
    // credit, the bonus count after).
    let invocations = |stats: Vec<statefun_runtime::PartitionStats>| stats.iter().map(|s| s.invocations).sum::<u64>();
    let state = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if handle.outstanding() > 0 {
            continue;
        }
        let before = invocations(handle.stats().await?);
        let accounts = read_accounts(&handle).await?;
        let quiet = invocations(handle.stats().await?) == before;
        let records: i64 = accounts.values().map(|v| v[1]).sum();
        let sent: i64 = accounts.values().map(|v| v[2]).sum();
        let received: i64 = accounts.values().map(|v| v[3]).sum();
        if quiet && records as u64 == args.records && sent == received && handle.outstanding() == 0 {
            let pending_delayed = handle.stats().await?.iter().map(|s| s.pending_delayed).sum();
            break FinalState {
                accounts,
                pending_delayed,
            };
        }
        if records as u64 > args.records {
            bail!("{records} records processed, only {} exist: duplicates", args.records);
        }
    };
    stop.cancel();
    running.await??;
    let tmp = args.done.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
    std::fs::rename(&tmp, &args.done)?;
    Ok(())
}

/// The outcome of a run, to compare runs by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The final state the child reported.
    pub state: FinalState,
    /// Egress payloads with their multiplicity, after removing re-deliveries by id.
    pub egress: BTreeMap<String, usize>,
    /// Egress lines that repeated an id already seen (re-deliveries after a crash).
    pub redelivered: usize,
}

/// Reads an egress file: payloads by count after deduplication by record id. An id
/// seen twice with different payloads is an error.
pub fn read_egress(path: &Path) -> anyhow::Result<(BTreeMap<String, usize>, usize)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut by_id: BTreeMap<&str, &str> = BTreeMap::new();
    let mut redelivered = 0;
    let mut egress = BTreeMap::new();
    for line in text.lines() {
        let (id, payload) = line
            .split_once('\t')
            .with_context(|| format!("malformed egress line {line:?}"))?;
        if id == "-" {
            bail!("egress record without an id: {line:?}");
        }
        match by_id.insert(id, payload) {
            None => *egress.entry(payload.to_owned()).or_insert(0) += 1,
            Some(prev) if prev == payload => redelivered += 1,
            Some(prev) => bail!("egress id {id} delivered as {prev:?} and as {payload:?}"),
        }
    }
    Ok((egress, redelivered))
}

/// Creates the egress topic of a Kafka-mode run (4 partitions).
pub async fn create_egress_topic(kafka: &KafkaArgs) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .create()?;
    let topic = kafka.egress_topic();
    for r in admin
        .create_topics(
            [&NewTopic::new(&topic, 4, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    Ok(())
}

/// Reads a Kafka-mode egress topic with `read_committed`: payloads by count (a payload
/// produced twice under two ids counts twice), and how many records repeated an id
/// already seen (must be 0 in Kafka mode: a repeat is a duplicate). With `complete`,
/// up to the high watermark (every transaction must be decided: after a clean finish);
/// otherwise up to the last stable offset (what is decided now, e.g. right after a kill
/// left a transaction open).
pub fn read_kafka_egress(kafka: &KafkaArgs, complete: bool) -> anyhow::Result<(BTreeMap<String, usize>, usize)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let topic = kafka.egress_topic();
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", format!("{}-reader", kafka.prefix))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let partitions = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    // A read_uncommitted client's watermark query gives the high watermark; a
    // read_committed client's gives the last stable offset.
    let watermarks: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set(
            "isolation.level",
            if complete { "read_uncommitted" } else { "read_committed" },
        )
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in 0..partitions {
        let (_, high) = watermarks.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
        ends.insert(p, high);
        tpl.add_partition_offset(&topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut ids = std::collections::HashSet::new();
    let mut duplicates = 0;
    let mut egress = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let positions = consumer.position()?;
        let done = ends.iter().all(|(p, high)| {
            positions
                .find_partition(&topic, *p)
                .and_then(|e| e.offset().to_raw())
                .is_some_and(|o| o >= *high)
                || *high == 0
        });
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!("reading {topic}: not at the end after 60 s");
        }
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let id = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == statefun_kafka::EGRESS_ID_HEADER))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .with_context(|| format!("egress record without an id at offset {}", m.offset()))?;
        let payload = <String as ValueType>::decode(m.payload().unwrap_or_default())?;
        if ids.insert(id) {
            *egress.entry(payload).or_insert(0) += 1;
        } else {
            duplicates += 1;
        }
    }
    Ok((egress, duplicates))
}

/// How to drive the child processes.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The `statefun-crash-test` binary.
    pub binary: PathBuf,
    /// A scratch directory (one sub-directory per run).
    pub dir: PathBuf,
    /// Workload seed.
    pub seed: u64,
    /// Number of ingress records.
    pub records: u64,
    /// Runtime partitions.
    pub partitions: u32,
    /// How many times to SIGKILL the child before letting it finish.
    pub kills: u32,
    /// A kill comes this long after the child started, uniformly in this range (ms).
    pub kill_after_ms: (u64, u64),
    /// Added to every kill's delay but the first: what a restart after a kill takes
    /// longer to start than a fresh run (ms). In Kafka mode, `init_transactions` first
    /// waits for the broker to abort the killed producer's open transaction.
    pub restart_extra_ms: u64,
    /// Seed of the kill schedule.
    pub kill_seed: u64,
    /// Give up on a child that has not finished after this long.
    pub timeout: Duration,
    /// Kafka mode for the killed run (the reference run stays on local RocksDB).
    pub kafka: Option<KafkaArgs>,
}

/// What happened to one killed child.
#[derive(Debug, Clone)]
pub struct Kill {
    /// Milliseconds after start.
    pub after_ms: u64,
    /// Egress lines in the file when it was killed (progress indicator).
    pub egress_lines: usize,
    /// True if the child had already finished (the kill came too late).
    pub had_finished: bool,
}

fn spawn(cfg: &SoakConfig, run: &Path, kafka: Option<&KafkaArgs>) -> anyhow::Result<Child> {
    Command::new(&cfg.binary)
        .arg("work")
        .arg("--dir")
        .arg(run)
        .arg("--seed")
        .arg(cfg.seed.to_string())
        .arg("--records")
        .arg(cfg.records.to_string())
        .arg("--partitions")
        .arg(cfg.partitions.to_string())
        .args(
            kafka
                .iter()
                .flat_map(|k| ["--kafka", &k.bootstrap, "--kafka-prefix", &k.prefix]),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", cfg.binary.display()))
}

fn wait(child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("child failed: {status}");
            }
            return Ok(());
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            bail!("child did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn outcome(run: &Path, kafka: Option<&KafkaArgs>) -> anyhow::Result<Outcome> {
    let state: FinalState = serde_json::from_slice(
        &std::fs::read(run.join("done.json")).with_context(|| format!("no final state in {}", run.display()))?,
    )?;
    let (egress, redelivered) = match kafka {
        Some(k) => read_kafka_egress(k, true)?,
        None => read_egress(&run.join("egress.log"))?,
    };
    Ok(Outcome {
        state,
        egress,
        redelivered,
    })
}

/// The paths a child uses under its run directory.
pub fn work_args(run: &Path, seed: u64, records: u64, partitions: u32, kafka: Option<KafkaArgs>) -> WorkArgs {
    WorkArgs {
        db: run.join("db"),
        checkpoints: run.join("checkpoints"),
        egress: run.join("egress.log"),
        done: run.join("done.json"),
        seed,
        records,
        partitions,
        kafka,
    }
}

/// Runs the workload once, without kills.
pub fn reference(cfg: &SoakConfig) -> anyhow::Result<Outcome> {
    let run = cfg.dir.join("reference");
    std::fs::create_dir_all(&run)?;
    let mut child = spawn(cfg, &run, None)?;
    wait(&mut child, cfg.timeout)?;
    outcome(&run, None)
}

/// Runs the workload, SIGKILLing the child `cfg.kills` times at random points and
/// restarting it, then lets it finish.
pub fn with_kills(cfg: &SoakConfig) -> anyhow::Result<(Outcome, Vec<Kill>)> {
    let run = cfg.dir.join("killed");
    std::fs::create_dir_all(&run)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.kill_seed);
    let mut kills = Vec::new();
    for _ in 0..cfg.kills {
        let extra = if kills.is_empty() { 0 } else { cfg.restart_extra_ms };
        let after_ms = rng.random_range(cfg.kill_after_ms.0..=cfg.kill_after_ms.1) + extra;
        // On RocksDB, also kill once the egress log has grown a random 20 to 80 % of
        // the way to the crash-free run's (when that ran in `cfg.dir`): a run faster
        // than the reference (a warm cache, a quieter machine) would otherwise finish
        // before the time-based kill, and no kill would hit the work.
        let egress_log = run.join("egress.log");
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let reference_size = size(&cfg.dir.join("reference").join("egress.log"));
        let grown = rng.random_range(0.2..0.8);
        let target = match cfg.kafka {
            None if reference_size > 0 => {
                let now = size(&egress_log);
                Some(now + (reference_size.saturating_sub(now) as f64 * grown) as u64)
            }
            _ => None,
        };
        let mut child = spawn(cfg, &run, cfg.kafka.as_ref())?;
        let spawned = std::time::Instant::now();
        let deadline = spawned + Duration::from_millis(after_ms);
        while std::time::Instant::now() < deadline && target.is_none_or(|t| size(&egress_log) < t) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let had_finished = child.try_wait()?.is_some();
        // `Child::kill` is SIGKILL on Unix: no destructor, no flush runs.
        let _ = child.kill();
        let _ = child.wait();
        let egress_lines = match &cfg.kafka {
            Some(k) => read_kafka_egress(k, false)?.0.values().sum(),
            None => std::fs::read_to_string(run.join("egress.log"))
                .map(|t| t.lines().count())
                .unwrap_or(0),
        };
        kills.push(Kill {
            after_ms: spawned.elapsed().as_millis() as u64,
            egress_lines,
            had_finished,
        });
        if had_finished {
            break;
        }
    }
    if !run.join("done.json").exists() {
        let mut child = spawn(cfg, &run, cfg.kafka.as_ref())?;
        wait(&mut child, cfg.timeout)?;
    }
    Ok((outcome(&run, cfg.kafka.as_ref())?, kills))
}

/// Compares two outcomes; the error lists the differences.
pub fn compare(expected: &Outcome, got: &Outcome) -> anyhow::Result<()> {
    let mut diffs = Vec::new();
    for (account, v) in &expected.state.accounts {
        match got.state.accounts.get(account) {
            Some(w) if w == v => {}
            other => diffs.push(format!("account {account}: expected {v:?}, got {other:?}")),
        }
    }
    if expected.state.pending_delayed != got.state.pending_delayed {
        diffs.push(format!(
            "pending delayed messages: expected {}, got {}",
            expected.state.pending_delayed, got.state.pending_delayed
        ));
    }
    for (payload, n) in &expected.egress {
        let m = got.egress.get(payload).copied().unwrap_or(0);
        if m != *n {
            diffs.push(format!("egress {payload:?}: expected {n}, got {m}"));
        }
    }
    for (payload, m) in &got.egress {
        if !expected.egress.contains_key(payload) {
            diffs.push(format!("egress {payload:?}: unexpected, {m} times"));
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    let shown = diffs.len().min(20);
    bail!(
        "{} differences (first {shown}):\n{}",
        diffs.len(),
        diffs[..shown].join("\n")
    )
}

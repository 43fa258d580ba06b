//! A full disk under the RocksDB backend (a real filesystem that runs out of space: a
//! small tmpfs). Proves: the runtime does not crash and keeps answering; invocations
//! that cannot commit are retried, then their addresses are parked and the messages
//! dead-lettered with an error that says the disk is full and names the database path;
//! a partition whose inbox cannot be written stops taking input (nothing is accepted
//! that cannot be kept); the runtime stops cleanly; after space is freed and the
//! runtime restarts, everything committed before the disk filled is intact and the
//! runtime works normally.
//!
//! Needs root (to mount the tmpfs). Run as another user it says so and checks nothing.

use std::process::Command;
use std::time::Duration;

use statefun_runtime::state::{RocksDbBackend, RocksDbOptions};
use statefun_runtime::{CollectingDeadLetters, DeadLetterReason, RetryConfig, Runtime, RuntimeConfig};
use statefun_sdk::prelude::*;
use tokio_util::sync::CancellationToken;

const BLOB: TypeName = TypeName::from_static("disk/blob");
const DATA: ValueSpec<String> = ValueSpec::named("data");

fn module() -> Module {
    Module::builder()
        .with_fn(FunctionSpec::new(BLOB).with_state(DATA), |ctx, msg| {
            let size: i64 = msg.decode()?;
            ctx.storage().set(&DATA, &"x".repeat(size as usize))?;
            Ok(())
        })
        .build()
        .unwrap()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_parks_with_a_clear_error_and_keeps_what_was_committed() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6M", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "mount failed");
    let _mount = Mount(dir.path().to_path_buf());
    let db = dir.path().join("db");

    let config = RuntimeConfig {
        partitions: 2,
        drain_timeout_ms: 500,
        retry: RetryConfig {
            max_attempts: 3,
            initial_backoff_ms: 10,
            max_backoff_ms: 20,
        },
        ..Default::default()
    };
    let dead = CollectingDeadLetters::new();
    let runtime = Runtime::builder()
        .config(config.clone())
        .module(module())
        .state_backend(RocksDbBackend::open(&db, RocksDbOptions::default()).unwrap())
        .dead_letters(dead.clone())
        .build()
        .unwrap();
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let task = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));

    // Small values first: they commit.
    for i in 0..20 {
        h.send_value(Address::new(BLOB, format!("small{i}")).unwrap(), &100i64)
            .await
            .unwrap();
    }
    h.wait_idle().await;
    // Then 256 KiB values until the 6 MiB volume is full.
    for i in 0..60 {
        let _ = h
            .send_value(Address::new(BLOB, format!("big{i}")).unwrap(), &(256 * 1024i64))
            .await;
    }
    // Wait for the first failures to run out of retries.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while dead.letters().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let letters = dead.letters();
    assert!(!letters.is_empty(), "the disk filled up: some writes must have failed");
    let path = db.display().to_string();
    for d in &letters {
        let text = match &d.reason {
            DeadLetterReason::FunctionFailed { error, .. } | DeadLetterReason::AddressParked { error } => error,
            other => panic!("unexpected dead letter {other:?}"),
        };
        assert!(
            text.contains("disk is full") && text.contains(&path),
            "error says what happened and where: {text}"
        );
    }
    // Still serving: state queries are answered from what was committed.
    let v = h.state(&Address::new(BLOB, "small0").unwrap(), &DATA).await.unwrap();
    assert_eq!(v.map(|s| s.len()), Some(100));
    assert!(!h.parked().await.unwrap().is_empty());
    stop.cancel();
    let report = task.await.unwrap().unwrap();
    eprintln!(
        "while full: {} dead letters, drained at stop: {}",
        letters.len(),
        report.drained
    );
    drop(h);

    // Free space (grow the volume) and restart: what was committed is there.
    let status = Command::new("mount")
        .args(["-o", "remount,size=64M"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let runtime = Runtime::builder()
        .config(config)
        .module(module())
        .state_backend(RocksDbBackend::open(&db, RocksDbOptions::default()).unwrap())
        .build()
        .unwrap();
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let task = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    // Messages that were accepted into an inbox before the disk filled are processed now.
    tokio::time::timeout(Duration::from_secs(30), h.wait_idle())
        .await
        .unwrap();
    let fresh = Address::new(BLOB, "after").unwrap();
    h.send_value(fresh.clone(), &(256 * 1024i64)).await.unwrap();
    h.wait_idle().await;
    assert_eq!(h.state(&fresh, &DATA).await.unwrap().map(|s| s.len()), Some(256 * 1024));
    for i in 0..20 {
        let v = h
            .state(&Address::new(BLOB, format!("small{i}")).unwrap(), &DATA)
            .await
            .unwrap();
        assert_eq!(v.map(|s| s.len()), Some(100), "small{i} survived");
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

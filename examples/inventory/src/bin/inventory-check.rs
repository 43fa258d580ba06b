//! `inventory-check FILE...`: checks the business invariants of region snapshots
//! (written by `inventory-demo --snapshot-dir DIR`). Prints PASS, or FAIL with every
//! broken invariant (exit code 1); a file that cannot be read is an error (exit 2, after
//! the other files were checked).

use std::process::ExitCode;

use inventory::check::{Snapshot, check};

fn main() -> ExitCode {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() || files.iter().any(|f| f == "-h" || f == "--help") {
        eprintln!("usage: inventory-check SNAPSHOT.json... (written by inventory-demo --snapshot-dir DIR)");
        return ExitCode::from(2);
    }
    let (mut failed, mut unreadable) = (false, false);
    for f in &files {
        let snapshot: Snapshot = match std::fs::read(f)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{f}: cannot read the snapshot: {e}");
                unreadable = true;
                continue;
            }
        };
        let violations = check(&snapshot);
        if violations.is_empty() {
            println!("{f} (region {}): PASS", snapshot.ledger.region);
        } else {
            failed = true;
            println!("{f} (region {}): FAIL", snapshot.ledger.region);
            for v in violations {
                println!("  - {v}");
            }
        }
    }
    match (unreadable, failed) {
        (true, _) => ExitCode::from(2),
        (false, true) => ExitCode::FAILURE,
        (false, false) => ExitCode::SUCCESS,
    }
}

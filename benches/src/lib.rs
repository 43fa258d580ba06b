//! Shared pieces of the statefun-rs benchmarks.
//!
//! The benchmarks live in `benches/benches/`; run them with
//! `cargo bench -p statefun-benches`. Results and how to read them are in
//! `docs/performance.md`.

use statefun_sdk::prelude::*;

/// The benchmarked function's type.
pub const COUNTER: TypeName = TypeName::from_static("bench/counter");
/// Its one state value.
pub const COUNT: ValueSpec<u64> = ValueSpec::named("count");

/// A trivial stateful function: read-modify-write one `u64`.
pub fn counter(ctx: &mut Context, msg: Message) -> FunctionResult {
    let add: u64 = msg.decode()?;
    let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + add;
    ctx.storage().set(&COUNT, &n)?;
    Ok(())
}

/// The module holding [`counter`].
pub fn module() -> Module {
    Module::builder()
        .with_fn(FunctionSpec::new(COUNTER).with_state(COUNT), counter)
        .build()
        .expect("one function always builds")
}

//! Functions shared by several integration test files (each file is its own crate, so
//! every item is not used by every one of them).
#![allow(dead_code)]

use std::time::Duration;

use statefun_sdk::prelude::*;

/// A function driven by text commands: `arm:<payload>` sends itself `fire:<payload>` in
/// 10 s under token `t`; `arm_other:<id>` sends `fire:remote` to `<id>` in 5 s;
/// `disarm:` cancels token `t`; `fire:<payload>` counts in FIRED and keeps the payload
/// in LAST.
pub(crate) const TIMER: TypeName = TypeName::from_static("test/timer");
pub(crate) const FIRED: ValueSpec<i64> = ValueSpec::named("fired");
pub(crate) const LAST: ValueSpec<String> = ValueSpec::named("last");

pub(crate) fn timer_fn(ctx: &mut Context, msg: Message) -> FunctionResult {
    let cmd: String = msg.decode()?;
    match cmd.split_once(':') {
        Some(("arm", payload)) => {
            let me = ctx.self_address().clone();
            ctx.send_after_with_token(Duration::from_secs(10), me, &format!("fire:{payload}"), "t")?;
        }
        Some(("arm_other", id)) => {
            ctx.send_after(
                Duration::from_secs(5),
                Address::new(TIMER, id)?,
                &"fire:remote".to_string(),
            )?;
        }
        Some(("disarm", _)) => ctx.cancel_delayed("t"),
        Some(("fire", payload)) => {
            let n = ctx.storage().get(&FIRED)?.unwrap_or(0) + 1;
            ctx.storage().set(&FIRED, &n)?;
            ctx.storage().set(&LAST, &payload.to_string())?;
        }
        _ => return Err(format!("unknown command {cmd}").into()),
    }
    Ok(())
}

/// Counts the messages each address receives in SEEN.
pub(crate) const COUNTER: TypeName = TypeName::from_static("test/counter");
pub(crate) const SEEN: ValueSpec<i64> = ValueSpec::named("seen");

pub(crate) fn counter_module() -> Module {
    Module::builder()
        .with_fn(FunctionSpec::new(COUNTER).with_state(SEEN), |ctx, _msg| {
            let n = ctx.storage().get(&SEEN)?.unwrap_or(0) + 1;
            ctx.storage().set(&SEEN, &n)?;
            Ok(())
        })
        .build()
        .unwrap()
}

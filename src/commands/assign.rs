//! `RL.ASSIGN` / `RL.UNASSIGN`: the plan a subject's `*` resolves to, kept with the
//! subject (an assigned subject keeps its key until unassigned).

use tollgate_core::change::Change;
use tollgate_core::subject::Subject;

use crate::args::{Args, CmdError, CmdResult};
use crate::server::Ctx;
use crate::state::STATE;
use crate::store::{open, write_subject};

/// `RL.ASSIGN key [plan]`: sets the subject's plan (OK), or shows it (nil if none).
pub fn assign(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 2 && args.len() != 3 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    if args.len() == 2 {
        let key = open::<Subject>(ctx, name, false)?;
        match key.value::<Subject>().and_then(Subject::assigned) {
            Some(plan) => ctx.reply_bulk(plan.as_bytes()),
            None => ctx.reply_null(),
        }
        return Ok(());
    }
    let plan = args.name(2, "plan")?;
    STATE
        .with(|state| {
            if state.plans.get(plan).is_none() {
                return Err(CmdError::err(format_args!("unknown plan '{plan}'")));
            }
            let mut key = open::<Subject>(ctx, name, true)?;
            let change = Change {
                assign: Some(Some(plan.into())),
                ..Change::default()
            };
            write_subject(ctx, &mut key, name, change, &mut state.payload)?;
            ctx.reply_simple(c"OK");
            Ok(())
        })
        .map_err(CmdError::err)?
}

/// `RL.UNASSIGN key` → 1 if the subject had an assigned plan, else 0.
pub fn unassign(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 2 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    STATE
        .with(|state| {
            let mut key = open::<Subject>(ctx, name, true)?;
            let assigned = key
                .value::<Subject>()
                .is_some_and(|s| s.assigned().is_some());
            if assigned {
                let change = Change {
                    assign: Some(None),
                    ..Change::default()
                };
                write_subject(ctx, &mut key, name, change, &mut state.payload)?;
            }
            ctx.reply_integer(i64::from(assigned));
            Ok(())
        })
        .map_err(CmdError::err)?
}

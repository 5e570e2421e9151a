//! `RL.ASSIGN` / `RL.UNASSIGN`: the plan a subject's `*` resolves to, kept with the
//! subject (an assigned subject keeps its key until unassigned).

use tollgate_core::layout::Layout;
use tollgate_core::subject::Subject;

use crate::args::{Args, CmdError, CmdResult};
use crate::server::Ctx;
use crate::state::STATE;
use crate::store::{open_subject, subject_in, subject_or_new, write_back, Change};

fn busy(e: &str) -> CmdError {
    CmdError::err(e)
}

/// `RL.ASSIGN key [plan]`: sets the subject's plan (OK), or shows it (nil if none).
pub fn assign(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 2 && args.len() != 3 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    if args.len() == 2 {
        let key = open_subject(ctx, name, false)?;
        match subject_in(&key).and_then(|s| s.assigned()) {
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
            let key = open_subject(ctx, name, true)?;
            let mut fresh: Option<Box<Subject>> = None;
            let interner = &mut state.interner;
            let subject = subject_or_new(
                &key,
                &mut fresh,
                || interner.intern(Layout::empty()),
                ctx.now_ms(),
            );
            subject.extra_mut().assigned = Some(plan.into());
            write_back(
                ctx,
                &key,
                name,
                fresh,
                Change {
                    assign: true,
                    ..Change::default()
                },
                &mut state.payload,
            )?;
            ctx.reply_simple(c"OK");
            Ok(())
        })
        .map_err(busy)?
}

/// `RL.UNASSIGN key` → 1 if the subject had an assigned plan, else 0.
pub fn unassign(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 2 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    STATE
        .with(|state| {
            let key = open_subject(ctx, name, true)?;
            let removed = match subject_in(&key) {
                Some(subject) if subject.assigned().is_some() => {
                    subject.extra_mut().assigned = None;
                    subject.tidy();
                    write_back(
                        ctx,
                        &key,
                        name,
                        None,
                        Change {
                            assign: true,
                            ..Change::default()
                        },
                        &mut state.payload,
                    )?;
                    true
                }
                _ => false,
            };
            ctx.reply_integer(i64::from(removed));
            Ok(())
        })
        .map_err(busy)?
}

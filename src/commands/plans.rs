//! `RL.PLAN.SET/GET/DEL/LIST`: plans are module-global configuration, shaped like
//! hashes. Changes are deterministic, so they replicate verbatim; they persist as RDB
//! aux data.

use crate::args::{Args, CmdError, CmdResult};
use crate::server::Ctx;
use crate::state::STATE;

fn internal(e: &str) -> CmdError {
    CmdError::err(e)
}

/// `RL.PLAN.SET plan limit spec [limit spec ...]` → fields added.
pub fn set(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() < 4 || !args.len().is_multiple_of(2) {
        return Err(CmdError::WrongArity);
    }
    let plan = args.str(1, "plan name")?;
    let mut pairs = Vec::with_capacity((args.len() - 2) / 2);
    for i in (2..args.len()).step_by(2) {
        pairs.push((args.str(i, "field name")?, args.str(i + 1, "spec")?));
    }
    let added = STATE
        .with(|s| s.plans.set(plan, &pairs, &mut s.interner))
        .map_err(internal)?
        .map_err(CmdError::err)?;
    ctx.replicate_verbatim();
    ctx.reply_integer(added as i64);
    Ok(())
}

/// `RL.PLAN.GET plan` → field/spec pairs (a map in RESP3; empty if no such plan).
pub fn get(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 2 {
        return Err(CmdError::WrongArity);
    }
    let plan = args.str(1, "plan name")?;
    STATE
        .with(|s| match s.plans.get(plan) {
            Some(p) => {
                ctx.reply_map(p.fields().len());
                for (field, spec) in p.fields() {
                    ctx.reply_bulk(field.as_bytes());
                    ctx.reply_bulk(spec.as_bytes());
                }
            }
            None => ctx.reply_map(0),
        })
        .map_err(internal)
}

/// `RL.PLAN.DEL plan [limit ...]` → plans or fields removed.
pub fn del(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() < 2 {
        return Err(CmdError::WrongArity);
    }
    let plan = args.str(1, "plan name")?;
    let fields = (2..args.len())
        .map(|i| args.str(i, "field name"))
        .collect::<Result<Vec<_>, _>>()?;
    let removed = STATE
        .with(|s| s.plans.delete(plan, &fields, &mut s.interner))
        .map_err(internal)?
        .map_err(CmdError::err)?;
    if removed > 0 {
        ctx.replicate_verbatim();
    }
    ctx.reply_integer(removed as i64);
    Ok(())
}

/// `RL.PLAN.LIST` → plan names, sorted.
pub fn list(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 1 {
        return Err(CmdError::WrongArity);
    }
    STATE
        .with(|s| {
            let names = s.plans.names();
            ctx.reply_array(names.len());
            for name in names {
                ctx.reply_bulk(name.as_bytes());
            }
        })
        .map_err(internal)
}

/// `RL.PLAN.DEFAULT [plan]`: sets the default plan `*` falls back to (OK), or shows it.
pub fn default(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    match args.len() {
        1 => STATE
            .with(|s| match s.plans.default_plan() {
                Some(plan) => ctx.reply_bulk(plan.as_bytes()),
                None => ctx.reply_null(),
            })
            .map_err(internal),
        2 => {
            let plan = args.name(1, "plan")?;
            STATE
                .with(|s| {
                    if s.plans.get(plan).is_none() {
                        return Err(CmdError::err(format_args!("unknown plan '{plan}'")));
                    }
                    s.plans.set_default(Some(plan)).map_err(CmdError::err)
                })
                .map_err(internal)??;
            ctx.replicate_verbatim();
            ctx.reply_simple(c"OK");
            Ok(())
        }
        _ => Err(CmdError::WrongArity),
    }
}

//! `RL.PLAN.SET/GET/DEL/LIST/DEFAULT`: plans are module-global configuration, shaped
//! like hashes. A change is stamped by the node that makes it and published by
//! `crate::plansync` (replicated as `RL.PLAN.MERGE`, and broadcast to the other nodes of
//! a cluster); plans persist as RDB aux data.

use crate::args::{Args, CmdError, CmdResult};
use crate::plansync::{author, node_id, publish};
use crate::server::Ctx;
use crate::state::STATE;

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
    let origin = node_id(ctx);
    let by = author(ctx, &origin);
    let (added, change) = STATE
        .with(|s| s.plans.set_by(by, plan, &pairs, &mut s.interner))
        .map_err(CmdError::err)?
        .map_err(CmdError::err)?;
    publish(ctx, &change);
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
        .map_err(CmdError::err)
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
    let origin = node_id(ctx);
    let by = author(ctx, &origin);
    let (removed, change) = STATE
        .with(|s| s.plans.delete_by(by, plan, &fields, &mut s.interner))
        .map_err(CmdError::err)?
        .map_err(CmdError::err)?;
    if let Some(change) = change {
        publish(ctx, &change);
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
        .map_err(CmdError::err)
}

/// `RL.PLAN.DEFAULT [plan]`: sets the default plan `*` falls back to (OK), or shows it.
pub fn default(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    match args.len() {
        1 => STATE
            .with(|s| match s.plans.default_plan() {
                Some(plan) => ctx.reply_bulk(plan.as_bytes()),
                None => ctx.reply_null(),
            })
            .map_err(CmdError::err),
        2 => {
            let plan = args.name(1, "plan")?;
            let origin = node_id(ctx);
            let by = author(ctx, &origin);
            let change = STATE
                .with(|s| {
                    if s.plans.get(plan).is_none() {
                        return Err(CmdError::err(format_args!("unknown plan '{plan}'")));
                    }
                    s.plans
                        .set_default_by(by, Some(plan))
                        .map_err(CmdError::err)
                })
                .map_err(CmdError::err)??;
            publish(ctx, &change);
            ctx.reply_simple(c"OK");
            Ok(())
        }
        _ => Err(CmdError::WrongArity),
    }
}

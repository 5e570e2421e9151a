//! `RL.CREDITS.*`: prepaid balances made of expiring blocks, with idempotent grants and
//! deductions (see `tollgate_core::credits`).

use tollgate_core::credits::{Credits, CreditsError, Touched, MAX_CREDIT_ID_LEN};
use tollgate_core::time::MAX_WINDOW_MS;

use crate::args::{printable, Args, CmdError, CmdResult};
use crate::reply::clamp;
use crate::server::{Ctx, RawString};
use crate::state::STATE;
use crate::store::{open, write_credits};

fn credits_error(e: CreditsError) -> CmdError {
    CmdError::err(e)
}

/// An id argument: 1 to 256 bytes.
fn id_arg<'a>(args: &Args<'a>, i: usize, what: &str) -> Result<&'a [u8], CmdError> {
    let id = args
        .bytes(i)
        .ok_or_else(|| CmdError::err(format_args!("{what} needs a value")))?;
    if id.is_empty() || id.len() > MAX_CREDIT_ID_LEN {
        return Err(CmdError::err(format_args!(
            "{what} must be 1 to {MAX_CREDIT_ID_LEN} bytes"
        )));
    }
    Ok(id)
}

/// Runs a write on the credits in key `name` (created empty if missing), then stores,
/// replicates and signals whatever it touched.
fn write<R>(
    ctx: &Ctx,
    name: RawString,
    f: impl FnOnce(&mut Credits, u64, &mut Touched) -> Result<R, CmdError>,
) -> Result<R, CmdError> {
    let mut key = open::<Credits>(ctx, name, true)?;
    let mut touched = Touched::default();
    let clock = ctx.now_ms();
    let mut fresh: Option<Box<Credits>> = None;
    let result = match key.value_mut::<Credits>() {
        Some(credits) => f(credits, clock, &mut touched)?,
        None => f(fresh.insert(Box::new(Credits::new())), clock, &mut touched)?,
    };
    STATE
        .with(|s| write_credits(ctx, &mut key, name, fresh, &touched, &mut s.payload))
        .map_err(CmdError::err)??;
    if touched != Touched::default() {
        // A grant or refund may let a waiting acquire go ahead.
        ctx.signal_ready(name);
    }
    Ok(result)
}

/// `RL.CREDITS.GRANT key amount [TTL ms | EXPIREAT unix-ms] [ID block-id]` → balance.
pub fn grant(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() < 3 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let amount = args.u64(2, "amount")?;
    let (mut ttl, mut at, mut id) = (None, None, None);
    let mut i = 3;
    while i < args.len() {
        if i + 1 >= args.len() {
            return Err(CmdError::err(format_args!(
                "{} needs a value",
                printable(args.bytes(i).unwrap_or(b""))
            )));
        }
        if args.is(i, "TTL") && ttl.is_none() && at.is_none() {
            let ms = args.u64(i + 1, "TTL")?;
            if ms == 0 || ms > MAX_WINDOW_MS {
                return Err(CmdError::err(format_args!(
                    "TTL must be between 1 and {MAX_WINDOW_MS} ms"
                )));
            }
            ttl = Some(ms);
        } else if args.is(i, "EXPIREAT") && ttl.is_none() && at.is_none() {
            at = Some(args.u64(i + 1, "EXPIREAT")?);
        } else if args.is(i, "ID") && id.is_none() {
            id = Some(id_arg(&args, i + 1, "ID")?);
        } else if args.is(i, "TTL") || args.is(i, "EXPIREAT") || args.is(i, "ID") {
            return Err(CmdError::err(
                "give at most one of TTL and EXPIREAT, and one ID",
            ));
        } else {
            return Err(CmdError::err(format_args!(
                "unexpected argument '{}' (expected TTL, EXPIREAT or ID)",
                printable(args.bytes(i).unwrap_or(b""))
            )));
        }
        i += 2;
    }
    let settings = crate::config::credit_settings();
    let balance = write(ctx, name, |credits, clock, touched| {
        let now = credits.effective_now(clock);
        let expires_at = match (ttl, at) {
            (Some(ms), _) => Some(now.saturating_add(ms)),
            (None, at) => at,
        };
        credits
            .grant(amount, expires_at, id, clock, &settings, touched)
            .map_err(credits_error)
    })?;
    ctx.reply_integer(clamp(balance));
    Ok(())
}

/// `RL.CREDITS.DEDUCT key amount [PARTIAL] [ID request-id]` → `[deducted, balance]`.
pub fn deduct(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() < 3 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let amount = args.u64(2, "amount")?;
    let (mut partial, mut id) = (false, None);
    let mut i = 3;
    while i < args.len() {
        if args.is(i, "PARTIAL") && !partial {
            partial = true;
            i += 1;
        } else if args.is(i, "ID") && id.is_none() {
            id = Some(id_arg(&args, i + 1, "ID")?);
            i += 2;
        } else {
            return Err(CmdError::err(format_args!(
                "unexpected argument '{}' (expected PARTIAL or ID)",
                printable(args.bytes(i).unwrap_or(b""))
            )));
        }
    }
    let settings = crate::config::credit_settings();
    let (deducted, balance) = write(ctx, name, |credits, clock, touched| {
        credits
            .deduct(amount, partial, id, clock, &settings, touched)
            .map_err(credits_error)
    })?;
    ctx.reply_array(2);
    ctx.reply_integer(clamp(deducted));
    ctx.reply_integer(clamp(balance));
    Ok(())
}

/// `RL.CREDITS.REFUND key request-id` → `[refunded, balance]`.
pub fn refund(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 3 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let id = id_arg(&args, 2, "request id")?;
    let (refunded, balance) = write(ctx, name, |credits, clock, touched| {
        Ok(credits.refund(id, clock, touched))
    })?;
    ctx.reply_array(2);
    ctx.reply_integer(clamp(refunded));
    ctx.reply_integer(clamp(balance));
    Ok(())
}

/// `RL.CREDITS.REVOKE key block-id` → amount removed.
pub fn revoke(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 3 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let id = id_arg(&args, 2, "block id")?;
    let removed = write(ctx, name, |credits, clock, touched| {
        Ok(credits.revoke(id, clock, touched))
    })?;
    ctx.reply_integer(clamp(removed));
    Ok(())
}

/// `RL.CREDITS.BALANCE key [MIN amount]` → balance, or 1/0 with `MIN`.
pub fn balance(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    let min = match args.len() {
        2 => None,
        4 if args.is(2, "MIN") => Some(args.u64(3, "MIN")?),
        4 => {
            return Err(CmdError::err(format_args!(
                "unexpected argument '{}' (expected MIN)",
                printable(args.bytes(2).unwrap_or(b""))
            )))
        }
        _ => return Err(CmdError::WrongArity),
    };
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let key = open::<Credits>(ctx, name, false)?;
    let clock = ctx.now_ms();
    let balance = key
        .value::<Credits>()
        .map_or(0, |c| c.balance(c.effective_now(clock)));
    match min {
        Some(min) => ctx.reply_integer(i64::from(balance >= min)),
        None => ctx.reply_integer(clamp(balance)),
    }
    Ok(())
}

/// `RL.CREDITS.BLOCKS key` → one map per live block, in consumption order.
pub fn blocks(ctx: &Ctx, args: Args<'_>) -> CmdResult {
    if args.len() != 2 {
        return Err(CmdError::WrongArity);
    }
    let name = args.raw(1).ok_or(CmdError::WrongArity)?;
    let key = open::<Credits>(ctx, name, false)?;
    let clock = ctx.now_ms();
    let Some(credits) = key.value::<Credits>() else {
        ctx.reply_array(0);
        return Ok(());
    };
    let now = credits.effective_now(clock);
    let live: Vec<_> = credits.live_blocks(now).collect();
    ctx.reply_array(live.len());
    for (id, left, granted, expires_at) in live {
        ctx.reply_map(4);
        ctx.reply_cstr(c"id");
        ctx.reply_bulk(id);
        ctx.reply_cstr(c"left");
        ctx.reply_integer(clamp(left));
        ctx.reply_cstr(c"granted");
        ctx.reply_integer(clamp(granted));
        ctx.reply_cstr(c"expires_at");
        ctx.reply_integer(expires_at.map_or(-1, clamp));
    }
    Ok(())
}

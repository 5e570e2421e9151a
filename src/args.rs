//! Reading command arguments, and the one place errors become wire text.
//!
//! Every error names the argument and what was expected, starts with its code, and is
//! returned before the command changes anything.

use std::fmt;

use crate::server::{bytes_of, RawString};

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdError {
    /// Redis's own "wrong number of arguments" reply.
    WrongArity,
    /// `WRONGTYPE Operation against a key holding the wrong kind of value`.
    WrongType,
    /// A reply starting with a code, e.g. `ERR ...`.
    Reply(String),
}

impl CmdError {
    /// An `ERR` reply.
    pub fn err(message: impl fmt::Display) -> CmdError {
        CmdError::Reply(format!("ERR {message}"))
    }
}

pub type CmdResult = Result<(), CmdError>;

/// What a client gets when a command panics (caught at the boundary; a bug).
pub const INTERNAL_ERROR: &str = "ERR tollgate internal error (a bug: see the server log)";

/// The arguments of one call (`argv[0]` is the command name), each read once.
pub struct Args<'a> {
    argv: &'a [RawString],
    bytes: smallvec::SmallVec<[&'a [u8]; 16]>,
}

impl<'a> Args<'a> {
    pub fn new(argv: &'a [RawString]) -> Self {
        Args {
            argv,
            bytes: argv.iter().map(|&s| bytes_of(s)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.argv.len()
    }

    pub fn raw(&self, i: usize) -> Option<RawString> {
        self.argv.get(i).copied()
    }

    pub fn bytes(&self, i: usize) -> Option<&'a [u8]> {
        self.bytes.get(i).copied()
    }

    /// Argument `i` as UTF-8 text, or an error naming it.
    pub fn str(&self, i: usize, what: &str) -> Result<&'a str, CmdError> {
        let bytes = self.bytes(i).ok_or(CmdError::WrongArity)?;
        std::str::from_utf8(bytes)
            .map_err(|_| CmdError::err(format_args!("{what} is not valid UTF-8")))
    }

    /// Argument `i` as a name (limit, unit, plan or endpoint).
    pub fn name(&self, i: usize, what: &str) -> Result<&'a str, CmdError> {
        let text = self.str(i, what)?;
        if tollgate_core::spec::is_valid_name(text) {
            Ok(text)
        } else {
            Err(CmdError::err(format_args!(
                "{what} '{}' is not a valid name (1-64 of A-Z a-z 0-9 _ - . : / @ #)",
                printable(text.as_bytes())
            )))
        }
    }

    /// Argument `i` as a non-negative 64-bit integer.
    pub fn u64(&self, i: usize, what: &str) -> Result<u64, CmdError> {
        parse_u64(self.bytes(i).ok_or(CmdError::WrongArity)?, what)
    }

    /// Whether argument `i` equals `keyword`, ignoring ASCII case.
    pub fn is(&self, i: usize, keyword: &str) -> bool {
        self.bytes(i)
            .is_some_and(|b| b.eq_ignore_ascii_case(keyword.as_bytes()))
    }
}

/// Parses a non-negative decimal integer that fits `u64`.
pub fn parse_u64(bytes: &[u8], what: &str) -> Result<u64, CmdError> {
    if bytes.is_empty() || bytes.len() > 20 || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(CmdError::err(format_args!(
            "{what} must be a non-negative integer, got '{}'",
            printable(bytes)
        )));
    }
    let mut value: u64 = 0;
    for &b in bytes {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or_else(|| {
                CmdError::err(format_args!("{what} is larger than 18446744073709551615"))
            })?;
    }
    Ok(value)
}

/// Whether `bytes` is a plain non-negative integer (so it is a value, not a keyword).
pub fn is_integer(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit)
}

/// `bytes` made safe to quote in an error: at most 64 printable characters.
pub fn printable(bytes: &[u8]) -> String {
    let mut text: String = String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(64)
        .collect();
    if bytes.len() > 64 {
        text.push_str("...");
    }
    text
}

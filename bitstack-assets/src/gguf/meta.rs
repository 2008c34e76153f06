//! Typed access to GGUF metadata; errors name the key.
//!
//! Writers disagree on integer widths and signedness (u32 vs i32 vs u64), so
//! every integer accessor accepts any integer type that fits.

use anyhow::{anyhow, bail, Result};
use candle_core::quantized::gguf_file::{Content, Value};

/// The value under `key`, if present.
pub(crate) fn opt<'a>(c: &'a Content, key: &str) -> Option<&'a Value> {
    c.metadata.get(key)
}

/// The value under `key`.
pub(crate) fn get<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    opt(c, key).ok_or_else(|| anyhow!("missing GGUF metadata key `{key}`"))
}

/// An integer value as `u64`; negative values are an error.
pub(crate) fn as_u64(v: &Value, key: &str) -> Result<u64> {
    let signed = |x: i64| u64::try_from(x).map_err(|_| anyhow!("`{key}` is negative ({x})"));
    match *v {
        Value::U8(x) => Ok(x.into()),
        Value::U16(x) => Ok(x.into()),
        Value::U32(x) => Ok(x.into()),
        Value::U64(x) => Ok(x),
        Value::I8(x) => signed(x.into()),
        Value::I16(x) => signed(x.into()),
        Value::I32(x) => signed(x.into()),
        Value::I64(x) => signed(x),
        _ => bail!("`{key}` should be an integer, found {:?}", v.value_type()),
    }
}

/// A required integer as `usize`.
pub(crate) fn usize_key(c: &Content, key: &str) -> Result<usize> {
    let x = as_u64(get(c, key)?, key)?;
    usize::try_from(x).map_err(|_| anyhow!("`{key}` = {x} does not fit in usize"))
}

/// An optional integer as `u32` (token ids).
pub(crate) fn opt_u32(c: &Content, key: &str) -> Result<Option<u32>> {
    let Some(v) = opt(c, key) else {
        return Ok(None);
    };
    let x = as_u64(v, key)?;
    u32::try_from(x)
        .map(Some)
        .map_err(|_| anyhow!("`{key}` = {x} does not fit in u32"))
}

/// An optional float. `f32` values are widened through their shortest
/// decimal form so that 1e-5 stays 1e-5 rather than 9.999999747378752e-6.
pub(crate) fn opt_f64(c: &Content, key: &str) -> Result<Option<f64>> {
    match opt(c, key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(x.to_string().parse::<f64>().unwrap_or(f64::from(*x)))),
        Some(Value::F64(x)) => Ok(Some(*x)),
        Some(v) => bail!("`{key}` should be a float, found {:?}", v.value_type()),
    }
}

/// An optional string.
pub(crate) fn opt_str<'a>(c: &'a Content, key: &str) -> Result<Option<&'a str>> {
    match opt(c, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => bail!("`{key}` should be a string, found {:?}", v.value_type()),
    }
}

/// A required string.
pub(crate) fn str_key<'a>(c: &'a Content, key: &str) -> Result<&'a str> {
    opt_str(c, key)?.ok_or_else(|| anyhow!("missing GGUF metadata key `{key}`"))
}

/// An optional bool.
pub(crate) fn opt_bool(c: &Content, key: &str) -> Result<Option<bool>> {
    match opt(c, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => bail!("`{key}` should be a bool, found {:?}", v.value_type()),
    }
}

/// The elements of the array under `key`.
fn array<'a>(c: &'a Content, key: &str) -> Result<Option<&'a [Value]>> {
    match opt(c, key) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(v) => bail!("`{key}` should be an array, found {:?}", v.value_type()),
    }
}

/// An optional array of strings.
pub(crate) fn opt_str_array<'a>(c: &'a Content, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(items) = array(c, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            _ => bail!(
                "`{key}`[{i}] should be a string, found {:?}",
                v.value_type()
            ),
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// An optional array of integers (token types).
pub(crate) fn opt_int_array(c: &Content, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(items) = array(c, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match *v {
            Value::U8(x) => Ok(x.into()),
            Value::I8(x) => Ok(x.into()),
            Value::U16(x) => Ok(x.into()),
            Value::I16(x) => Ok(x.into()),
            Value::U32(x) => Ok(x.into()),
            Value::I32(x) => Ok(x.into()),
            Value::I64(x) => Ok(x),
            Value::U64(x) => i64::try_from(x).map_err(|_| anyhow!("`{key}`[{i}] too large")),
            _ => bail!(
                "`{key}`[{i}] should be an integer, found {:?}",
                v.value_type()
            ),
        })
        .collect::<Result<_>>()
        .map(Some)
}

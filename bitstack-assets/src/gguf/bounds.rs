//! Bounds checks that run before candle touches a GGUF.
//!
//! candle allocates whatever lengths a header claims (strings, arrays, tensor
//! data), so a truncated or corrupt file could abort the process instead of
//! failing. Here every length is checked against the file size first, and
//! every tensor's type against those the importer can dequantize.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use std::io::{BufReader, Read, Seek, SeekFrom};

/// Deepest array nesting accepted (llama.cpp writes at most 1).
const MAX_ARRAY_DEPTH: u32 = 4;
/// GGML tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// The metadata key candle rounds the start of the tensor data up to a
/// multiple of (dividing by it).
const ALIGNMENT_KEY: &str = "general.alignment";

/// Walks the header (metadata and tensor infos) without allocating for any
/// claimed length; leaves the reader at the start.
pub(crate) fn check_header<R: Read + Seek>(reader: &mut BufReader<R>, len: u64) -> Result<()> {
    reader.seek(SeekFrom::Start(0))?;
    let mut scan = Scan {
        r: &mut *reader,
        pos: 0,
        len,
        v1: false,
    };
    let mut magic = [0u8; 4];
    scan.bytes(&mut magic, "magic")?;
    if &magic != b"GGUF" {
        bail!("not a GGUF file (magic {magic:02x?})");
    }
    let version = scan.u32("version")?;
    if !(1..=3).contains(&version) {
        bail!("unsupported GGUF version {version}");
    }
    scan.v1 = version == 1;
    let tensors = scan.count("tensor count")?;
    let kvs = scan.count("metadata count")?;
    for _ in 0..kvs {
        let alignment = scan.key_is_alignment()?;
        let ty = scan.u32("metadata type")?;
        if alignment {
            scan.alignment(ty)?;
        } else {
            scan.value(ty, 0)?;
        }
    }
    for _ in 0..tensors {
        let name = scan.name("tensor name")?;
        let dims = scan.u32("tensor rank")?;
        if dims > MAX_DIMS {
            bail!(
                "tensor rank {dims} at offset {} exceeds {MAX_DIMS}",
                scan.pos
            );
        }
        let mut elems: u64 = 1;
        for _ in 0..dims {
            let d = scan.count("tensor dimension")?;
            elems = elems
                .checked_mul(d)
                .filter(|&e| e <= len.saturating_mul(8))
                .with_context(|| format!("tensor shape at offset {} is too large", scan.pos))?;
        }
        let ty = scan.u32("tensor type")?;
        super::dtype::check(&name, ty)?;
        scan.skip(8, "tensor offset")?;
    }
    reader.seek(SeekFrom::Start(0))?;
    Ok(())
}

/// Checks that every tensor's data lies inside the file.
pub(crate) fn check_tensor_data(content: &Content, len: u64) -> Result<()> {
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count() as u64;
        let block = info.ggml_dtype.block_size() as u64;
        if block == 0 || !elems.is_multiple_of(block) {
            bail!("tensor {name}: {elems} elements is not a multiple of block size {block}");
        }
        let bytes = elems / block * info.ggml_dtype.type_size() as u64;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| s.checked_add(bytes));
        match end {
            Some(end) if end <= len => {}
            _ => bail!(
                "tensor {name} needs {bytes} bytes at offset {} but the file has {len} bytes \
                 (truncated?)",
                info.offset
            ),
        }
    }
    Ok(())
}

struct Scan<'a, R> {
    r: &'a mut BufReader<R>,
    pos: u64,
    len: u64,
    v1: bool,
}

impl<R: Read + Seek> Scan<'_, R> {
    fn need(&self, n: u64, what: &str) -> Result<()> {
        if n > self.len - self.pos {
            bail!(
                "truncated: {what} needs {n} bytes at offset {} but the file has {} bytes",
                self.pos,
                self.len
            );
        }
        Ok(())
    }

    fn bytes(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.need(buf.len() as u64, what)?;
        self.r.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.need(n, what)?;
        let step = i64::try_from(n).context("skip too large")?;
        self.r.seek_relative(step)?;
        self.pos += n;
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.bytes(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.bytes(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A length or count: u32 in GGUF v1, u64 later.
    fn count(&mut self, what: &str) -> Result<u64> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, what: &str) -> Result<()> {
        let n = self.count(what)?;
        self.skip(n, what)
    }

    /// Reads a metadata key and tells whether it is `general.alignment`,
    /// allocating nothing.
    fn key_is_alignment(&mut self) -> Result<bool> {
        let n = self.count("metadata key")?;
        if n != ALIGNMENT_KEY.len() as u64 {
            self.skip(n, "metadata key")?;
            return Ok(false);
        }
        let mut buf = [0u8; ALIGNMENT_KEY.len()];
        self.bytes(&mut buf, "metadata key")?;
        Ok(buf == *ALIGNMENT_KEY.as_bytes())
    }

    /// The value of `general.alignment`, of type `ty`: candle divides by it
    /// when it is an integer of at most 32 bits (and ignores it otherwise),
    /// so such a value of 0 is refused here.
    fn alignment(&mut self, ty: u32) -> Result<()> {
        let at = self.pos;
        let value = match ty {
            0 | 1 => {
                let mut b = [0u8; 1];
                self.bytes(&mut b, ALIGNMENT_KEY)?;
                u64::from(b[0])
            }
            2 | 3 => {
                let mut b = [0u8; 2];
                self.bytes(&mut b, ALIGNMENT_KEY)?;
                u64::from(u16::from_le_bytes(b))
            }
            4 | 5 => u64::from(self.u32(ALIGNMENT_KEY)?),
            _ => return self.value(ty, 0),
        };
        if value == 0 {
            bail!("`{ALIGNMENT_KEY}` at offset {at} is 0: the tensor data cannot be aligned to it");
        }
        Ok(())
    }

    /// A string read in full (its length is checked first).
    fn name(&mut self, what: &str) -> Result<String> {
        let n = self.count(what)?;
        self.need(n, what)?;
        let mut buf = vec![0u8; usize::try_from(n).context("name too long")?];
        self.bytes(&mut buf, what)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<()> {
        if let Some(size) = fixed_size(ty) {
            return self.skip(size, "metadata value");
        }
        match ty {
            8 => self.string("metadata string"),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("metadata arrays nested too deeply at offset {}", self.pos);
                }
                let elem = self.u32("array type")?;
                let n = self.count("array length")?;
                let min = fixed_size(elem).unwrap_or(if self.v1 { 4 } else { 8 });
                let total = n.saturating_mul(min);
                self.need(total, "metadata array")?;
                if fixed_size(elem).is_some() {
                    return self.skip(total, "metadata array");
                }
                for _ in 0..n {
                    self.value(elem, depth + 1)?;
                }
                Ok(())
            }
            _ => bail!("unknown metadata type {ty} at offset {}", self.pos),
        }
    }
}

/// Byte size of fixed-size GGUF metadata types.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

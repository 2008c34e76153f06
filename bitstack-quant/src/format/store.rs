//! Validated access to the safetensors files of a model dir.
//!
//! Every error names the file and the tensor: a truncated file says which
//! tensors it cuts off, a wrong shape or dtype says what was expected, and
//! non-finite values are refused with their position.
//!
//! Tensors are read with positioned reads into memory the caller owns, not
//! through a memory map: a server keeps its checkpoint open for its whole
//! life and reads blocks again on every grow, and a shard that is truncated
//! or rewritten in place meanwhile (`cp new old`) must give an error, not a
//! SIGBUS or bytes that change under a checked slice. Each read first
//! checks that the file is still the one that was opened (same length,
//! modification time and, on Unix, inode) and checks again after reading.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use safetensors::tensor::Metadata;
use safetensors::Dtype;

use crate::format::dense::DenseDtype;

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// One open safetensors file and what it was when opened.
struct Shard {
    path: PathBuf,
    file: File,
    seen: FileState,
}

/// What identifies a file's contents cheaply: if none of it changed, the
/// bytes read now are the bytes the header was checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileState {
    len: u64,
    modified: Option<SystemTime>,
    /// Device and inode, where the platform has them.
    id: Option<(u64, u64)>,
}

impl FileState {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let id = {
            use std::os::unix::fs::MetadataExt;
            Some((meta.dev(), meta.ino()))
        };
        #[cfg(not(unix))]
        let id = None;
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            id,
        }
    }
}

impl Shard {
    /// Fails, saying how, if the open file or the file now at its path is
    /// not the one that was opened.
    fn check_unchanged(&self) -> Result<()> {
        let changed = |how: String| {
            anyhow::anyhow!(
                "{} changed on disk since it was opened ({how}): it was rewritten or replaced while in use; open the model again",
                self.path.display()
            )
        };
        let now = FileState::of(
            &self
                .file
                .metadata()
                .with_context(|| format!("cannot stat {}", self.path.display()))?,
        );
        if now.len != self.seen.len {
            return Err(changed(format!("{} bytes, now {}", self.seen.len, now.len)));
        }
        if now.modified != self.seen.modified {
            return Err(changed("its modification time moved".into()));
        }
        // Replaced by a rename: the open file is intact, but the user has
        // put another model at this path, and mixing them would be wrong.
        let at_path = std::fs::metadata(&self.path)
            .map_err(|e| changed(format!("the path no longer opens: {e}")))?;
        if FileState::of(&at_path).id != self.seen.id {
            return Err(changed("another file is now at its path".into()));
        }
        Ok(())
    }

    /// Bytes `start..end` of the file, read into a new buffer.
    fn read(&self, start: usize, end: usize) -> Result<Vec<u8>> {
        self.check_unchanged()?;
        let mut buf = vec![0u8; end - start];
        read_exact_at(&self.file, &mut buf, start as u64).with_context(|| {
            format!(
                "cannot read bytes {start}..{end} of {}",
                self.path.display()
            )
        })?;
        // A rewrite during the read would not show in the bytes themselves.
        self.check_unchanged()?;
        Ok(buf)
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Headers larger than this are refused before they are read (safetensors'
/// own limit is the same 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// All tensors of a model directory: the headers parsed and checked, the
/// files kept open for positioned reads.
pub struct TensorStore {
    files: Vec<Shard>,
    entries: HashMap<String, Entry>,
    /// The `__metadata__` entries of all files.
    metadata: HashMap<String, String>,
}

/// The safetensors files of a model dir: the index's shards, or every
/// `*.safetensors` file.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json["weight_map"]
            .as_object()
            .with_context(|| format!("{} has no weight_map", index.display()))?;
        let mut files = Vec::new();
        for (tensor, file) in map {
            let name = file.as_str().with_context(|| {
                format!(
                    "{}: the file of `{tensor}` is not a string",
                    index.display()
                )
            })?;
            // A shard is a file of this dir: `../x` or `/etc/x` would read
            // outside the model the user named.
            let plain = Path::new(name)
                .components()
                .eq([std::path::Component::Normal(name.as_ref())]);
            if !plain {
                bail!(
                    "{}: `{tensor}` is in `{name}`, which is not a file name in the model dir",
                    index.display()
                );
            }
            files.push(dir.join(name));
        }
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read model dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.safetensors file in {}", dir.display());
    }
    Ok(files)
}

impl TensorStore {
    /// Maps every safetensors file of `dir` and reads their headers.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open(&safetensors_files(dir)?)
    }

    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        let mut file_metadata = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let seen = FileState::of(
                &file
                    .metadata()
                    .with_context(|| format!("cannot stat {}", path.display()))?,
            );
            let (base, metadata) = read_header(path, &file, seen.len)?;
            if let Some(m) = metadata.metadata() {
                for (k, v) in m {
                    if file_metadata
                        .insert(k.clone(), v.clone())
                        .is_some_and(|old| old != *v)
                    {
                        bail!(
                            "{}: metadata `{k}` differs from an earlier shard's",
                            path.display()
                        );
                    }
                }
            }
            for (name, info) in metadata.tensors() {
                let (s, e) = info.data_offsets;
                if let Some(earlier) = entries.get(&name) {
                    let earlier: &Entry = earlier;
                    bail!(
                        "tensor `{name}` is in both {} and {}",
                        paths[earlier.file].display(),
                        path.display()
                    );
                }
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            files.push(Shard {
                path: path.clone(),
                file,
                seen,
            });
        }
        Ok(Self {
            files,
            entries,
            metadata: file_metadata,
        })
    }

    /// A `__metadata__` value of one of the files.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The file that holds tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries
            .get(name)
            .map(|e| self.files[e.file].path.as_path())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Shape of `name`, or an error naming it.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.shape)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).with_context(|| {
            format!(
                "tensor `{name}` is missing from {}",
                self.files
                    .iter()
                    .map(|f| f.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    pub fn location(&self, name: &str) -> String {
        match self.entries.get(name) {
            Some(e) => format!("tensor `{name}` in {}", self.files[e.file].path.display()),
            None => format!("tensor `{name}`"),
        }
    }

    /// Checks that `name` is stored with `dtype` and `shape`; reads nothing
    /// but the header parsed at open.
    pub fn check(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
        let e = self.entry(name)?;
        if e.dtype != dtype {
            bail!(
                "{}: dtype {:?}, expected {:?}",
                self.location(name),
                e.dtype,
                dtype
            );
        }
        if e.shape != shape {
            bail!(
                "{}: shape {:?}, expected {:?}",
                self.location(name),
                e.shape,
                shape
            );
        }
        Ok(())
    }

    /// Raw bytes of `name`, checked against the expected dtype and shape,
    /// read into a new buffer (see the module doc).
    pub fn bytes(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<Vec<u8>> {
        self.check(name, dtype, shape)?;
        self.raw(name)
    }

    /// Raw bytes of `name` as stored, read into a new buffer.
    fn raw(&self, name: &str) -> Result<Vec<u8>> {
        let e = self.entry(name)?;
        self.files[e.file]
            .read(e.start, e.end)
            .with_context(|| format!("reading {}", self.location(name)))
    }

    /// `name` as f32 values (from f32, f16 or bf16), with its shape; refuses
    /// NaN and infinities.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let e = self.entry(name)?;
        let raw = self.raw(name)?;
        let values: Vec<f32> = match e.dtype {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => bail!(
                "{}: dtype {other:?} is not a float type",
                self.location(name)
            ),
        };
        check_finite(&values, &e.shape, || self.location(name))?;
        Ok((values, e.shape.clone()))
    }

    /// The stored type of dense tensor `name`; a type the dense parts
    /// cannot have is an error naming it.
    pub fn dense_dtype(&self, name: &str) -> Result<DenseDtype> {
        let e = self.entry(name)?;
        DenseDtype::from_safetensors(e.dtype).with_context(|| {
            format!(
                "{}: dtype {:?}, expected F32, F16 or BF16",
                self.location(name),
                e.dtype
            )
        })
    }

    /// Dense tensor `name` as stored (f32, f16 or bf16) with a required
    /// shape: its type and little-endian bytes. NaN and infinities are
    /// refused with their position.
    pub fn dense_shaped(&self, name: &str, shape: &[usize]) -> Result<(DenseDtype, Vec<u8>)> {
        let dtype = self.dense_dtype(name)?;
        let raw = self.bytes(name, dtype.safetensors(), shape)?;
        // An all-ones exponent is an infinity or a NaN.
        let bad = match dtype {
            DenseDtype::F32 => raw.chunks_exact(4).position(|c| {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000
            }),
            DenseDtype::F16 => raw
                .chunks_exact(2)
                .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
            DenseDtype::Bf16 => raw
                .chunks_exact(2)
                .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        };
        if let Some(i) = bad {
            bail!(
                "{}: non-finite value at index {}",
                self.location(name),
                index_string(i, shape)
            );
        }
        Ok((dtype, raw))
    }

    /// `name` as f32 values with a required shape.
    pub fn f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (v, s) = self.f32(name)?;
        if s != shape {
            bail!("{}: shape {s:?}, expected {shape:?}", self.location(name));
        }
        Ok(v)
    }

    /// `name` as f16 values (stored f16) with a required shape; refuses non-finite values.
    pub fn f16_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        let raw = self.bytes(name, Dtype::F16, shape)?;
        let values: Vec<f16> = raw
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect();
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: non-finite value {} at index {}",
                self.location(name),
                values[i],
                index_string(i, shape)
            );
        }
        Ok(values)
    }
}

fn check_finite(values: &[f32], shape: &[usize], loc: impl Fn() -> String) -> Result<()> {
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: non-finite value {} at index {}",
            loc(),
            values[i],
            index_string(i, shape)
        );
    }
    Ok(())
}

fn index_string(mut flat: usize, shape: &[usize]) -> String {
    let mut idx = vec![0; shape.len()];
    for (d, &s) in shape.iter().enumerate().rev() {
        if s > 0 {
            idx[d] = flat % s;
            flat /= s;
        }
    }
    format!("{idx:?}")
}

/// Reads and checks the header of safetensors file `path` of `len` bytes:
/// returns where the data starts and the header. A file shorter than its
/// header promises names the first tensor it cuts off.
fn read_header(path: &Path, file: &File, len: u64) -> Result<(usize, Metadata)> {
    let bad =
        |why: String| anyhow::anyhow!("{} is not a valid safetensors file: {why}", path.display());
    let mut prefix = [0u8; 8];
    if len < 8 {
        return Err(bad(format!(
            "it has {len} bytes, fewer than a header length"
        )));
    }
    read_exact_at(file, &mut prefix, 0)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "its header claims {n} bytes, more than {MAX_HEADER_BYTES}"
        )));
    }
    if n > len - 8 {
        return Err(anyhow::anyhow!(
            "{} is truncated: its header needs {} bytes, the file has {len} (re-download or re-create it)",
            path.display(),
            8 + n
        ));
    }
    let mut header = vec![0u8; n as usize];
    read_exact_at(file, &mut header, 8)
        .with_context(|| format!("cannot read the header of {}", path.display()))?;
    let metadata: Metadata = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let base = 8 + n as usize;
    let data = len - base as u64;
    if (metadata.data_len() as u64) > data {
        let cut = metadata
            .tensors()
            .into_iter()
            .filter(|(_, info)| info.data_offsets.1 as u64 > data)
            .min_by_key(|(_, info)| info.data_offsets.1);
        if let Some((name, info)) = cut {
            bail!(
                "{} is truncated: tensor `{name}` needs bytes up to {}, the file has {len} (re-download or re-create it)",
                path.display(),
                base + info.data_offsets.1
            );
        }
    }
    if (metadata.data_len() as u64) != data {
        return Err(bad(format!(
            "its tensors cover {} bytes of data, the file holds {data}",
            metadata.data_len()
        )));
    }
    Ok((base, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, v, s)| {
                (
                    n.to_string(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    s.clone(),
                )
            })
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, b, s)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn reads_values_and_names_bad_tensors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        write(
            &p,
            &[
                ("a", vec![1.0, 2.0, 3.0], vec![3]),
                ("b", vec![0.0, f32::NAN], vec![1, 2]),
            ],
        );
        let s = TensorStore::open_dir(d.path()).unwrap();
        assert_eq!(s.f32_shaped("a", &[3]).unwrap(), vec![1.0, 2.0, 3.0]);
        let e = s.f32_shaped("a", &[4]).unwrap_err().to_string();
        assert!(e.contains("`a`") && e.contains("expected [4]"), "{e}");
        let e = s.f32("b").unwrap_err().to_string();
        assert!(
            e.contains("`b`") && e.contains("NaN") && e.contains("[0, 1]"),
            "{e}"
        );
        let e = s.f32("c").unwrap_err().to_string();
        assert!(e.contains("`c` is missing"), "{e}");
    }

    #[test]
    fn truncated_file_names_the_cut_tensor() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        write(
            &p,
            &[
                ("first", vec![1.0; 4], vec![4]),
                ("second", vec![2.0; 4], vec![4]),
            ],
        );
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 3).unwrap();
        let e = TensorStore::open_dir(d.path()).err().unwrap().to_string();
        assert!(e.contains("truncated") && e.contains("`second`"), "{e}");
    }

    #[test]
    fn index_paths_outside_the_dir_and_tensors_in_two_shards_are_refused() {
        let d = tempfile::tempdir().unwrap();
        write(
            &d.path().join("a.safetensors"),
            &[("x", vec![1.0], vec![1])],
        );
        write(
            &d.path().join("b.safetensors"),
            &[("x", vec![2.0], vec![1])],
        );
        let index = d.path().join("model.safetensors.index.json");
        for bad in [
            "../a.safetensors",
            "/etc/passwd",
            "sub/a.safetensors",
            ".",
            "",
        ] {
            let json = serde_json::json!({"weight_map": {"x": bad}});
            std::fs::write(&index, json.to_string()).unwrap();
            let e = TensorStore::open_dir(d.path()).err().unwrap().to_string();
            assert!(e.contains("not a file name in the model dir"), "{bad}: {e}");
        }
        let json = serde_json::json!({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}});
        std::fs::write(&index, json.to_string()).unwrap();
        let e = TensorStore::open_dir(d.path()).err().unwrap().to_string();
        assert!(
            e.contains("`x` is in both") && e.contains("a.safetensors"),
            "{e}"
        );
    }
}

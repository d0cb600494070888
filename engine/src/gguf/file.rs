//! The GGUF container (version 2 and 3), read and written without loading tensor data: a header
//! of typed metadata and tensor descriptions, then the aligned tensor data.
//!
//! Reference: ggml's `docs/gguf.md`. Dimensions are stored fastest-first (`ne[0]` is the row
//! length); [`TensorInfo::shape`] gives them in Hugging Face order (rows first).
//!
//! Reading checks everything it can before a tensor is touched: the magic, the version, every
//! length against the file size (a corrupt length is an error, not a huge allocation), every
//! tensor type against the types hearth dequantizes, and that every tensor's data lies inside the
//! file (a truncated download is refused up front, naming the first tensor cut off).

use crate::error::{EngineError, Result};
use candle_core::quantized::GgmlDType;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment unless `general.alignment` says otherwise.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value, with its GGUF type kept (llama.cpp checks types, e.g. `token_type` must
/// be an i32 array).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// type 0
    U8(u8),
    /// type 1
    I8(i8),
    /// type 2
    U16(u16),
    /// type 3
    I16(i16),
    /// type 4
    U32(u32),
    /// type 5
    I32(i32),
    /// type 6
    F32(f32),
    /// type 7
    Bool(bool),
    /// type 8
    Str(String),
    /// type 9: element type and elements (all of that type)
    Array(u32, Vec<MetaValue>),
    /// type 10
    U64(u64),
    /// type 11
    I64(i64),
    /// type 12
    F64(f64),
}

impl MetaValue {
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(..) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float (integers widen).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if it is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn strings(items: impl IntoIterator<Item = String>) -> Self {
        MetaValue::Array(8, items.into_iter().map(MetaValue::Str).collect())
    }
}

/// ggml tensor type names by id (ggml.h `enum ggml_type`), for messages about types hearth
/// does not read.
fn ggml_type_name(id: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(id as usize).map_or_else(|| format!("type {id}"), |n| format!("{n} (type {id})"))
}

/// The tensor types hearth reads (what candle-core dequantizes).
pub fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The ggml id of a type hearth writes.
pub fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions fastest-first, as stored.
    pub dims: Vec<u64>,
    /// Its type.
    pub dtype: GgmlDType,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Dimensions in Hugging Face order (rows first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn elem_count(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of its data.
    pub fn byte_len(&self) -> u64 {
        self.elem_count() / self.dtype.block_size() as u64 * self.dtype.type_size() as u64
    }
}

/// A GGUF file's header: metadata in file order and tensor descriptions.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// 2 or 3.
    pub version: u32,
    /// Key/value metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor descriptions in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_start: u64,
}

struct Header<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Header<R> {
    fn bytes(&mut self, n: u64, what: &str) -> std::result::Result<Vec<u8>, String> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(format!(
                "{what}: {n} bytes at offset {} run past the end of the file ({} bytes)",
                self.pos, self.len
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|e| format!("{what} at offset {}: {e}", self.pos))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let v = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&v);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        let raw = self.bytes(n, what)?;
        String::from_utf8(raw).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> std::result::Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => MetaValue::Str(self.string(what)?),
            9 if depth < 2 => {
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // every element takes at least one byte: a larger count is corrupt
                if n > self.len.saturating_sub(self.pos) {
                    return Err(format!("{what}: an array of {n} elements cannot fit in the file"));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                MetaValue::Array(elem, items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{what}: unknown metadata value type {other}")),
        })
    }
}

impl GgufFile {
    /// Reads and checks the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| EngineError::Gguf { path: path.to_path_buf(), reason };
        let file = std::fs::File::open(path).map_err(EngineError::io("reading", path))?;
        let len = file.metadata().map_err(EngineError::io("reading", path))?.len();
        let mut h = Header { r: BufReader::with_capacity(1 << 20, file), pos: 0, len };
        let magic: [u8; 4] = h.array("magic").map_err(|_| bad("not a GGUF file (shorter than its magic)".into()))?;
        if &magic != MAGIC {
            return Err(bad(format!("not a GGUF file (starts with {magic:02x?}, expected \"GGUF\")")));
        }
        let version = h.u32("version").map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let n_tensors = h.u64("tensor count").map_err(bad)?;
        let n_kv = h.u64("metadata count").map_err(bad)?;
        if n_tensors > len / 8 || n_kv > len / 8 {
            return Err(bad(format!(
                "{n_tensors} tensors and {n_kv} metadata entries cannot fit in {len} bytes: the header is corrupt"
            )));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = h.string(&format!("metadata key #{i}")).map_err(bad)?;
            let ty = h.u32(&format!("type of `{key}`")).map_err(bad)?;
            let value = h.value(ty, &format!("value of `{key}`"), 0).map_err(bad)?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = h.string(&format!("name of tensor #{i}")).map_err(bad)?;
            let n_dims = h.u32(&format!("dimensions of `{name}`")).map_err(bad)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(bad(format!("tensor `{name}` has {n_dims} dimensions (1 to 4 expected)")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(h.u64(&format!("dimensions of `{name}`")).map_err(bad)?);
            }
            let ty = h.u32(&format!("type of `{name}`")).map_err(bad)?;
            let dtype = ggml_dtype(ty).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has type {}, which hearth cannot read (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K)",
                    ggml_type_name(ty)
                ))
            })?;
            let offset = h.u64(&format!("offset of `{name}`")).map_err(bad)?;
            let info = TensorInfo { name, dims, dtype, offset };
            let elems = info.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).unwrap_or(u64::MAX);
            if elems == 0 || elems == u64::MAX || elems % dtype.block_size() as u64 != 0 {
                return Err(bad(format!(
                    "tensor `{}` has dimensions {:?}, which do not fit its type {dtype:?}",
                    info.name, info.dims
                )));
            }
            tensors.push(info);
        }
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(bad(format!("general.alignment = {alignment} is not a power of two")));
        }
        let data_start = h.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.byte_len()));
            if end.is_none_or(|end| end > len) {
                return Err(bad(format!(
                    "tensor `{}` ({} bytes at data offset {}) runs past the end of the file ({len} bytes): the file is truncated",
                    t.name,
                    t.byte_len(),
                    t.offset
                )));
            }
        }
        Ok(Self { path: path.to_path_buf(), version, metadata, tensors, data_start })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor's description.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads one tensor's blocks as they are stored (on the CPU, in Hugging Face shape), with
    /// its rows reordered by `row_order` (destination row i takes stored row `row_order[i]`).
    pub fn read_blocks(
        &self,
        file: &mut std::fs::File,
        info: &TensorInfo,
        row_order: Option<&[usize]>,
    ) -> Result<candle_core::quantized::QTensor> {
        let bad = |reason: String| EngineError::Gguf { path: self.path.clone(), reason };
        let mut raw = vec![0u8; info.byte_len() as usize];
        file.seek(SeekFrom::Start(self.data_start + info.offset)).map_err(EngineError::io("reading", &self.path))?;
        file.read_exact(&mut raw).map_err(|e| bad(format!("reading tensor `{}`: {e}", info.name)))?;
        if let Some(order) = row_order {
            let row = raw.len() / order.len().max(1);
            let mut permuted = vec![0u8; raw.len()];
            for (dst, &src) in order.iter().enumerate() {
                permuted[dst * row..(dst + 1) * row].copy_from_slice(&raw[src * row..(src + 1) * row]);
            }
            raw = permuted;
        }
        candle_core::quantized::ggml_file::qtensor_from_ggml(info.dtype, &raw, info.shape(), &candle_core::Device::Cpu)
            .map_err(|e| bad(format!("tensor `{}`: {e}", info.name)))
    }

    /// Reads one tensor and dequantizes it to f32 on the CPU, in Hugging Face shape.
    pub fn read_f32(&self, file: &mut std::fs::File, info: &TensorInfo) -> Result<candle_core::Tensor> {
        let bad = |reason: String| EngineError::Gguf { path: self.path.clone(), reason };
        let mut raw = vec![0u8; info.byte_len() as usize];
        file.seek(SeekFrom::Start(self.data_start + info.offset)).map_err(EngineError::io("reading", &self.path))?;
        file.read_exact(&mut raw).map_err(|e| bad(format!("reading tensor `{}`: {e}", info.name)))?;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            info.dtype,
            &raw,
            info.shape(),
            &candle_core::Device::Cpu,
        )
        .map_err(|e| bad(format!("tensor `{}`: {e}", info.name)))?;
        Ok(q.dequantize(&candle_core::Device::Cpu)?)
    }
}

/// A tensor to write: GGUF name, Hugging Face shape, type and raw data.
#[derive(Debug)]
pub struct OutTensor {
    /// GGUF name.
    pub name: String,
    /// Hugging Face shape (rows first).
    pub shape: Vec<usize>,
    /// Its type.
    pub dtype: GgmlDType,
    /// The encoded blocks.
    pub data: Vec<u8>,
}

fn put_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &MetaValue) -> std::io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[u8::from(*x)]),
        MetaValue::Str(s) => put_string(w, s),
        MetaValue::Array(elem, items) => {
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| put_value(w, i))
        }
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// Writes a GGUF version 3 file (alignment 32) and fsyncs it.
pub fn write(path: &Path, metadata: &[(String, MetaValue)], tensors: &[OutTensor]) -> Result<()> {
    let io = |e: std::io::Error| EngineError::Io { op: "writing", path: path.to_path_buf(), source: e };
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut pos = 0u64;
    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut header, k).map_err(io)?;
        header.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut header, v).map_err(io)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut header, &t.name).map_err(io)?;
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    w.write_all(&header).map_err(io)?;
    pos += header.len() as u64;
    let pad = |w: &mut BufWriter<std::fs::File>, pos: &mut u64| -> std::io::Result<()> {
        let target = pos.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        w.write_all(&vec![0u8; (target - *pos) as usize])?;
        *pos = target;
        Ok(())
    };
    pad(&mut w, &mut pos).map_err(io)?;
    for t in tensors {
        w.write_all(&t.data).map_err(io)?;
        pos += t.data.len() as u64;
        pad(&mut w, &mut pos).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

//! Quantized frozen base weights (QLoRA): 8-bit or 4-bit blocks resident, dequantized when used.
//!
//! A [`QWeight`] holds a 2-D base weight as ggml blocks (`Q8_0`: 8.5 bits a weight; `Q4_1`: 5
//! bits; or whatever block type a GGUF file stored). The training graph never multiplies by the
//! blocks: each projection dequantizes its weight into a temporary for the forward product and
//! again on backward for the input gradient (`crate::kernels::linear` holds the blocks, not the
//! dequantized copy, so nothing weight-sized outlives one product). candle's `QMatMul` has no
//! backward and is not used here. LoRA, the optimizer and the loss stay f32.
//!
//! Embeddings are gathered row by row from the blocks (`QTensor::embedding`, on every backend);
//! a tied output projection dequantizes the table like any other projection.

use crate::error::{EngineError, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Which blocks a base quantized at load uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// `Q8_0`: blocks of 32 int8 with one f16 scale (8.5 bits a weight).
    Q8,
    /// `Q4_1`: blocks of 32 4-bit values with an f16 scale and minimum (5 bits a weight).
    Q4,
}

impl Quantize {
    /// Parses `q8`/`8bit`/`8` or `q4`/`4bit`/`4`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8" | "8bit" | "8" | "q8_0" => Some(Self::Q8),
            "q4" | "4bit" | "4" | "q4_1" => Some(Self::Q4),
            _ => None,
        }
    }

    /// The ggml block type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8 => GgmlDType::Q8_0,
            Self::Q4 => GgmlDType::Q4_1,
        }
    }

    /// Its name, as `parse` reads it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }
}

/// Whether a checkpoint tensor is quantized when the base is: the 2-D weights (projections,
/// embeddings, output head) whose rows split into whole blocks of 32; norms and biases stay dense.
pub fn quantizable(name: &str, shape: &[usize]) -> bool {
    name.ends_with(".weight") && !name.contains("norm") && shape.len() == 2 && shape[1].is_multiple_of(32)
}

/// A frozen 2-D weight (rows, cols) held as quantized blocks.
#[derive(Debug, Clone)]
pub struct QWeight {
    q: Arc<QTensor>,
    dims: (usize, usize),
}

impl QWeight {
    /// Quantizes `t` (rows, cols) to `kind`'s blocks on `t`'s device. Errors (with the tensor's
    /// name) when a row does not split into whole blocks of 32.
    pub fn quantize(name: &str, t: &Tensor, kind: Quantize) -> Result<Self> {
        let dims = t.dims2()?;
        let block = kind.ggml().block_size();
        if !dims.1.is_multiple_of(block) {
            return Err(EngineError::Weights(format!(
                "tensor `{name}` ({} × {}) cannot be quantized to {}: its rows are not a multiple of {block}",
                dims.0,
                dims.1,
                kind.name()
            )));
        }
        let device = t.device().clone();
        let q = QTensor::quantize_onto(&t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, kind.ggml(), &device)?;
        Ok(Self { q: Arc::new(q), dims })
    }

    /// Wraps blocks read from a file (a 2-D tensor).
    pub fn from_qtensor(q: QTensor) -> Result<Self> {
        let dims = q.shape().dims2()?;
        Ok(Self { q: Arc::new(q), dims })
    }

    /// Whether both are the same blocks (shared, not merely equal).
    pub fn same(&self, other: &QWeight) -> bool {
        Arc::ptr_eq(&self.q, &other.q)
    }

    /// (rows, cols).
    pub fn dims2(&self) -> (usize, usize) {
        self.dims
    }

    /// The blocks' bytes, read in place, with their type: `None` off the CPU.
    pub fn cpu_blocks(&self) -> Option<(GgmlDType, std::borrow::Cow<'_, [u8]>)> {
        if !self.q.device().is_cpu() {
            return None;
        }
        Some((self.q.dtype(), self.q.data().ok()?))
    }

    /// The block type.
    pub fn ggml_dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// Where the blocks live.
    pub fn device(&self) -> Device {
        self.q.device()
    }

    /// Bytes the blocks take.
    pub fn bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// The whole weight dequantized to `dtype` on its device (a temporary: callers drop it after
    /// one product).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        Ok(self.q.dequantize(&self.q.device())?.to_dtype(dtype)?)
    }

    /// Rows `ids` (any shape, u32) dequantized: ids.shape + (cols), for an embedding table.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(self.q.embedding(ids)?.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_weights_round_trip_within_their_block_precision_and_gather_rows() {
        let mut rng = crate::rng::Rng::new(3);
        let t = Tensor::from_vec(rng.uniform_vec(8 * 64, -1.0, 1.0), (8, 64), &Device::Cpu).unwrap();
        for (kind, tol, max_bytes) in [(Quantize::Q8, 0.01, 8 * 64 * 9 / 8), (Quantize::Q4, 0.08, 8 * 64 * 5 / 8)] {
            let q = QWeight::quantize("w", &t, kind).unwrap();
            assert!(q.bytes() <= max_bytes, "{kind:?}: {} bytes", q.bytes());
            let back = q.dequantize(DType::F32).unwrap();
            let err = (&back - &t).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < tol && err > 0.0, "{kind:?}: max error {err}");
            let ids = Tensor::new(&[[5u32, 0, 5]], &Device::Cpu).unwrap();
            let rows = q.rows(&ids, DType::F32).unwrap();
            assert_eq!(rows.dims(), &[1, 3, 64]);
            assert_eq!(
                rows.get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap(),
                back.get(5).unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let err = QWeight::quantize("odd", &Tensor::zeros((2, 48), DType::F32, &Device::Cpu).unwrap(), Quantize::Q4)
            .unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
    }
}

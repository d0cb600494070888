//! `optim_step`.

use super::Run;
use crate::error::Result;
use hearth_api::{AdamParams, OptimStepOutput};

impl Run {
    /// Applies the accumulated gradients with AdamW (clipping first when `grad_clip_norm > 0`)
    /// and clears them. Invalid parameters or no gradients: an error, and nothing changes.
    pub fn optim_step(&mut self, params: &AdamParams) -> Result<OptimStepOutput> {
        let out =
            crate::kernels::in_pool_for(&self.base.device, || self.optim.step(&self.params, &self.grads, params))?;
        self.grads.clear();
        Ok(out)
    }
}

//! Fault injection for rollback drills: added latency, random 500s, and wrong vectors (fast
//! and error-free, so only a vector-compatibility check can see them) on embedding routes.
//! Off unless a `--fault-*` flag is set, and loudly logged when on.

use std::time::Duration;

#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub latency: Duration,
    pub error_rate: f64,
    /// Standard deviation of Gaussian noise added to each component of each vector before
    /// normalisation.
    pub vector_noise: f32,
}

impl Faults {
    pub fn any(&self) -> bool {
        !self.latency.is_zero() || self.error_rate > 0.0 || self.vector_noise > 0.0
    }

    /// Adds the configured noise to raw (not yet normalised) vectors.
    pub fn perturb(&self, vectors: &mut [Vec<f32>]) {
        if self.vector_noise <= 0.0 {
            return;
        }
        let normal = rand_distr::Normal::new(0.0, self.vector_noise)
            .expect("--fault-vector-noise is checked to be finite and non-negative");
        let mut rng = rand::rng();
        for value in vectors.iter_mut().flatten() {
            *value += rand_distr::Distribution::sample(&normal, &mut rng);
        }
    }

    /// Applies the configured faults to one request; `true` means answer it with a 500.
    pub async fn inject(&self) -> bool {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        self.error_rate > 0.0 && rand::random::<f64>() < self.error_rate
    }
}

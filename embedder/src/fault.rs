//! Fault injection for rollback drills: added latency and random 500s on embedding routes.
//! Off unless a `--fault-*` flag is set, and loudly logged when on.

use std::time::Duration;

#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub latency: Duration,
    pub error_rate: f64,
}

impl Faults {
    pub fn any(&self) -> bool {
        !self.latency.is_zero() || self.error_rate > 0.0
    }

    /// Applies the configured faults to one request; `true` means answer it with a 500.
    pub async fn inject(&self) -> bool {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        self.error_rate > 0.0 && rand::random::<f64>() < self.error_rate
    }
}

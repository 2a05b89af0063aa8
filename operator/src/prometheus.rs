//! The real `Querier`: Prometheus' HTTP API through prometheus-http-query, one client per
//! (address, timeout), reused across reconciles.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_http_query::response::Data;

use crate::analysis::Querier;

#[derive(Clone)]
pub struct Prometheus {
    client: prometheus_http_query::Client,
}

impl Prometheus {
    pub fn new(address: &str, timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(3)))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let client = prometheus_http_query::Client::from(http, address)
            .map_err(|e| format!("Prometheus address {address:?}: {e}"))?;
        Ok(Self { client })
    }
}

impl Querier for Prometheus {
    async fn query(&self, promql: &str) -> Result<Vec<f64>, String> {
        let response = self
            .client
            .query(promql)
            .get()
            .await
            .map_err(|e| e.to_string())?;
        Ok(match response.data() {
            Data::Vector(samples) => samples.iter().map(|s| s.sample().value()).collect(),
            Data::Scalar(sample) => vec![sample.value()],
            Data::Matrix(_) => return Err("range vector result; use an instant query".to_owned()),
        })
    }
}

/// Clients keyed by address and timeout.
#[derive(Default)]
pub struct Clients {
    clients: Mutex<HashMap<(String, Duration), Prometheus>>,
}

impl Clients {
    pub fn get(&self, address: &str, timeout: Duration) -> Result<Prometheus, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&(address.to_owned(), timeout)) {
            return Ok(client.clone());
        }
        let client = Prometheus::new(address, timeout)?;
        clients.insert((address.to_owned(), timeout), client.clone());
        Ok(client)
    }
}

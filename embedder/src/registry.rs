//! The served models: a catalog of configured model directories, of which at most
//! `max_loaded` are in memory at once (least recently used evicted first, the default model
//! never). Loading happens on first use, once, however many requests wait for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::batcher::Batcher;
use crate::config::ModelSource;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::{ModelInfo, SentenceModel};

/// Text used to warm a model before it serves: touches every layer and allocates the
/// buffers a typical request needs.
const WARM_UP_TEXT: &str = "Warming up the embedding model before it serves traffic.";
/// After a failed load, requests for that model fail fast for this long instead of each
/// retrying the whole load.
const LOAD_RETRY_AFTER: Duration = Duration::from_secs(10);

pub struct LoadedModel {
    pub model: Arc<SentenceModel>,
    pub batcher: Batcher,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("model {0:?} is not served")]
    Unknown(String),
    #[error("model {name:?} could not be loaded: {source}")]
    LoadFailed { name: String, source: Arc<Error> },
}

struct Slot {
    cell: Arc<OnceCell<Arc<LoadedModel>>>,
    last_used: u64,
    last_failure: Option<(Instant, Arc<Error>)>,
}

pub struct Registry {
    catalog: BTreeMap<String, ModelSource>,
    default_model: String,
    max_loaded: usize,
    max_batch_tokens: usize,
    slots: Mutex<BTreeMap<String, Slot>>,
    /// Held while a model loads: one load at a time, so memory holds at most `max_loaded`
    /// models however many are asked for at once, and a load that fails is not tried again
    /// by each request that waited for it.
    loading: tokio::sync::Mutex<()>,
    clock: AtomicU64,
    metrics: Metrics,
}

fn recent_failure(slot: &Slot) -> Option<Arc<Error>> {
    slot.last_failure
        .as_ref()
        .filter(|(at, _)| at.elapsed() < LOAD_RETRY_AFTER)
        .map(|(_, error)| error.clone())
}

impl Registry {
    pub fn new(
        catalog: BTreeMap<String, ModelSource>,
        default_model: String,
        max_loaded: usize,
        max_batch_tokens: usize,
        metrics: Metrics,
    ) -> Result<Self> {
        if !catalog.contains_key(&default_model) {
            return Err(Error::Config(format!(
                "default model {default_model:?} is not among the configured models ({})",
                catalog.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if max_loaded == 0 {
            return Err(Error::Config("--max-models must be at least 1".into()));
        }
        Ok(Self {
            catalog,
            default_model,
            max_loaded,
            max_batch_tokens,
            slots: Mutex::new(BTreeMap::new()),
            loading: tokio::sync::Mutex::new(()),
            clock: AtomicU64::new(0),
            metrics,
        })
    }

    pub fn default_model(&self) -> &str {
        &self.default_model
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.catalog.keys().map(String::as_str)
    }

    /// The served models and where each comes from.
    pub fn sources(&self) -> impl Iterator<Item = (&str, &ModelSource)> {
        self.catalog
            .iter()
            .map(|(name, source)| (name.as_str(), source))
    }

    pub fn is_served(&self, name: &str) -> bool {
        self.catalog.contains_key(name)
    }

    /// Info on the models in memory now.
    pub fn loaded(&self) -> Vec<ModelInfo> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .values()
            .filter_map(|slot| slot.cell.get().map(|m| m.model.info.clone()))
            .collect()
    }

    /// The model, loading and warming it first if it is not in memory.
    pub async fn get(self: &Arc<Self>, name: &str) -> Result<Arc<LoadedModel>, LookupError> {
        let Some(source) = self.catalog.get(name) else {
            return Err(LookupError::Unknown(name.to_string()));
        };
        let cell = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let now = self.clock.fetch_add(1, Ordering::Relaxed);
            let slot = slots.entry(name.to_string()).or_insert_with(|| Slot {
                cell: Arc::new(OnceCell::new()),
                last_used: now,
                last_failure: None,
            });
            slot.last_used = now;
            if let Some(loaded) = slot.cell.get() {
                return Ok(loaded.clone());
            }
            if let Some(error) = recent_failure(slot) {
                return Err(LookupError::LoadFailed {
                    name: name.to_string(),
                    source: error,
                });
            }
            slot.cell.clone()
        };
        // The load runs in its own task: a client that disconnects mid-load cancels only its
        // wait, never the load others are waiting for, nor the eviction after it.
        let registry = self.clone();
        let (name_owned, source) = (name.to_string(), source.clone());
        let loading = tokio::spawn(async move {
            let _one_at_a_time = registry.loading.lock().await;
            if let Some(loaded) = cell.get() {
                return Ok(loaded.clone());
            }
            // Failed while this request waited its turn.
            if let Some(error) = registry.recent_failure_of(&name_owned) {
                return Err(error);
            }
            let failed = |error: Error| {
                tracing::error!(model = %name_owned, %error, "model failed to load");
                let error = Arc::new(error);
                let mut slots = registry.slots.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(slot) = slots.get_mut(&name_owned) {
                    slot.last_failure = Some((Instant::now(), error.clone()));
                }
                error
            };
            // A model that cannot load (a bad config, no weights) evicts nothing.
            let (name, dir) = (name_owned.clone(), source.dir.clone());
            tokio::task::spawn_blocking(move || SentenceModel::preflight(&name, &dir))
                .await
                .unwrap_or_else(|e| Err(Error::Config(format!("model check failed: {e}"))))
                .map_err(failed)?;
            // Make room first, so memory never holds more than the limit.
            registry.evict_beyond(registry.max_loaded.saturating_sub(1), &name_owned);
            match cell
                .get_or_try_init(|| registry.load(name_owned.clone(), source))
                .await
            {
                Ok(loaded) => {
                    registry.evict_beyond(registry.max_loaded, &name_owned);
                    Ok(loaded.clone())
                }
                Err(error) => Err(failed(error)),
            }
        });
        loading
            .await
            .unwrap_or_else(|e| {
                Err(Arc::new(Error::Config(format!(
                    "model loading task failed: {e}"
                ))))
            })
            .map_err(|source| LookupError::LoadFailed {
                name: name.to_string(),
                source,
            })
    }

    /// The error of the model's last load, if it failed less than `LOAD_RETRY_AFTER` ago.
    fn recent_failure_of(&self, name: &str) -> Option<Arc<Error>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(name).and_then(recent_failure)
    }

    async fn load(&self, name: String, source: ModelSource) -> Result<Arc<LoadedModel>> {
        let started = Instant::now();
        tracing::info!(
            model = %name,
            dir = %source.dir.display(),
            quantization = source.quantization.name(),
            "loading model"
        );
        let model = tokio::task::spawn_blocking(move || -> Result<SentenceModel> {
            let model = SentenceModel::load(&name, &source.dir, source.quantization)?;
            let ids = model.tokenize(WARM_UP_TEXT)?;
            model.embed(&[&ids])?;
            Ok(model)
        })
        .await
        .map_err(|e| Error::Config(format!("model loading task failed: {e}")))??;
        let model = Arc::new(model);
        let info = &model.info;
        tracing::info!(
            model = %info.name,
            dimensions = info.dimensions,
            max_seq_length = info.max_seq_length,
            pooling = ?info.pooling,
            quantization = info.quantization.name(),
            weight_bytes = info.weight_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model loaded and warmed"
        );
        let batcher = Batcher::spawn(model.clone(), self.max_batch_tokens, self.metrics.clone())?;
        self.metrics.set_model_loaded(&model.info, true);
        Ok(Arc::new(LoadedModel { model, batcher }))
    }

    /// Drops least recently used models until at most `limit` remain loaded, never the
    /// default model nor `keep`. Requests already holding an evicted model finish on it; its
    /// memory goes when they do.
    fn evict_beyond(&self, limit: usize, keep: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let loaded = slots.values().filter(|s| s.cell.initialized()).count();
            if loaded <= limit {
                break;
            }
            let victim = slots
                .iter()
                .filter(|(name, slot)| {
                    slot.cell.initialized() && *name != &self.default_model && *name != keep
                })
                .min_by_key(|(_, slot)| slot.last_used)
                .map(|(name, _)| name.clone());
            let Some(victim) = victim else { break };
            if let Some(loaded) = slots
                .remove(&victim)
                .and_then(|slot| slot.cell.get().cloned())
            {
                self.metrics.set_model_loaded(&loaded.model.info, false);
            }
            tracing::info!(model = %victim, "evicted least recently used model");
        }
    }
}

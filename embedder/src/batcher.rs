//! Dynamic batching: a queue of tokenised texts per model, drained by one inference thread
//! that packs whatever is waiting under a token budget.
//!
//! The split mirrors TEI's router: HTTP handlers tokenise and enqueue ([`Batcher::embed`]),
//! the batcher thread takes whatever waits, up to the token budget, and runs the backend
//! ([`SentenceModel::embed`]) off the async runtime, so a long forward pass never stalls I/O.
//! The backend packs texts without padding, so texts of any lengths share a pass at no cost.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::SentenceModel;

struct Entry {
    ids: Vec<u32>,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

/// The handle HTTP handlers use; dropping the last handle stops the model's thread once its
/// queue is drained.
pub struct Batcher {
    queue: mpsc::UnboundedSender<Entry>,
    model: String,
    metrics: Metrics,
}

impl Batcher {
    pub fn spawn(
        model: Arc<SentenceModel>,
        max_batch_tokens: usize,
        metrics: Metrics,
    ) -> Result<Self> {
        let (queue, rx) = mpsc::unbounded_channel();
        let name = model.info.name.clone();
        let worker_metrics = metrics.clone();
        std::thread::Builder::new()
            .name(format!("batcher-{name}"))
            .spawn(move || run(model, rx, max_batch_tokens.max(1), worker_metrics))
            .map_err(|e| Error::Config(format!("cannot start batcher thread: {e}")))?;
        Ok(Self {
            queue,
            model: name,
            metrics,
        })
    }

    /// Embeds tokenised texts, returning pooled (unnormalised) vectors in input order.
    pub async fn embed(&self, texts: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        let mut replies = Vec::with_capacity(texts.len());
        for ids in texts {
            let (reply, rx) = oneshot::channel();
            // Counted before sending so the batcher's decrement can never come first.
            let depth = self.metrics.queue_depth(&self.model);
            depth.inc();
            if self.queue.send(Entry { ids, reply }).is_err() {
                depth.dec();
                return Err(Error::BatcherGone);
            }
            replies.push(rx);
        }
        let mut vectors = Vec::with_capacity(replies.len());
        for rx in replies {
            match rx.await {
                Ok(Ok(vector)) => vectors.push(vector),
                Ok(Err(message)) => {
                    return Err(Error::Inference(candle_core::Error::Msg(message)));
                }
                Err(_) => return Err(Error::BatcherGone),
            }
        }
        Ok(vectors)
    }
}

fn run(
    model: Arc<SentenceModel>,
    mut rx: mpsc::UnboundedReceiver<Entry>,
    max_batch_tokens: usize,
    metrics: Metrics,
) {
    let name = model.info.name.clone();
    let queue_depth = metrics.queue_depth(&name);
    let mut waiting: VecDeque<Entry> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.blocking_recv() {
                Some(entry) => waiting.push_back(entry),
                None => break,
            }
        }
        // Everything that arrived while the previous pass ran joins this one.
        while let Ok(entry) = rx.try_recv() {
            waiting.push_back(entry);
        }

        // First come, first served up to the budget; a single text longer than the budget
        // still runs, alone.
        let mut batch = Vec::new();
        let mut tokens = 0;
        while let Some(front) = waiting.front() {
            if !batch.is_empty() && tokens + front.ids.len() > max_batch_tokens {
                break;
            }
            tokens += front.ids.len();
            batch.extend(waiting.pop_front());
        }
        queue_depth.dec_by(batch.len() as i64);
        // Clients that went away (timeout, disconnect) cost nothing more.
        batch.retain(|entry| !entry.reply.is_closed());
        if batch.is_empty() {
            continue;
        }

        run_pass(&model, &name, batch, &metrics);
    }
    tracing::debug!(model = %name, "batcher stopped");
}

fn run_pass(model: &SentenceModel, name: &str, entries: Vec<Entry>, metrics: &Metrics) {
    let inputs: Vec<&[u32]> = entries.iter().map(|e| e.ids.as_slice()).collect();
    let tokens: usize = inputs.iter().map(|ids| ids.len()).sum();
    let started = Instant::now();
    // A panic inside the backend must fail this pass's requests, not silently kill the model's
    // only inference thread.
    // Running the pass on a rayon worker lets its parallel matmuls and attention heads fork
    // and join inside the pool instead of crossing threads for every operation.
    let outcome = catch_unwind(AssertUnwindSafe(|| rayon::scope(|_| model.embed(&inputs))));
    metrics.observe_pass(name, entries.len(), tokens, started.elapsed());
    match outcome {
        Ok(Ok(vectors)) => {
            for (entry, vector) in entries.into_iter().zip(vectors) {
                let _ = entry.reply.send(Ok(vector));
            }
        }
        Ok(Err(error)) => fail_all(entries, name, error.to_string()),
        Err(_) => fail_all(entries, name, "inference panicked".to_string()),
    }
}

fn fail_all(entries: Vec<Entry>, model: &str, message: String) {
    tracing::error!(model, error = %message, texts = entries.len(), "forward pass failed");
    for entry in entries {
        let _ = entry.reply.send(Err(message.clone()));
    }
}

//! Dynamic batching: a queue of tokenised texts per model, drained by one inference thread
//! that packs whatever is waiting under a token budget.
//!
//! The split mirrors TEI's router: HTTP handlers tokenise and enqueue ([`Batcher::embed`]),
//! the batcher thread plans forward passes ([`plan_forward_passes`]) and runs the backend
//! ([`SentenceModel::embed`]) off the async runtime, so a long forward pass never stalls I/O.

use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::SentenceModel;

/// A fixed cost of one forward pass, in padded-token equivalents. On CPU a pass over a single
/// short text costs roughly as much as 50–100 extra tokens in a larger pass, so merging two small
/// groups pays off once it wastes fewer padding tokens than this.
const PASS_OVERHEAD_TOKENS: usize = 64;

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
            self.queue
                .send(Entry { ids, reply })
                .map_err(|_| Error::BatcherGone)?;
            self.metrics.queue_depth(&self.model).inc();
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

        batch.sort_by_key(|entry| entry.ids.len());
        let lengths: Vec<usize> = batch.iter().map(|e| e.ids.len()).collect();
        let passes = plan_forward_passes(&lengths, max_batch_tokens, PASS_OVERHEAD_TOKENS);
        let mut entries = batch.into_iter();
        for pass in passes {
            let pass_entries: Vec<Entry> = entries.by_ref().take(pass.len()).collect();
            run_pass(&model, &name, pass_entries, &metrics);
        }
    }
    tracing::debug!(model = %name, "batcher stopped");
}

fn run_pass(model: &SentenceModel, name: &str, entries: Vec<Entry>, metrics: &Metrics) {
    let inputs: Vec<&[u32]> = entries.iter().map(|e| e.ids.as_slice()).collect();
    let tokens: usize = inputs.iter().map(|ids| ids.len()).sum();
    let started = Instant::now();
    // A panic inside the backend must fail this pass's requests, not silently kill the model's
    // only inference thread.
    let outcome = catch_unwind(AssertUnwindSafe(|| model.embed(&inputs)));
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

/// Splits texts sorted by ascending length into consecutive forward passes, minimising
/// `passes × overhead + padded tokens` with each pass's padded size (`rows × longest`) within
/// `max_tokens` (a single over-long text gets a pass of its own).
///
/// Sorting then cutting optimally keeps padding waste low for mixed lengths without giving up
/// the matrix sizes that make batching fast.
pub fn plan_forward_passes(
    lengths: &[usize],
    max_tokens: usize,
    overhead: usize,
) -> Vec<Range<usize>> {
    debug_assert!(
        lengths.windows(2).all(|w| w[0] <= w[1]),
        "lengths must be sorted"
    );
    let n = lengths.len();
    // best[i]: lowest cost covering lengths[..i]; cut[i]: start of the last pass in that plan.
    let mut best = vec![usize::MAX; n + 1];
    let mut cut = vec![0; n + 1];
    best[0] = 0;
    for end in 1..=n {
        let width = lengths[end - 1].max(1);
        let max_rows = (max_tokens / width).max(1);
        let first_start = end.saturating_sub(max_rows);
        for start in first_start..end {
            if best[start] == usize::MAX {
                continue;
            }
            let cost = best[start] + overhead + (end - start) * width;
            if cost < best[end] {
                best[end] = cost;
                cut[end] = start;
            }
        }
    }
    let mut passes = Vec::new();
    let mut end = n;
    while end > 0 {
        passes.push(cut[end]..end);
        end = cut[end];
    }
    passes.reverse();
    passes
}

#[cfg(test)]
mod tests {
    use super::plan_forward_passes;

    fn padded(lengths: &[usize], passes: &[std::ops::Range<usize>]) -> usize {
        passes.iter().map(|p| p.len() * lengths[p.end - 1]).sum()
    }

    #[test]
    fn equal_lengths_fill_one_pass() {
        let lengths = vec![12; 32];
        let passes = plan_forward_passes(&lengths, 16384, 64);
        assert_eq!(passes, vec![0..32]);
    }

    #[test]
    fn respects_budget_and_covers_everything_in_order() {
        let lengths: Vec<usize> = (1..=200).collect();
        let passes = plan_forward_passes(&lengths, 1000, 64);
        assert_eq!(passes.first().unwrap().start, 0);
        assert_eq!(passes.last().unwrap().end, 200);
        for pair in passes.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        for pass in &passes {
            assert!(
                pass.len() * lengths[pass.end - 1] <= 1000,
                "{pass:?} over budget"
            );
        }
    }

    #[test]
    fn mixed_lengths_split_to_avoid_padding() {
        // 31 short texts and one at max length: padding them all to 256 would waste ~7700
        // tokens, far more than one extra pass costs.
        let mut lengths = vec![10; 31];
        lengths.push(256);
        let passes = plan_forward_passes(&lengths, 16384, 64);
        assert_eq!(passes, vec![0..31, 31..32]);
        assert!(padded(&lengths, &passes) < 600);
    }

    #[test]
    fn overlong_text_runs_alone() {
        let passes = plan_forward_passes(&[5, 600], 512, 64);
        assert_eq!(passes, vec![0..1, 1..2]);
    }

    #[test]
    fn empty_input_plans_nothing() {
        assert!(plan_forward_passes(&[], 100, 64).is_empty());
    }
}

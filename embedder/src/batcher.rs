//! Dynamic batching: a queue of tokenised texts per model, drained by one inference thread
//! that packs whatever is waiting under a token budget.
//!
//! The split mirrors TEI's router: HTTP handlers tokenise and enqueue ([`Batcher::embed`]),
//! the batcher thread takes whatever waits, up to the token budget, and runs the backend
//! ([`SentenceModel::embed`]) off the async runtime, so a long forward pass never stalls I/O.
//! The backend packs texts without padding, so texts of any lengths share a pass at no cost.
//!
//! Packing is fair between requests, not first-in first-out between texts: each pass takes
//! one text from every waiting request in turn (oldest request first), then a second from
//! each, until the budget is full. A one-text request waits at most one pass however many
//! texts a heavy client queued before it; the heavy request still gets the rest of each pass.
//!
//! A pass is at least one whole text, and one long text is tens of milliseconds of compute.
//! So passes run one encoder layer at a time, and between two layers of a long pass, texts
//! of other requests that are much shorter than the work the pass has left run as a pass of
//! their own (shortest work first, one level deep): a small request then waits about one
//! layer, not one pass, behind a heavy neighbour.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::bert::Pass as Forward;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::SentenceModel;

/// A pass is interrupted for texts whose work (tokens × layers) is at most this fraction of
/// what the lightest request in the pass has left: enough to let a small request by a heavy
/// one, never enough for requests of similar size to keep overtaking each other (a pass of
/// many small requests is not interrupted by one more).
const INTERRUPT_RATIO: usize = 4;

struct Entry {
    /// Which request the text belongs to (ids grow with arrival).
    request: u64,
    ids: Vec<u32>,
    reply: oneshot::Sender<Result<(Vec<f32>, Pass), String>>,
}

/// The forward pass that carried a text.
#[derive(Debug, Clone, Copy)]
struct Pass {
    id: u64,
    took: Duration,
}

/// Where a request's time in the batcher went (TEI's `x-queue-time`, `x-inference-time`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Waiting for a pass (between its passes, for a request spread over several).
    pub queue: Duration,
    /// In the forward passes that carried its texts.
    pub inference: Duration,
}

/// The handle HTTP handlers use; dropping the last handle stops the model's thread once its
/// queue is drained.
pub struct Batcher {
    queue: mpsc::UnboundedSender<Entry>,
    model: String,
    metrics: Metrics,
    next_request: AtomicU64,
}

impl Batcher {
    pub fn spawn(
        model: Arc<SentenceModel>,
        max_batch_tokens: usize,
        metrics: Metrics,
    ) -> Result<Self> {
        let (queue, rx) = mpsc::unbounded_channel();
        let name = model.info.name.clone();
        spawn_worker(Worker {
            model,
            name: name.clone(),
            rx,
            waiting: Waiting::default(),
            max_batch_tokens: max_batch_tokens.max(1),
            queue_depth: metrics.queue_depth(&name),
            metrics: metrics.clone(),
            passes: 0,
        })
        .map_err(|e| Error::Config(format!("cannot start batcher thread: {e}")))?;
        Ok(Self {
            queue,
            model: name,
            metrics,
            next_request: AtomicU64::new(0),
        })
    }

    /// Embeds tokenised texts, returning pooled (unnormalised) vectors in input order and
    /// where the time went.
    pub async fn embed(&self, texts: Vec<Vec<u32>>) -> Result<(Vec<Vec<f32>>, Timing)> {
        let started = Instant::now();
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let mut replies = Vec::with_capacity(texts.len());
        for ids in texts {
            let (reply, rx) = oneshot::channel();
            // Counted before sending so the batcher's decrement can never come first.
            let depth = self.metrics.queue_depth(&self.model);
            depth.inc();
            if self
                .queue
                .send(Entry {
                    request,
                    ids,
                    reply,
                })
                .is_err()
            {
                depth.dec();
                return Err(Error::BatcherGone);
            }
            replies.push(rx);
        }
        let mut vectors = Vec::with_capacity(replies.len());
        let mut passes: Vec<Pass> = Vec::new();
        for rx in replies {
            match rx.await {
                Ok(Ok((vector, pass))) => {
                    vectors.push(vector);
                    if !passes.iter().any(|p| p.id == pass.id) {
                        passes.push(pass);
                    }
                }
                Ok(Err(message)) => {
                    return Err(Error::Inference(candle_core::Error::Msg(message)));
                }
                Err(_) => return Err(Error::BatcherGone),
            }
        }
        let inference = passes.iter().map(|p| p.took).sum();
        let timing = Timing {
            queue: started.elapsed().saturating_sub(inference),
            inference,
        };
        Ok((vectors, timing))
    }
}

/// The texts waiting, grouped by request in arrival order.
#[derive(Default)]
struct Waiting {
    requests: VecDeque<(u64, VecDeque<Entry>)>,
    /// How many requests at the back were served by the last pass: a new request goes in
    /// ahead of them.
    served_last: usize,
}

impl Waiting {
    fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    fn push(&mut self, entry: Entry) {
        // A request's texts are sent together, so its queue is almost always the last one.
        match self
            .requests
            .iter_mut()
            .rev()
            .find(|(id, _)| *id == entry.request)
        {
            Some((_, queue)) => queue.push_back(entry),
            None => {
                let at = self.requests.len() - self.served_last;
                self.requests
                    .insert(at, (entry.request, VecDeque::from([entry])));
            }
        }
    }

    /// Round-robin over the waiting requests, one text each per round, until `budget` tokens
    /// are taken; a text that does not fit is left for a later pass (a single text longer
    /// than the budget runs alone). Requests this pass served then go behind those it did
    /// not, so when one heavy request's text fills a pass, the next pass starts with the
    /// requests that waited.
    fn pack(&mut self, budget: usize) -> Vec<Entry> {
        self.take(budget, false, &BTreeSet::new())
    }

    /// Like [`pack`](Self::pack), for a pass slotted between two layers of another: never
    /// over `budget`, and none of the texts of requests in the interrupted pass.
    fn pack_within(&mut self, budget: usize, running: &BTreeSet<u64>) -> Vec<Entry> {
        self.take(budget, true, running)
    }

    fn take(&mut self, budget: usize, strict: bool, skip: &BTreeSet<u64>) -> Vec<Entry> {
        let mut batch = Vec::new();
        let mut tokens = 0;
        loop {
            let mut took = false;
            for (request, queue) in self.requests.iter_mut() {
                if skip.contains(request) {
                    continue;
                }
                let Some(front) = queue.front() else {
                    continue;
                };
                if (strict || !batch.is_empty()) && tokens + front.ids.len() > budget {
                    continue;
                }
                tokens += front.ids.len();
                batch.extend(queue.pop_front());
                took = true;
            }
            if !took {
                break;
            }
        }
        if batch.is_empty() {
            return batch;
        }
        self.requests.retain(|(_, queue)| !queue.is_empty());
        let served = |id: &u64| batch.iter().any(|e: &Entry| e.request == *id);
        let (waited, served): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.requests)
            .into_iter()
            .partition(|(id, _)| !served(id));
        self.requests = waited;
        self.served_last = served.len();
        self.requests.extend(served);
        batch
    }
}

/// The inference thread's state: the model, its queue and what waits.
struct Worker {
    model: Arc<SentenceModel>,
    name: String,
    rx: mpsc::UnboundedReceiver<Entry>,
    waiting: Waiting,
    max_batch_tokens: usize,
    /// The model's `embedder_queue_depth` series, looked up once.
    queue_depth: prometheus_client::metrics::gauge::Gauge,
    metrics: Metrics,
    passes: u64,
}

impl Worker {
    /// Moves what arrived into the waiting requests, without blocking.
    fn receive(&mut self) {
        while let Ok(entry) = self.rx.try_recv() {
            self.waiting.push(entry);
        }
    }

    /// Drops texts whose requester went away (timeout, disconnect): they cost nothing more.
    fn live(&self, mut batch: Vec<Entry>) -> Vec<Entry> {
        self.queue_depth.dec_by(batch.len() as i64);
        batch.retain(|entry| !entry.reply.is_closed());
        batch
    }

    fn run(mut self) {
        loop {
            if self.waiting.is_empty() {
                match self.rx.blocking_recv() {
                    Some(entry) => self.waiting.push(entry),
                    None => break,
                }
            }
            // Everything that arrived while the previous pass ran joins this one.
            self.receive();
            let batch = self.waiting.pack(self.max_batch_tokens);
            let batch = self.live(batch);
            if !batch.is_empty() {
                self.run_pass(batch, true);
            }
        }
        tracing::debug!(model = %self.name, "batcher stopped");
    }

    /// Runs one forward pass, layer by layer; an `interruptible` one runs short passes of
    /// other requests between its layers when they wait.
    fn run_pass(&mut self, entries: Vec<Entry>, interruptible: bool) {
        self.passes += 1;
        let id = self.passes;
        let model = self.model.clone();
        let inputs: Vec<&[u32]> = entries.iter().map(|e| e.ids.as_slice()).collect();
        let started = Instant::now();
        let mut interrupted = Duration::ZERO;
        // A panic inside the backend must fail this pass's requests, not silently kill the
        // model's only inference thread. Each layer runs on a rayon worker, so its parallel
        // matmuls and attention heads fork and join inside the pool.
        let begun = catch_unwind(AssertUnwindSafe(|| model.begin(&inputs)));
        let mut forward = match begun {
            Ok(Ok(forward)) => forward,
            Ok(Err(error)) => return fail_all(entries, &self.name, error.to_string()),
            Err(_) => return fail_all(entries, &self.name, "inference panicked".into()),
        };
        // Each request's tokens in this pass; interrupting must pay off for the lightest.
        let mut shares = BTreeMap::<u64, usize>::new();
        for entry in &entries {
            *shares.entry(entry.request).or_default() += entry.ids.len();
        }
        let lightest = shares.values().copied().min().unwrap_or(0);
        let running: BTreeSet<u64> = shares.into_keys().collect();
        loop {
            let step = catch_unwind(AssertUnwindSafe(|| {
                rayon::scope(|_| model.step(&mut forward))
            }));
            match step {
                Ok(true) => break,
                Ok(false) => {}
                Err(_) => return fail_all(entries, &self.name, "inference panicked".into()),
            }
            if interruptible {
                let paused = Instant::now();
                if self.interrupt(&forward, lightest, &running) {
                    interrupted += paused.elapsed();
                }
            }
        }
        let vectors = catch_unwind(AssertUnwindSafe(|| model.pool(forward)));
        let took = started.elapsed().saturating_sub(interrupted);
        self.metrics.observe_pass(&self.name, entries.len(), took);
        match vectors {
            Ok(vectors) => {
                let pass = Pass { id, took };
                for (entry, vector) in entries.into_iter().zip(vectors) {
                    let _ = entry.reply.send(Ok((vector, pass)));
                }
            }
            Err(_) => fail_all(entries, &self.name, "inference panicked".into()),
        }
    }

    /// Between two layers of `forward`: runs the texts of other requests that are much
    /// shorter than the work its lightest request (`lightest` tokens) has left, if any wait.
    /// True if it ran a pass.
    fn interrupt(&mut self, forward: &Forward, lightest: usize, running: &BTreeSet<u64>) -> bool {
        self.receive();
        let budget = interrupt_budget(
            lightest,
            forward.remaining_layers(),
            self.model.layers(),
            self.max_batch_tokens,
        );
        if budget == 0 {
            return false;
        }
        let batch = self.waiting.pack_within(budget, running);
        let batch = self.live(batch);
        if batch.is_empty() {
            return false;
        }
        self.run_pass(batch, false);
        true
    }
}

/// Tokens of other requests that may run between two layers of a pass whose lightest
/// request has `lightest` tokens and `remaining` of `layers` layers to go.
fn interrupt_budget(lightest: usize, remaining: usize, layers: usize, max: usize) -> usize {
    (lightest * remaining / (INTERRUPT_RATIO * layers.max(1))).min(max)
}

fn spawn_worker(worker: Worker) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("batcher-{}", worker.name))
        .spawn(move || worker.run())
        .map(drop)
}

fn fail_all(entries: Vec<Entry>, model: &str, message: String) {
    tracing::error!(model, error = %message, texts = entries.len(), "forward pass failed");
    for entry in entries {
        let _ = entry.reply.send(Err(message.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(request: u64, tokens: usize) -> Entry {
        let (reply, _) = oneshot::channel();
        Entry {
            request,
            ids: vec![0; tokens],
            reply,
        }
    }

    fn packed(batch: &[Entry]) -> Vec<(u64, usize)> {
        batch.iter().map(|e| (e.request, e.ids.len())).collect()
    }

    #[test]
    fn a_small_request_rides_the_next_pass_behind_a_heavy_one() {
        let mut waiting = Waiting::default();
        for _ in 0..256 {
            waiting.push(entry(1, 100));
        }
        waiting.push(entry(2, 8));
        let batch = waiting.pack(1000);
        let requests: Vec<u64> = batch.iter().map(|e| e.request).collect();
        assert!(
            requests.contains(&2),
            "the small request is in the first pass"
        );
        assert_eq!(
            batch.iter().map(|e| e.ids.len()).sum::<usize>(),
            908,
            "the heavy request fills the rest"
        );
        // The heavy request goes on in later passes, in order.
        assert_eq!(packed(&waiting.pack(300)), [(1, 100), (1, 100), (1, 100)]);
    }

    #[test]
    fn when_one_text_fills_a_pass_the_next_starts_with_who_waited() {
        let mut waiting = Waiting::default();
        for _ in 0..4 {
            waiting.push(entry(1, 256));
        }
        assert_eq!(packed(&waiting.pack(256)), [(1, 256)]);
        // A small request arrives while that pass runs.
        waiting.push(entry(2, 4));
        assert_eq!(packed(&waiting.pack(256)), [(2, 4)]);
        assert_eq!(packed(&waiting.pack(256)), [(1, 256)]);
        // Two heavy requests share the passes in turn, the newcomer first (1 just ran).
        waiting.push(entry(3, 256));
        waiting.push(entry(3, 256));
        let order: Vec<u64> = (0..4).map(|_| waiting.pack(256)[0].request).collect();
        assert_eq!(order, [3, 1, 3, 1]);
    }

    #[test]
    fn rounds_take_one_text_per_request_in_arrival_order() {
        let mut waiting = Waiting::default();
        for (request, tokens) in [(1, 10), (1, 10), (1, 10), (2, 10), (3, 10), (3, 10)] {
            waiting.push(entry(request, tokens));
        }
        assert_eq!(
            packed(&waiting.pack(50)),
            [(1, 10), (2, 10), (3, 10), (1, 10), (3, 10)]
        );
        assert_eq!(packed(&waiting.pack(50)), [(1, 10)]);
        assert!(waiting.is_empty());
    }

    #[test]
    fn a_pass_between_layers_takes_only_short_texts_of_other_requests() {
        let mut waiting = Waiting::default();
        // Request 1's pass is running; more of its texts wait, beside a second heavy
        // request and two small ones.
        waiting.push(entry(1, 256));
        waiting.push(entry(2, 256));
        waiting.push(entry(3, 6));
        waiting.push(entry(4, 9));
        waiting.push(entry(4, 9));
        let running = BTreeSet::from([1]);
        // Strict: nothing over the budget, not even a first text; nothing of request 1.
        assert_eq!(packed(&waiting.pack_within(20, &running)), [(3, 6), (4, 9)]);
        assert!(waiting.pack_within(5, &running).is_empty());
        assert_eq!(packed(&waiting.pack_within(20, &running)), [(4, 9)]);
        // The ordinary pass afterwards starts with the requests that did not run.
        assert_eq!(packed(&waiting.pack(256)), [(1, 256)]);
        assert_eq!(packed(&waiting.pack(256)), [(2, 256)]);
        assert!(waiting.is_empty());
    }

    #[test]
    fn only_much_shorter_work_interrupts_a_pass() {
        // One 256-token text, 5 of 6 layers to go: a one-sentence request (~10 tokens) fits.
        assert_eq!(interrupt_budget(256, 5, 6, 256), 53);
        assert_eq!(interrupt_budget(256, 1, 6, 256), 10);
        // A pass of one-sentence requests is not interrupted by one more.
        assert!(interrupt_budget(12, 5, 6, 256) < 3);
        // Never more than a pass may hold.
        assert_eq!(interrupt_budget(16_384, 5, 6, 256), 256);
    }

    #[test]
    fn a_text_longer_than_the_budget_runs_alone_and_smaller_ones_fill_in() {
        let mut waiting = Waiting::default();
        waiting.push(entry(1, 500));
        waiting.push(entry(2, 20));
        assert_eq!(packed(&waiting.pack(100)), [(1, 500)]);
        let mut waiting = Waiting::default();
        waiting.push(entry(1, 60));
        waiting.push(entry(1, 60));
        waiting.push(entry(2, 30));
        // 60 + 30 fit; the second 60 does not, and waits.
        assert_eq!(packed(&waiting.pack(100)), [(1, 60), (2, 30)]);
        assert_eq!(packed(&waiting.pack(100)), [(1, 60)]);
    }
}

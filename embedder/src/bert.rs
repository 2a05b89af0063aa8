//! BERT encoder forward pass over packed, unpadded sequences.
//!
//! Why not candle-transformers' `BertModel`: it pads every batch to its longest text and runs
//! each elementwise op as a separate candle op (scalar `erf`, multi-pass softmax, a spinning
//! elementwise pool competing with the matmul pool). On CPU that made it slower than
//! sentence-transformers. Like TEI's own BERT, this one packs all tokens of a batch into one
//! `(tokens, hidden)` matrix, so linear layers do no work on padding and attention runs per
//! sequence and head; weights still load through candle's `VarBuilder`, linear layers run on
//! `embedroll-int8`'s kernels (f32 with weights packed at load, or int8), attention on `gemm`
//! (candle's CPU matmul backend), and elementwise
//! kernels are compiled for the CPU's widest SIMD, picked at run time ([`simd`]).

use std::ops::Range;

use candle_core::{D, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use embedroll_int8::dense::PackedLinear;
use embedroll_int8::{Activations, QuantizedLinear, QuantizedTable};
use gemm::Parallelism;
use rayon::prelude::*;

/// Elementwise work below this many floats runs on the calling thread.
const PAR_MIN_ELEMENTS: usize = 1 << 15;
const PAR_CHUNK: usize = 1 << 13;
/// Fewest rows per thread for a pass to be shared out by rows: below it each thread would
/// stream every weight for too few rows, and splitting the products' columns is cheaper.
const LANE_MIN_ROWS: usize = 32;

pub struct BertEncoder {
    hidden: usize,
    heads: usize,
    vocab: usize,
    max_positions: usize,
    word_embeddings: EmbeddingTable,
    position_embeddings: Vec<f32>,
    /// Every input is a single segment, so only token type 0 is ever used.
    token_type_embedding: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    activation: HiddenAct,
}

/// A forward pass in progress: its activations after `layer` layers, and scratch buffers.
pub struct Pass {
    spans: Vec<Range<usize>>,
    tokens: usize,
    layer: usize,
    layers: usize,
    x: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    /// One per thread, each over its own rows ([`lane_rows`]); or one over all rows, whose
    /// products are then split across the threads.
    lanes: Vec<Lane>,
}

/// Rows of a pass that one thread takes through every row-local step of a layer (the linear
/// layers, LayerNorm, the activation), with its own scratch buffers.
struct Lane {
    rows: Range<usize>,
    attended: Vec<f32>,
    intermediate: Vec<f32>,
}

impl Pass {
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn remaining_layers(&self) -> usize {
        self.layers - self.layer
    }

    /// How many threads take a share of the rows (1: the products are split instead).
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Final hidden states and each sequence's rows (once every layer has run).
    pub fn into_hidden(self) -> (Vec<f32>, Vec<Range<usize>>) {
        (self.x, self.spans)
    }
}

/// Splits `tokens` rows into `threads` near-equal runs, cut at multiples of the kernels' row
/// tile; a single run when there are too few rows for each thread to reuse a weight panel
/// over `LANE_MIN_ROWS` rows.
///
/// Why rows and not whole sequences: everything in a layer but attention works row by row,
/// so an even split of rows is an even split of nearly all the work however the lengths fall,
/// with one long text as well as many short ones; attention, per sequence and head, runs as
/// tasks shared by all threads between the two row-local halves of the layer.
fn lane_rows(tokens: usize, threads: usize) -> Vec<Range<usize>> {
    const TILE: usize = 6;
    if threads < 2 || tokens < threads * LANE_MIN_ROWS {
        return std::iter::once(0..tokens).collect();
    }
    let mut start = 0;
    (1..=threads)
        .map(|t| {
            let end = if t == threads {
                tokens
            } else {
                (tokens * t / threads).div_ceil(TILE) * TILE
            };
            let rows = start..end.max(start);
            start = rows.end;
            rows
        })
        .collect()
}

/// `buf` (rows of `width` floats) cut into consecutive runs of `lens` rows, one per lane.
fn rows_mut<'a>(buf: &'a mut [f32], width: usize, lens: &[usize]) -> Vec<&'a mut [f32]> {
    let mut rest = buf;
    lens.iter()
        .map(|&rows| {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows * width);
            rest = tail;
            mine
        })
        .collect()
}

/// Runs `f` on each lane's share: with several lanes, each on a thread of its own with every
/// product and elementwise pass inside kept on that thread; with one, here (its steps split
/// their own work).
fn for_lanes<T: Send>(work: Vec<T>, f: impl Fn(T) + Sync) {
    if work.len() == 1 {
        work.into_iter().for_each(f);
    } else {
        work.into_par_iter()
            .for_each(|share| embedroll_int8::on_one_thread(|| f(share)));
    }
}

struct Layer {
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// How a model's weights are held and multiplied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// f32 weights, f32 matmuls: the checkpoint as trained.
    #[default]
    None,
    /// Linear weights int8 per output channel, activations int8 per token at run time, i32
    /// accumulation; word embeddings int8 per row. Attention, softmax, LayerNorm and the
    /// activation function stay f32. The feed-forward output layer's inputs, the activation
    /// function's outputs, are quantized to 7 bits above a zero point
    /// ([`Activations::ZeroPoint`]), the others symmetrically.
    Int8,
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Int8 => "int8",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "none" | "fp32" | "f32" => Some(Quantization::None),
            "int8" => Some(Quantization::Int8),
            _ => None,
        }
    }
}

enum Linear {
    F32(PackedLinear),
    Int8(QuantizedLinear),
}

enum EmbeddingTable {
    F32(Vec<f32>),
    Int8(QuantizedTable),
}

struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

fn to_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl Linear {
    fn from_parts(
        weight: &Tensor,
        bias: &Tensor,
        quantization: Quantization,
        activations: Activations,
    ) -> candle_core::Result<Self> {
        let (n_out, n_in) = weight.dims2()?;
        if bias.elem_count() != n_out {
            candle_core::bail!("bias has {} values for {n_out} outputs", bias.elem_count());
        }
        Ok(match quantization {
            Quantization::None => Linear::F32(PackedLinear::new(
                &to_vec(weight)?,
                &to_vec(bias)?,
                n_out,
                n_in,
            )),
            Quantization::Int8 => Linear::Int8(
                QuantizedLinear::new(&to_vec(weight)?, &to_vec(bias)?, n_out, n_in)
                    .with_activations(activations),
            ),
        })
    }

    fn load(
        vb: VarBuilder,
        n_in: usize,
        n_out: usize,
        quantization: Quantization,
        activations: Activations,
    ) -> candle_core::Result<Self> {
        Self::from_parts(
            &vb.get((n_out, n_in), "weight")?,
            &vb.get(n_out, "bias")?,
            quantization,
            activations,
        )
    }

    /// `out = x · Wᵀ + b` for `rows` rows of `x`.
    fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) {
        match self {
            Linear::F32(dense) => dense.forward(x, rows, out),
            Linear::Int8(quantized) => quantized.forward(x, rows, out),
        }
    }

    /// [`forward`](Self::forward) into exactly `rows` rows of output.
    fn forward_into(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        match self {
            Linear::F32(dense) => dense.forward_into(x, rows, out),
            Linear::Int8(quantized) => quantized.forward_into(x, rows, out),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Linear::F32(dense) => dense.bytes(),
            Linear::Int8(quantized) => quantized.bytes(),
        }
    }
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            gamma: to_vec(&vb.get(size, "weight")?)?,
            beta: to_vec(&vb.get(size, "bias")?)?,
            eps: eps as f32,
        })
    }

    /// `x = LayerNorm(x + residual)`, row by row.
    fn add_and_normalize(&self, x: &mut [f32], residual: &[f32]) {
        let width = self.gamma.len();
        let rows = |x: &mut [f32], residual: &[f32]| {
            simd::layer_norm_rows(x, residual, &self.gamma, &self.beta, self.eps)
        };
        if x.len() < PAR_MIN_ELEMENTS || !embedroll_int8::may_split() {
            rows(x, residual);
        } else {
            let chunk = width * (PAR_CHUNK / width).max(1);
            x.par_chunks_mut(chunk)
                .zip(residual.par_chunks(chunk))
                .for_each(|(x, residual)| rows(x, residual));
        }
    }
}

/// Sequence `i` of a packed batch occupies rows `spans[i]` of every activation matrix.
fn spans(seqs: &[&[u32]]) -> Vec<Range<usize>> {
    let mut start = 0;
    seqs.iter()
        .map(|s| {
            let span = start..start + s.len();
            start = span.end;
            span
        })
        .collect()
}

/// A raw pointer that rayon tasks may share because each writes a disjoint region.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only for writes to disjoint (sequence, head) blocks, see `attention`.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method so closures capture the whole (Sync) wrapper, not the raw field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

impl BertEncoder {
    pub fn load(
        vb: VarBuilder,
        config: &Config,
        quantization: Quantization,
    ) -> candle_core::Result<Self> {
        let vb = [None, Some("bert"), config.model_type.as_deref()]
            .into_iter()
            .map(|prefix| match prefix {
                Some(prefix) => vb.pp(prefix),
                None => vb.clone(),
            })
            .find(|vb| vb.contains_tensor("embeddings.word_embeddings.weight"))
            .ok_or_else(|| {
                candle_core::Error::Msg("no embeddings.word_embeddings.weight tensor found".into())
            })?;
        let h = config.hidden_size;
        if config.num_attention_heads == 0 || !h.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads");
        }
        let emb = vb.pp("embeddings");
        let word_embeddings = to_vec(&emb.get((config.vocab_size, h), "word_embeddings.weight")?)?;
        let word_embeddings = match quantization {
            Quantization::None => EmbeddingTable::F32(word_embeddings),
            Quantization::Int8 => EmbeddingTable::Int8(QuantizedTable::new(&word_embeddings, h)),
        };
        let position_embeddings = to_vec(&emb.get(
            (config.max_position_embeddings, h),
            "position_embeddings.weight",
        )?)?;
        let token_types = emb.get((config.type_vocab_size, h), "token_type_embeddings.weight")?;
        let token_type_embedding = to_vec(&token_types.get(0)?)?;
        let embedding_norm = LayerNorm::load(emb.pp("LayerNorm"), h, config.layer_norm_eps)?;

        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attn = vb.pp("attention");
                let get = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
                    let p = attn.pp("self").pp(name);
                    Ok((p.get((h, h), "weight")?, p.get(h, "bias")?))
                };
                let (q, k, v) = (get("query")?, get("key")?, get("value")?);
                let qkv = Linear::from_parts(
                    &Tensor::cat(&[&q.0, &k.0, &v.0], 0)?,
                    &Tensor::cat(&[&q.1, &k.1, &v.1], D::Minus1)?,
                    quantization,
                    Activations::Symmetric,
                )?;
                Ok(Layer {
                    qkv,
                    attention_output: Linear::load(
                        attn.pp("output.dense"),
                        h,
                        h,
                        quantization,
                        Activations::Symmetric,
                    )?,
                    attention_norm: LayerNorm::load(
                        attn.pp("output.LayerNorm"),
                        h,
                        config.layer_norm_eps,
                    )?,
                    intermediate: Linear::load(
                        vb.pp("intermediate.dense"),
                        h,
                        config.intermediate_size,
                        quantization,
                        Activations::Symmetric,
                    )?,
                    // Its inputs are the activation function's outputs, of one sign nearly
                    // all (GELU ≥ −0.17, ReLU ≥ 0).
                    output: Linear::load(
                        vb.pp("output.dense"),
                        config.intermediate_size,
                        h,
                        quantization,
                        Activations::ZeroPoint,
                    )?,
                    output_norm: LayerNorm::load(
                        vb.pp("output.LayerNorm"),
                        h,
                        config.layer_norm_eps,
                    )?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;

        Ok(Self {
            hidden: h,
            heads: config.num_attention_heads,
            vocab: config.vocab_size,
            max_positions: config.max_position_embeddings,
            word_embeddings,
            position_embeddings,
            token_type_embedding,
            embedding_norm,
            layers,
            activation: config.hidden_act,
        })
    }

    /// Final hidden states, `(total tokens, hidden)` row-major, sequences in input order and
    /// packed back to back, plus the row range of each sequence.
    pub fn forward(&self, seqs: &[&[u32]]) -> candle_core::Result<(Vec<f32>, Vec<Range<usize>>)> {
        let mut pass = self.begin(seqs)?;
        while !self.step(&mut pass) {}
        Ok(pass.into_hidden())
    }

    /// Embeds the sequences; the layers then run one [`step`](Self::step) at a time, so a
    /// caller can run a short pass between two layers of a long one.
    pub fn begin(&self, seqs: &[&[u32]]) -> candle_core::Result<Pass> {
        let spans = spans(seqs);
        let tokens = spans.last().map_or(0, |s| s.end);
        let threads = if embedroll_int8::may_split() {
            rayon::current_num_threads()
        } else {
            1
        };
        let lanes = lane_rows(tokens, threads)
            .into_iter()
            .map(|rows| Lane {
                rows,
                attended: Vec::new(),
                intermediate: Vec::new(),
            })
            .collect();
        Ok(Pass {
            x: self.embed(seqs, tokens)?,
            qkv: vec![0f32; tokens * 3 * self.hidden],
            context: vec![0f32; tokens * self.hidden],
            spans,
            tokens,
            layer: 0,
            layers: self.layers.len(),
            lanes,
        })
    }

    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of weights held (tables, matrices, biases, norms).
    pub fn weight_bytes(&self) -> usize {
        let norm = |n: &LayerNorm| 4 * (n.gamma.len() + n.beta.len());
        let table = match &self.word_embeddings {
            EmbeddingTable::F32(table) => 4 * table.len(),
            EmbeddingTable::Int8(table) => table.bytes(),
        };
        table
            + 4 * (self.position_embeddings.len() + self.token_type_embedding.len())
            + norm(&self.embedding_norm)
            + self
                .layers
                .iter()
                .map(|l| {
                    l.qkv.bytes()
                        + l.attention_output.bytes()
                        + l.intermediate.bytes()
                        + l.output.bytes()
                        + norm(&l.attention_norm)
                        + norm(&l.output_norm)
                })
                .sum::<usize>()
    }

    /// Runs the pass's next layer; true once every layer has run.
    ///
    /// With a lane per thread the layer is three parallel steps: each thread's rows through
    /// the QKV projection; attention, tasks shared by all threads; each thread's rows through
    /// the rest. With one lane, each step splits its own work across the threads.
    pub fn step(&self, pass: &mut Pass) -> bool {
        let Some(layer) = self.layers.get(pass.layer) else {
            return true;
        };
        let h = self.hidden;
        let Pass {
            x,
            qkv,
            context,
            lanes,
            spans,
            ..
        } = pass;
        let lens: Vec<usize> = lanes.iter().map(|l| l.rows.len()).collect();
        let x_in = &*x;
        let work: Vec<_> = lanes.iter().zip(rows_mut(qkv, 3 * h, &lens)).collect();
        for_lanes(work, |(lane, qkv)| {
            let rows = &lane.rows;
            let x = &x_in[rows.start * h..rows.end * h];
            layer.qkv.forward_into(x, rows.len(), qkv);
        });
        Self::attention(
            qkv,
            spans,
            context,
            self.heads,
            crate::short_attention::MAX_LEN,
        );
        let context = &*context;
        let work: Vec<_> = lanes.iter_mut().zip(rows_mut(x, h, &lens)).collect();
        for_lanes(work, |(lane, x)| {
            let rows = lane.rows.len();
            let context = &context[lane.rows.start * h..lane.rows.end * h];
            layer
                .attention_output
                .forward(context, rows, &mut lane.attended);
            layer
                .attention_norm
                .add_and_normalize(&mut lane.attended, x);
            layer
                .intermediate
                .forward(&lane.attended, rows, &mut lane.intermediate);
            self.activate(&mut lane.intermediate);
            layer.output.forward_into(&lane.intermediate, rows, x);
            layer.output_norm.add_and_normalize(x, &lane.attended);
        });
        pass.layer += 1;
        pass.layer == self.layers.len()
    }

    fn embed(&self, seqs: &[&[u32]], tokens: usize) -> candle_core::Result<Vec<f32>> {
        let h = self.hidden;
        let mut x = Vec::with_capacity(tokens * h);
        for seq in seqs {
            if seq.len() > self.max_positions {
                candle_core::bail!(
                    "sequence of {} tokens exceeds {} positions",
                    seq.len(),
                    self.max_positions
                );
            }
            for (position, &id) in seq.iter().enumerate() {
                let id = id as usize;
                if id >= self.vocab {
                    candle_core::bail!("token id {id} outside the vocabulary of {}", self.vocab);
                }
                let pos = &self.position_embeddings[position * h..(position + 1) * h];
                let start = x.len();
                match &self.word_embeddings {
                    EmbeddingTable::F32(table) => x.extend_from_slice(&table[id * h..(id + 1) * h]),
                    EmbeddingTable::Int8(table) => {
                        x.resize(start + h, 0.0);
                        table.add_row(id, &mut x[start..]);
                    }
                }
                x[start..]
                    .iter_mut()
                    .zip(pos)
                    .zip(&self.token_type_embedding)
                    .for_each(|((x, p), t)| *x = *x + p + t);
            }
        }
        let zeros = vec![0f32; x.len()];
        self.embedding_norm.add_and_normalize(&mut x, &zeros);
        Ok(x)
    }

    /// Scaled dot-product attention of every sequence with itself, one task per
    /// (sequence, head); no padding, so no mask. Sequences of up to `fused_up_to` tokens go
    /// through the fused kernel where the CPU has it, longer ones through `gemm`.
    /// `qkv` holds each token's q, k and v rows side by side (3 × hidden), `context` gets
    /// each token's attended row. Public for `benches/attention.rs`, which times both paths.
    pub fn attention(
        qkv: &[f32],
        spans: &[Range<usize>],
        context: &mut [f32],
        heads: usize,
        fused_up_to: usize,
    ) {
        // The tasks below write their spans' rows through one shared pointer, so the spans
        // must tile the rows in order without overlap.
        let mut tokens = 0;
        for span in spans {
            assert!(
                span.start == tokens && span.end >= span.start,
                "spans must tile the rows in order: {spans:?}"
            );
            tokens = span.end;
        }
        let h = context.len() / tokens.max(1);
        let d = h / heads;
        let stride = 3 * h;
        let scale = 1.0 / (d as f32).sqrt();
        // The unsafe block below relies on these sizes.
        assert_eq!(qkv.len(), tokens * stride, "qkv size");
        assert_eq!(context.len(), tokens * h, "context size");
        let out = SharedMut(context.as_mut_ptr());
        let tasks: Vec<(usize, usize)> = (0..spans.len())
            .flat_map(|s| (0..heads).map(move |head| (s, head)))
            .collect();
        let fused = crate::short_attention::available(d);
        let short = |len: usize| fused && len <= fused_up_to;
        let run = |(scores, block): &mut (Vec<f32>, Vec<f32>), &(s, head): &(usize, usize)| {
            let span = &spans[s];
            let len = span.len();
            let base = span.start * stride + head * d;
            if short(len) {
                block.clear();
                block.resize(len * d, 0.0);
                crate::short_attention::attend(&qkv[base..], stride, h, len, scale, scores, block);
                for (i, row) in block.chunks_exact(d).enumerate() {
                    // SAFETY: row i of this span, columns of this head, in the tokens × h
                    // context matrix: written by this task only.
                    unsafe {
                        let at = out.ptr().add((span.start + i) * h + head * d);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), at, d);
                    }
                }
                return;
            }
            scores.clear();
            scores.resize(len * len, 0.0);
            // SAFETY: q, k, v are len × d blocks inside qkv (row stride 3h); scores is
            // len × len; the output block (rows of this span, columns of this head) of the
            // tokens × h context matrix is written by this task only.
            unsafe {
                let q = qkv.as_ptr().add(base);
                let k = q.add(h);
                let v = q.add(2 * h);
                gemm::gemm(
                    len,
                    len,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    len as isize,
                    false,
                    q,
                    1,
                    stride as isize,
                    k,
                    stride as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
                simd::softmax_rows(scores, len);
                gemm::gemm(
                    len,
                    d,
                    len,
                    out.ptr().add(span.start * h + head * d),
                    1,
                    h as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    len as isize,
                    v,
                    1,
                    stride as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        };
        if tasks.len() == 1 || !embedroll_int8::may_split() {
            let mut buffers = Default::default();
            tasks.iter().for_each(|task| run(&mut buffers, task));
        } else {
            tasks.par_iter().for_each_init(Default::default, run);
        }
    }

    fn activate(&self, x: &mut [f32]) {
        let activation = self.activation;
        let apply = |x: &mut [f32]| simd::activate(x, activation);
        if x.len() < PAR_MIN_ELEMENTS || !embedroll_int8::may_split() {
            apply(x);
        } else {
            x.par_chunks_mut(PAR_CHUNK).for_each(apply);
        }
    }
}

/// The elementwise kernels compiled for the widest SIMD this CPU has, picked at run time.
///
/// Each entry point is one `#[target_feature]` copy per instruction set of the same
/// `inline(always)` loop, so the loop is vectorised with that set's registers. (Through
/// `pulp::Arch::dispatch` closures, iterator adaptors were left out of line, in SSE2.)
mod simd {
    use candle_transformers::models::bert::HiddenAct;

    use super::kernels;

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Level {
        #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
        Avx512,
        #[cfg(target_arch = "x86_64")]
        Avx2,
        Baseline,
    }

    fn level() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                #[cfg(feature = "avx512")]
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
                    return Level::Avx512;
                }
                if has!("avx2") && has!("fma") {
                    return Level::Avx2;
                }
            }
            Level::Baseline
        })
    }

    /// `$name(args)` runs `$body` compiled for the CPU's level.
    macro_rules! dispatched {
        ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
            $(#[$doc])*
            pub fn $name($($arg: $ty),*) {
                // FMA: whether the kernels' polynomials may fuse their multiply-adds (the
                // AVX2 and AVX-512 copies), where the baseline copy, without FMA, would make
                // each `mul_add` a libm call.
                #[inline(always)]
                fn body<const FMA: bool>($($arg: $ty),*) $body
                #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body::<true>($($arg),*) }
                #[cfg(target_arch = "x86_64")]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body::<true>($($arg),*) }
                match level() {
                    // SAFETY: level() found these features on this CPU.
                    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
                    Level::Avx512 => unsafe { avx512($($arg),*) },
                    #[cfg(target_arch = "x86_64")]
                    Level::Avx2 => unsafe { avx2($($arg),*) },
                    Level::Baseline => body::<false>($($arg),*),
                }
            }
        };
    }

    dispatched! {
        /// `x = LayerNorm(x + residual)` for each row of `gamma.len()` values.
        pub fn layer_norm_rows(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
            let width = gamma.len();
            for (row, res) in x.chunks_exact_mut(width).zip(residual.chunks_exact(width)) {
                kernels::add_layer_norm(row, res, gamma, beta, eps);
            }
        }
    }

    dispatched! {
        /// Softmax of each row of `len` values.
        pub fn softmax_rows(scores: &mut [f32], len: usize) {
            for row in scores.chunks_exact_mut(len) {
                kernels::softmax::<FMA>(row);
            }
        }
    }

    dispatched! {
        /// The feed-forward activation, in place.
        pub fn activate(x: &mut [f32], activation: HiddenAct) {
            match activation {
                HiddenAct::Gelu => {
                    for v in x.iter_mut() {
                        *v = kernels::gelu_erf::<FMA>(*v);
                    }
                }
                HiddenAct::GeluApproximate => {
                    for v in x.iter_mut() {
                        *v = kernels::gelu_tanh::<FMA>(*v);
                    }
                }
                HiddenAct::Relu => {
                    for v in x.iter_mut() {
                        *v = v.max(0.0);
                    }
                }
            }
        }
    }
}

/// Branch-free scalar kernels written so the compiler vectorises them inside the
/// `target_feature` copies in [`simd`] (hence `inline(always)`).
mod kernels {
    const LANES: usize = 16;

    /// `a·b + c`, in one rounding where the copy has FMA: the polynomials below are chains
    /// of these, and fused they take half the instructions and latency (GELU: 17 → 12
    /// cycles per 8 values on Zen 4).
    #[inline(always)]
    fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA { a.mul_add(b, c) } else { a * b + c }
    }

    #[inline(always)]
    fn sum(xs: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        for chunk in chunks {
            for (a, x) in acc.iter_mut().zip(chunk) {
                *a += x;
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for chunk in chunks {
            for (a, &x) in acc.iter_mut().zip(chunk) {
                *a = a.max(x);
            }
        }
        acc.iter().fold(tail, |m, &x| m.max(x))
    }

    /// `row = LayerNorm(row + residual)`.
    #[inline(always)]
    pub fn add_layer_norm(
        row: &mut [f32],
        residual: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        for (x, r) in row.iter_mut().zip(residual) {
            *x += r;
        }
        let n = row.len() as f32;
        let mean = sum(row) / n;
        for x in row.iter_mut() {
            *x -= mean;
        }
        let mut squares = [0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
        for chunk in chunks {
            for (s, x) in squares.iter_mut().zip(chunk) {
                *s += x * x;
            }
        }
        let variance = (squares.iter().sum::<f32>() + tail) / n;
        let inv = 1.0 / (variance + eps).sqrt();
        for ((x, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *x = *x * inv * g + b;
        }
    }

    #[inline(always)]
    pub fn softmax<const FMA: bool>(row: &mut [f32]) {
        let m = max(row);
        for x in row.iter_mut() {
            *x = exp::<FMA>(*x - m);
        }
        let inv = 1.0 / sum(row);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }

    /// e^x with ~1 ulp error (Cephes expf polynomial), no branches, no libm call.
    #[inline(always)]
    pub fn exp<const FMA: bool>(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // Adding then subtracting 1.5·2²³ rounds to the nearest integer without SSE4.1.
        const ROUND: f32 = 12_582_912.0;
        let x = x.clamp(-87.0, 88.0);
        let n = (x * LOG2E + ROUND) - ROUND;
        let r = x - n * LN2_HI - n * LN2_LO;
        let [first, rest @ ..] = crate::short_attention::EXP_COEFFICIENTS;
        let mut p = first;
        for c in rest {
            p = madd::<FMA>(p, r, c);
        }
        let y = madd::<FMA>(p, r * r, r) + 1.0;
        // SAFETY: n is a whole number in [-126, 127] (x is clamped above), so it fits an i32.
        // (`as i32` would saturate, which LLVM does lane by lane in scalar code.)
        let n = unsafe { n.to_int_unchecked::<i32>() };
        y * f32::from_bits(((n + 127) << 23) as u32)
    }

    /// erf(x): a rational minimax approximation on [-4, 4] (the one Eigen and XLA use for f32;
    /// beyond ±4 erf is ±1 in f32). Worst absolute error in f32 over a 2e-5 grid of [-4, 4]:
    /// 4.5e-7, against 5.3e-7 for the Abramowitz & Stegun 7.1.26 form it replaced, which
    /// also needed an `exp`; GELU now costs about half as much.
    #[inline(always)]
    pub fn erf<const FMA: bool>(x: f32) -> f32 {
        let x = x.clamp(-4.0, 4.0);
        let x2 = x * x;
        let mut p = -2.726_142_3e-10_f32;
        for c in [
            2.770_681_4e-8,
            -2.101_024e-6,
            -5.692_506_4e-5,
            -7.349_906_3e-4,
            -2.954_6e-3,
            -1.609_603_3e-2,
        ] {
            p = madd::<FMA>(p, x2, c);
        }
        let mut q = -1.456_607_2e-5_f32;
        for c in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
            q = madd::<FMA>(q, x2, c);
        }
        x * p / q
    }

    /// GELU as in BERT (`hidden_act: gelu`): x·Φ(x) with the exact erf form.
    #[inline(always)]
    pub fn gelu_erf<const FMA: bool>(x: f32) -> f32 {
        let half = 0.5 * x;
        madd::<FMA>(half, erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2), half)
    }

    /// GELU's tanh approximation (`gelu_new`).
    #[inline(always)]
    pub fn gelu_tanh<const FMA: bool>(x: f32) -> f32 {
        let y = 0.797_884_6 * madd::<FMA>(0.044_715 * x * x, x, x);
        // tanh(y) = 1 - 2 / (e^{2y} + 1)
        let tanh = 1.0 - 2.0 / (exp::<FMA>(2.0 * y) + 1.0);
        let half = 0.5 * x;
        madd::<FMA>(half, tanh, half)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Both forms: multiply-adds fused (the AVX2 and AVX-512 copies) and not (baseline).
        #[test]
        fn exp_and_erf_match_libm() {
            check_exp_and_erf::<false>();
            check_exp_and_erf::<true>();
        }

        fn check_exp_and_erf<const FMA: bool>() {
            for i in -4000..4000 {
                let x = i as f32 / 100.0;
                let (got, want) = (exp::<FMA>(x), x.exp());
                assert!(
                    (got - want).abs() <= want * 4e-7 + 1e-37,
                    "exp({x}) = {got}, want {want} (fma {FMA})"
                );
            }
            for i in -600..600 {
                let x = i as f32 / 100.0;
                // The series is exact enough in f64 up to |x| = 4; beyond, erf is ±1 within 2e-8.
                let want = if x.abs() <= 4.0 {
                    series_erf(x as f64) as f32
                } else {
                    x.signum()
                };
                let got = erf::<FMA>(x);
                assert!(
                    (got - want).abs() < 3e-7,
                    "erf({x}) = {got}, want {want} (fma {FMA})"
                );
            }
        }

        /// Reference erf through its Maclaurin series in f64.
        fn series_erf(x: f64) -> f64 {
            // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)), fine in f64 for |x| ≤ 6
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-17 || n < 5.0 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
                if n > 400.0 {
                    break;
                }
            }
            (2.0 / std::f64::consts::PI.sqrt() * sum).clamp(-1.0, 1.0)
        }

        #[test]
        fn softmax_and_layer_norm() {
            let mut row = vec![1.0, 2.0, 3.0, f32::NEG_INFINITY];
            softmax::<true>(&mut row);
            let want = [0.090_030_57, 0.244_728_48, 0.665_240_94, 0.0];
            for (g, w) in row.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{row:?}");
            }
            let mut x: Vec<f32> = (0..40).map(|i| i as f32).collect();
            let zeros = vec![0.0; 40];
            add_layer_norm(&mut x, &zeros, &[1.0; 40], &[0.0; 40], 1e-12);
            let mean: f32 = x.iter().sum::<f32>() / 40.0;
            let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 40.0;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_cover_every_row_once_in_near_equal_runs_cut_at_tiles() {
        for (tokens, threads) in [(64, 2), (227, 2), (682, 2), (1000, 3), (257, 4)] {
            let lanes = lane_rows(tokens, threads);
            assert_eq!(lanes.len(), threads, "{tokens} rows, {threads} threads");
            assert_eq!(lanes.first().unwrap().start, 0);
            assert_eq!(lanes.last().unwrap().end, tokens);
            for pair in lanes.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert_eq!(pair[0].end % 6, 0, "cut inside a row tile: {lanes:?}");
            }
            for lane in &lanes {
                let share = tokens as f64 / threads as f64;
                assert!((lane.len() as f64 - share).abs() <= 6.0, "{lanes:?}");
            }
        }
    }

    /// The fused kernel for short sequences against the `gemm` path, on every length up to
    /// past the limit, each alone and packed together, at BERT-base's head width too; and
    /// with every score far below zero (q and k of opposite signs), where a softmax that let
    /// the padding keys' zero scores set its maximum would underflow to equal weights.
    #[test]
    fn fused_attention_matches_gemm_attention() {
        for (h, heads, far_below_zero) in [
            (384, 12, false),
            (768, 12, false),
            (64, 2, false),
            (384, 12, true),
        ] {
            let lens: Vec<usize> = (1..=crate::short_attention::MAX_LEN + 3)
                .chain([130])
                .collect();
            let mut start = 0;
            let spans: Vec<_> = lens
                .iter()
                .map(|&len| {
                    start += len;
                    start - len..start
                })
                .collect();
            let tokens = start;
            let mut state = 7u64;
            let qkv: Vec<f32> = (0..tokens * 3 * h)
                .map(|i| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let r = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0;
                    match (far_below_zero, (i % (3 * h)) / h) {
                        (true, 0) => 5.0 + r / 6.0,
                        (true, 1) => -5.0 + r / 6.0,
                        _ => r,
                    }
                })
                .collect();
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                assert!(crate::short_attention::available(h / heads));
            }
            let mut fused = vec![0f32; tokens * h];
            let mut plain = vec![0f32; tokens * h];
            BertEncoder::attention(&qkv, &spans, &mut fused, heads, usize::MAX);
            BertEncoder::attention(&qkv, &spans, &mut plain, heads, 0);
            let worst = fused
                .iter()
                .zip(&plain)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Scores near -140 differ in their last bits between the two orders of
            // products (the fused kernel scales k first), which moves the weights by ~1e-5.
            let limit = if far_below_zero { 2e-4 } else { 1e-5 };
            assert!(
                worst < limit,
                "h {h}, far below zero {far_below_zero}: worst difference {worst}"
            );
            assert!(plain.iter().all(|v| v.is_finite()) && plain.iter().any(|&v| v != 0.0));
        }
    }

    #[test]
    #[should_panic(expected = "spans must tile the rows in order")]
    fn overlapping_spans_are_refused() {
        let h = 64;
        let (qkv, mut context) = (vec![0f32; 3 * 3 * h], vec![0f32; 3 * h]);
        BertEncoder::attention(&qkv, &[0..2, 1..3], &mut context, 2, 0);
    }

    #[test]
    fn few_rows_or_one_thread_make_one_lane() {
        let one_lane = |tokens: usize, threads: usize| {
            let lanes = lane_rows(tokens, threads);
            lanes.len() == 1 && lanes[0] == (0..tokens)
        };
        assert!(one_lane(20, 2));
        assert!(one_lane(2 * LANE_MIN_ROWS - 1, 2));
        assert!(!one_lane(2 * LANE_MIN_ROWS, 2));
        assert!(one_lane(500, 1));
        assert!(one_lane(0, 2));
    }
}

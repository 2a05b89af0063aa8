"""Throughput and latency of the embedder against sentence-transformers, same texts, same
threads, same machine, same run. Driven by compare.sh; prints a table and ratios.

Modes:
  batch-1   one text per call, sequential: P50/P95 latency per call
  batch-32  32 texts per call, sequential: texts/s and per-call latency
  serve-32c 32 concurrent clients sending one text each (embedder only: what dynamic
            batching buys a server; compared with the peer's batch-32 throughput)
  serve-4x32 4 concurrent clients sending 32 texts each (embedder only, likewise)

batch-1 and batch-32 run --rounds times per side, the sides alternating which goes first;
the table gives the median round's rate and latency percentiles over all calls, then each
round's ratio.
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

WORDS = (
    "the embedding service maps text to dense vectors for semantic search retrieval ranking "
    "and clustering while the operator rolls new revisions out behind a canary with "
    "prometheus gates on latency and error rate kubernetes nginx traffic weight model"
).split()


def make_texts(n: int) -> list[str]:
    """Deterministic sentences of 4 to 60 words: the spread of lengths of real queries and
    passages, so padding behaviour counts."""
    texts = []
    state = 12345
    for i in range(n):
        state = (state * 1103515245 + 12345) % (2**31)
        length = 4 + state % 57
        words = [WORDS[(state >> (k % 16) ^ k * 7) % len(WORDS)] for k in range(length)]
        texts.append(f"{i}: " + " ".join(words))
    return texts


SHORT_WORDS = (
    "reset password account billing invoice login error timeout cluster node pod deploy rollback "
    "canary latency search query vector index model embedding user order payment shipping refund "
    "delay network disk memory cpu alert page dashboard metric log trace"
).split()


def make_short_texts(n: int) -> list[str]:
    """Deterministic texts of 6 to 20 words: queries, titles, support tickets."""
    texts, state = [], 777
    for i in range(n):
        state = (state * 1103515245 + 12345) % (2**31)
        length = 6 + state % 15
        words = [SHORT_WORDS[(state >> (k % 13) ^ k * 5) % len(SHORT_WORDS)] for k in range(length)]
        texts.append(" ".join(words) + f" #{i}")
    return texts


def cpu_line() -> str:
    model, flags = "unknown", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"]
    return f"{model}, {os.cpu_count()} CPUs visible; flags: {' '.join(f for f in wanted if f in flags)}"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


class Embedder:
    def __init__(self, url: str):
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=120)

    @staticmethod
    def embed(conn: http.client.HTTPConnection, texts: list[str]) -> list[list[float]]:
        body = json.dumps({"texts": texts})
        conn.request("POST", "/api/v1/embed", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"embedder answered {response.status}: {data[:200]!r}")
        return json.loads(data)["embeddings"]

    def served(self) -> str:
        """How the embedder holds the model (f32, or int8 and its kernel), from /info."""
        conn = self.connection()
        conn.request("GET", "/info")
        model = json.loads(conn.getresponse().read())["models"][0]
        if model.get("quantization") == "int8":
            return f"int8, {model.get('int8_kernel')} kernel"
        return "f32"


def work_per_text(peer, batches) -> dict:
    """FLOPs of one pass per text, each side's way: the embedder packs a call's texts without
    padding; sentence-transformers pads each call's texts to the longest. Linear layers
    (2 per weight per token) and attention's two products (2·2·n·hidden per token and layer
    for a sequence of n); LayerNorm, GELU and softmax are left out as negligible."""
    cfg = peer[0].auto_model.config
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    linear = 2 * layers * (4 * h * h + 2 * h * inter)

    def flops(n: int) -> int:
        return n * (linear + 4 * layers * h * n)

    cap = peer.max_seq_length
    texts = real = padded = real_tokens = padded_tokens = 0
    for batch in batches:
        ids = peer.tokenizer(batch, truncation=True, max_length=cap)["input_ids"]
        lens = [len(x) for x in ids]
        texts += len(lens)
        real += sum(flops(n) for n in lens)
        padded += len(lens) * flops(max(lens))
        real_tokens += sum(lens)
        padded_tokens += len(lens) * max(lens)
    return {
        "embedder_flop_per_text": real / texts,
        "peer_flop_per_text": padded / texts,
        "embedder_tokens_per_text": real_tokens / texts,
        "peer_tokens_per_text": padded_tokens / texts,
    }


def large_product_rate(torch) -> float:
    """GFLOP/s of one large f32 product through torch (MKL/oneDNN, the peer's own BLAS,
    under the same thread count and ISA caps): a practical peak of this machine's FMA units
    to read both sides' rates against, not the units' own peak (docs/embedder.md). Best of
    five after a warm-up."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def timed_calls(call, batches) -> tuple[float, list[float]]:
    latencies = []
    start = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        call(batch)
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - start, latencies


def chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--single", type=int, default=300, help="texts in the batch-1 runs")
    parser.add_argument("--batched", type=int, default=1024, help="texts in the batch-32 runs")
    parser.add_argument("--texts", choices=["mixed", "short"], default="mixed",
                        help="mixed: 4 to 60 words; short: 6 to 20 words (queries, titles)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="batch-1 and batch-32 phases per side, alternating; the median round counts")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    make = make_texts if args.texts == "mixed" else make_short_texts

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    peer = SentenceTransformer(args.model_dir, device="cpu")
    embedder = Embedder(args.url)
    conn = embedder.connection()

    # Measured before the rounds and after them, the better counting: the VM's speed drifts.
    peak = large_product_rate(torch)
    single = make(args.single)
    batched = make(args.batched)
    warm = make_texts(64)
    results = {}

    # Same texts through both; also a correctness cross-check on the warm-up texts.
    ours = embedder.embed(conn, warm[:32])
    theirs = peer.encode(warm[:32], batch_size=32)
    worst = min(
        sum(a * b for a, b in zip(o, t)) / (sum(a * a for a in o) ** 0.5 * sum(b * b for b in t) ** 0.5)
        for o, t in zip(ours, theirs)
    )
    print(f"warm-up cross-check: worst cosine embedder vs sentence-transformers = {worst:.6f}", file=sys.stderr)
    for batch in chunks(warm, 8):
        embedder.embed(conn, batch)
        peer.encode(batch, batch_size=8)

    def record(mode, who, rate, latencies, rounds=None):
        results[(mode, who)] = {
            "texts_per_s": rate,
            "p50_ms": pct(latencies, 0.50) * 1000 if latencies else float("nan"),
            "p95_ms": pct(latencies, 0.95) * 1000 if latencies else float("nan"),
        }
        if rounds:
            results[(mode, who)]["rounds"] = rounds
        r = results[(mode, who)]
        print(
            f"  {mode:9s} {who:21s} {r['texts_per_s']:8.1f} texts/s  p50 {r['p50_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f} ms",
            file=sys.stderr,
        )

    print(
        f"measuring {args.rounds} rounds, the two sides alternating (each idle while the other runs)",
        file=sys.stderr,
    )
    sides = {
        "embedder": lambda b: embedder.embed(conn, b),
        "sentence-transformers": lambda b: peer.encode(b, batch_size=len(b)),
    }
    runs = {}
    for round_ in range(args.rounds):
        # Alternate who goes first: this VM's speed drifts by 15-30% over minutes, and a
        # fixed order would hand the drift to one side.
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        for mode, batches, n in [("batch-1", [[t] for t in single], len(single)),
                                 ("batch-32", chunks(batched, 32), len(batched))]:
            for who in order:
                el, lat = timed_calls(sides[who], batches)
                runs.setdefault((mode, who), []).append((n / el, lat))
                print(f"  round {round_ + 1} {mode:9s} {who:21s} {n / el:8.1f} texts/s", file=sys.stderr)
    for (mode, who), rs in runs.items():
        # The median round's rate; latency percentiles over every call of every round.
        rates = [r for r, _ in rs]
        record(mode, who, statistics.median(rates), [x for _, l in rs for x in l], rates)

    def concurrent(mode: str, clients: int, per_request: int) -> None:
        """`clients` connections posting `per_request` texts at a time until all are sent."""
        latencies, lock = [], threading.Lock()
        queue = chunks(list(batched), per_request)

        def client():
            c = embedder.connection()
            while True:
                with lock:
                    if not queue:
                        return
                    texts = queue.pop()
                t0 = time.perf_counter()
                embedder.embed(c, texts)
                with lock:
                    latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        workers = [threading.Thread(target=client) for _ in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        record(mode, "embedder", len(batched) / (time.perf_counter() - start), latencies)

    # Dynamic batching at work: 32 clients with one text each, and the check the
    # AVX2-only issue was filed from (4 clients posting 32 texts each).
    concurrent("serve-32c", 32, 1)
    concurrent("serve-4x32", 4, 32)

    b1, b1p = results[("batch-1", "embedder")], results[("batch-1", "sentence-transformers")]
    b32, b32p = results[("batch-32", "embedder")], results[("batch-32", "sentence-transformers")]
    serve = results[("serve-32c", "embedder")]
    serve4 = results[("serve-4x32", "embedder")]
    served = embedder.served()
    print()
    print(
        f"embedder ({served}) vs sentence-transformers (f32), all-MiniLM-L6-v2, "
        f"{args.texts} texts, {args.threads} threads"
    )
    print(f"CPU: {cpu_line()}")
    limits = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    if limits:
        print(f"peer limited to: {limits}; embedder built without its avx512 feature")
    print(f"| mode | embedder texts/s | ST texts/s | throughput ratio | embedder P50/P95 ms | ST P50/P95 ms |")
    print(f"|---|---|---|---|---|---|")
    for mode, ours_r, peer_r in [("batch 1", b1, b1p), ("batch 32", b32, b32p), ("32 clients x 1 text", serve, b32p),
                                 ("4 clients x 32 texts", serve4, b32p)]:
        print(
            f"| {mode} | {ours_r['texts_per_s']:.1f} | {peer_r['texts_per_s']:.1f} | "
            f"{ours_r['texts_per_s'] / peer_r['texts_per_s']:.2f}x | "
            f"{ours_r['p50_ms']:.2f} / {ours_r['p95_ms']:.2f} | {peer_r['p50_ms']:.2f} / {peer_r['p95_ms']:.2f} |"
        )
    print("(the concurrent rows are compared with the peer's batch-32 throughput; their latency includes queueing)")
    for mode in ("batch-1", "batch-32"):
        ours_r = results[(mode, "embedder")]["rounds"]
        peer_r = results[(mode, "sentence-transformers")]["rounds"]
        ratios = ", ".join(f"{o / p:.2f}x" for o, p in zip(ours_r, peer_r))
        print(f"{mode} ratio per round: {ratios} (median rounds above)")
    # Where the batch-32 ratio comes from: less work (padding skipped) times a faster rate
    # per FLOP, against what this machine's FMA units give one large product.
    work = work_per_text(peer, chunks(batched, 32))
    peak = max(peak, large_product_rate(torch))
    ours_gflops = b32["texts_per_s"] * work["embedder_flop_per_text"] / 1e9
    peer_gflops = b32p["texts_per_s"] * work["peer_flop_per_text"] / 1e9
    less = work["peer_flop_per_text"] / work["embedder_flop_per_text"]
    need = 2 * peer_gflops / less
    counted = "" if served == "f32" else " (int8 multiply-adds counted as FLOPs)"
    work.update(embedder_gflops=ours_gflops, peer_gflops=peer_gflops, large_product_gflops=peak)
    print(
        f"batch-32 work per text: sentence-transformers {work['peer_flop_per_text'] / 1e9:.3f} GFLOP "
        f"(each call padded to its longest text, {work['peer_tokens_per_text']:.1f} tokens per text), "
        f"embedder {work['embedder_flop_per_text'] / 1e9:.3f} GFLOP ({work['embedder_tokens_per_text']:.1f} "
        f"tokens, no padding): {less:.2f}x less"
    )
    print(
        f"batch-32 rate on that work: embedder {ours_gflops:.1f} GFLOP/s{counted}, sentence-transformers "
        f"{peer_gflops:.1f} GFLOP/s ({ours_gflops / peer_gflops:.2f}x per FLOP); one large product "
        f"(torch.mm 1024^3, {args.threads} threads) runs at {peak:.1f} GFLOP/s here: embedder "
        f"{100 * ours_gflops / peak:.0f}%, sentence-transformers {100 * peer_gflops / peak:.0f}% of it"
    )
    print(
        f"2x sentence-transformers at batch 32 in this run needs {need:.1f} GFLOP/s, "
        f"{need / peer_gflops:.2f}x the peer's rate per FLOP, {100 * need / peak:.0f}% of the large product's"
    )
    if args.json:
        with open(args.json, "w") as f:
            out = {f"{m}/{w}": v for (m, w), v in results.items()}
            out["batch-32 work"] = work
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

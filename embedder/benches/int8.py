"""INT8 against f32 and the peers, same texts, same threads, same machine, same run. Driven by
int8.sh; prints a markdown table.

Rows: the embedder f32 and int8 (over HTTP, one server each), sentence-transformers (torch,
f32) and ONNX Runtime's dynamic INT8 of the same model, exported with torch and quantized with
onnxruntime.quantization.quantize_dynamic: per tensor (what sentence-transformers'
export_dynamic_quantized_onnx_model makes) and per channel. Each peer runs in its own
process, so its resident memory after load is its own.

Columns: texts/s at batch 1 and batch 32, batch-1 P50/P95, cosine of each model's vectors
with sentence-transformers' f32 ones (mean and min over the accuracy corpus and the parity
texts), resident memory after load (process VmRSS) and weights on disk / in memory.
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import chunks, cpu_line, make_short_texts, make_texts, pct  # noqa: E402

def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def accuracy_texts(root: str) -> list[str]:
    fixtures = os.path.join(root, "embedder/tests/fixtures")
    with open(os.path.join(fixtures, "reference-all-MiniLM-L6-v2.json")) as f:
        texts = [t["text"] for t in json.load(f)["texts"]]
    with open(os.path.join(fixtures, "accuracy-corpus.txt")) as f:
        texts += [line.rstrip("\n").replace("\\n", "\n") for line in f]
    return texts


def timings(embed, single: list[str], batched: list[str]) -> dict:
    for batch in chunks(single[:64], 8):
        embed(batch)
    lat = []
    start = time.perf_counter()
    for text in single:
        t0 = time.perf_counter()
        embed([text])
        lat.append(time.perf_counter() - t0)
    b1 = len(single) / (time.perf_counter() - start)
    start = time.perf_counter()
    for batch in chunks(batched, 32):
        embed(batch)
    b32 = len(batched) / (time.perf_counter() - start)
    return {"batch1": b1, "batch32": b32, "p50_ms": pct(lat, 0.5) * 1e3, "p95_ms": pct(lat, 0.95) * 1e3}


# ---------------------------------------------------------------- peers (own processes)


def peer_main(args) -> None:
    """Loads one peer, times it, embeds the accuracy texts; prints one JSON line."""
    import numpy as np

    with open(args.texts_file) as f:
        spec = json.load(f)
    before = rss_bytes()
    if args.kind == "sentence-transformers":
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(args.threads)
        model = SentenceTransformer(args.model_dir, device="cpu")
        weights = sum(p.numel() * p.element_size() for p in model.parameters())

        def embed(texts):
            return model.encode(texts, batch_size=32, normalize_embeddings=True)

    else:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
        weights = os.path.getsize(args.onnx)
        tokenizer = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
        tokenizer.enable_truncation(max_length=args.max_seq_length)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        names = {i.name for i in session.get_inputs()}

        def embed(texts):
            encodings = tokenizer.encode_batch(texts)
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
            return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    embed(["warm up"])
    after = rss_bytes()
    result = timings(embed, spec["single"], spec["batched"])
    vectors = np.concatenate([embed(batch) for batch in chunks(spec["accuracy"], 32)])
    result.update(rss_after_load=after, rss_added_by_load=after - before, weights=weights, vectors=vectors.tolist())
    print(json.dumps(result))


def export_onnx(model_dir: str, out_dir: str) -> dict:
    """Exports the transformer to ONNX (f32) and quantizes it two ways; cached in out_dir."""
    paths = {k: os.path.join(out_dir, f"model-{k}.onnx") for k in ("f32", "int8", "int8-per-channel")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(model_dir).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    enc = AutoTokenizer.from_pretrained(model_dir)(["a b", "a longer text"], padding=True, return_tensors="pt")
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        Hidden(base),
        (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]),
        paths["f32"],
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        dynamic_axes={n: axes for n in ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
        opset_version=17,
        dynamo=False,
    )
    quantize_dynamic(paths["f32"], paths["int8"], weight_type=QuantType.QInt8)
    quantize_dynamic(paths["f32"], paths["int8-per-channel"], weight_type=QuantType.QInt8, per_channel=True)
    return paths


# ---------------------------------------------------------------- the embedder (over HTTP)


class Embedder:
    def __init__(self, url: str):
        parsed = urlparse(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)

    def get(self, path: str) -> str:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        return response.read().decode()

    def embed(self, texts: list[str]):
        self.conn.request("POST", "/api/v1/embed", json.dumps({"texts": texts}), {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"embedder answered {response.status}: {data[:200]!r}")
        return json.loads(data)["embeddings"]


def measure_embedder(url: str, pid: int, spec: dict) -> dict:
    e = Embedder(url)
    e.embed(["warm up"])
    info = json.loads(e.get("/info"))["models"][0]
    rss = rss_bytes(pid)
    result = timings(e.embed, spec["single"], spec["batched"])
    vectors = [v for batch in chunks(spec["accuracy"], 32) for v in e.embed(batch)]
    result.update(rss_after_load=rss, weights=info["weight_bytes"], vectors=vectors, kernel=info.get("int8_kernel"))
    return result


def cosines(reference, vectors) -> tuple[float, float]:
    import numpy as np

    a, b = np.asarray(reference, dtype=np.float64), np.asarray(vectors, dtype=np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean()), float(cos.min())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        parser = argparse.ArgumentParser()
        parser.add_argument("peer")
        parser.add_argument("--kind", required=True)
        parser.add_argument("--model-dir", required=True)
        parser.add_argument("--onnx")
        parser.add_argument("--threads", type=int, default=2)
        parser.add_argument("--max-seq-length", type=int, default=256)
        parser.add_argument("--texts-file", required=True)
        peer_main(parser.parse_args())
        return

    parser = argparse.ArgumentParser()
    parser.add_argument("--f32-url", required=True)
    parser.add_argument("--f32-pid", type=int, required=True)
    parser.add_argument("--int8-url", required=True)
    parser.add_argument("--int8-pid", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--onnx-dir", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texts", choices=["mixed", "short"], default="mixed")
    parser.add_argument("--single", type=int, default=300)
    parser.add_argument("--batched", type=int, default=1024)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    make = make_texts if args.texts == "mixed" else make_short_texts
    spec = {"single": make(args.single), "batched": make(args.batched), "accuracy": accuracy_texts(args.root)}
    texts_file = os.path.join(args.onnx_dir, "bench-texts.json")
    os.makedirs(args.onnx_dir, exist_ok=True)
    with open(texts_file, "w") as f:
        json.dump(spec, f)

    print(f"CPU: {cpu_line()}", file=sys.stderr)
    print("exporting the model to ONNX and quantizing it (cached)", file=sys.stderr)
    onnx = export_onnx(args.model_dir, args.onnx_dir)

    results = {}
    for name, url, pid in [("embedder f32", args.f32_url, args.f32_pid), ("embedder int8", args.int8_url, args.int8_pid)]:
        print(f"measuring {name}", file=sys.stderr)
        results[name] = measure_embedder(url, pid, spec)
    peers = [
        ("sentence-transformers f32", "sentence-transformers", None),
        ("ONNX Runtime f32", "onnx", onnx["f32"]),
        ("ONNX Runtime int8 (per tensor)", "onnx", onnx["int8"]),
        ("ONNX Runtime int8 (per channel)", "onnx", onnx["int8-per-channel"]),
    ]
    for name, kind, path in peers:
        print(f"measuring {name}", file=sys.stderr)
        cmd = [sys.executable, __file__, "peer", "--kind", kind, "--model-dir", args.model_dir,
               "--threads", str(args.threads), "--texts-file", texts_file]
        if path:
            cmd += ["--onnx", path]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])

    reference = results["sentence-transformers f32"]["vectors"]
    f32 = results["embedder f32"]
    print()
    kernel = results["embedder int8"].get("kernel")
    print(f"all-MiniLM-L6-v2, {args.threads} threads, {args.texts} texts; CPU: {cpu_line()}; embedder int8 kernel: {kernel}")
    print("| | batch 1 texts/s | batch 32 texts/s | vs embedder f32 (batch 32) | batch-1 P50 / P95 ms "
          "| cosine vs ST f32: mean / min | RSS after load MB | weights MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        mean, low = cosines(reference, r["vectors"])
        print(
            f"| {name} | {r['batch1']:.1f} | {r['batch32']:.1f} | {r['batch32'] / f32['batch32']:.2f}x "
            f"| {r['p50_ms']:.2f} / {r['p95_ms']:.2f} | {mean:.5f} / {low:.5f} "
            f"| {r['rss_after_load'] / 1e6:.0f} | {r['weights'] / 1e6:.1f} |"
        )
    print(f"(cosine over {len(spec['accuracy'])} texts: the parity fixtures and tests/fixtures/accuracy-corpus.txt; "
          "ONNX weights are the .onnx file's size)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {kk: vv for kk, vv in v.items() if kk != "vectors"} for k, v in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()

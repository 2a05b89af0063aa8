"""The embedder called through the clients teams already have, as their users call them.

Usage: python test_clients.py BASE_URL   (run by run.sh, which starts the server)
The server serves the bundled all-MiniLM-L6-v2 with the alias text-embedding-3-small.
Each check compares against the server's native route, so a client that decodes wrongly
(base64 byte order, nesting) fails here.
"""

import base64
import json
import math
import sys
import unittest
import urllib.request

import numpy as np
import openai
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

BASE = sys.argv.pop(1) if len(sys.argv) > 1 else "http://127.0.0.1:8080"
TEXTS = ["How do I roll back a canary?", "Blue-green swaps colors at once."]
LONG = "rollback " * 400


def native(texts, **options):
    body = json.dumps({"texts": texts, **options}).encode()
    request = urllib.request.Request(f"{BASE}/api/v1/embed", data=body, method="POST")
    with urllib.request.urlopen(request) as response:
        return np.array(json.load(response)["embeddings"], dtype=np.float32)


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class OpenAIClient(unittest.TestCase):
    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-checked", max_retries=0)
    want = native(TEXTS)

    def check(self, response, want, model="text-embedding-3-small"):
        self.assertEqual(response.model, model)
        self.assertEqual([d.index for d in response.data], list(range(len(want))))
        for item, vector in zip(response.data, want):
            self.assertEqual(len(item.embedding), len(vector))
            self.assertGreater(cosine(item.embedding, vector), 0.99999)
            self.assertAlmostEqual(math.fsum(x * x for x in item.embedding), 1.0, places=4)
        self.assertGreater(response.usage.prompt_tokens, len(want))
        self.assertEqual(response.usage.prompt_tokens, response.usage.total_tokens)

    def test_default_encoding_is_base64_and_decodes(self):
        # The client asks for base64 unless told otherwise and decodes it itself.
        response = self.client.embeddings.create(input=TEXTS, model="text-embedding-3-small")
        self.check(response, self.want)

    def test_float_encoding(self):
        response = self.client.embeddings.create(
            input=TEXTS, model="text-embedding-3-small", encoding_format="float"
        )
        self.check(response, self.want)

    def test_a_single_string_and_the_served_model_name(self):
        response = self.client.embeddings.create(input=TEXTS[0], model="all-MiniLM-L6-v2")
        self.check(response, self.want[:1], model="all-MiniLM-L6-v2")

    def test_dimensions_truncate_and_renormalise(self):
        response = self.client.embeddings.create(
            input=TEXTS, model="text-embedding-3-small", dimensions=128
        )
        self.check(response, self.want[:, :128])

    def test_base64_asked_for_explicitly_is_returned_as_sent(self):
        # Asked for by name, base64 comes back undecoded: little-endian f32 bytes.
        response = self.client.embeddings.create(
            input=TEXTS, model="text-embedding-3-small", dimensions=128,
            encoding_format="base64",
        )
        for item, vector in zip(response.data, self.want[:, :128]):
            decoded = np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
            self.assertEqual(decoded.shape, (128,))
            self.assertGreater(cosine(decoded, vector), 0.99999)

    def test_token_ids(self):
        tokens = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{BASE}/tokenize", data=json.dumps({"inputs": TEXTS}).encode(), method="POST")))
        ids = [[t["id"] for t in text] for text in tokens]
        response = self.client.embeddings.create(input=ids, model="text-embedding-3-small")
        self.check(response, self.want)

    def test_errors_raise_the_clients_exceptions(self):
        with self.assertRaises(openai.NotFoundError) as caught:
            self.client.embeddings.create(input="x", model="no-such-model")
        self.assertIn("not served", str(caught.exception))
        with self.assertRaises(openai.BadRequestError):
            self.client.embeddings.create(input=[""], model="text-embedding-3-small")
        with self.assertRaises(openai.UnprocessableEntityError):
            self.client.embeddings.create(input="x", model="text-embedding-3-small", dimensions=999)


class HuggingFaceClient(unittest.TestCase):
    """huggingface_hub's InferenceClient, as for a TEI endpoint: it posts to the base URL."""

    client = InferenceClient(base_url=BASE)
    want = native(TEXTS)

    def test_feature_extraction(self):
        got = self.client.feature_extraction(TEXTS[0])
        self.assertEqual(got.shape, (1, 384))
        self.assertGreater(cosine(got[0], self.want[0]), 0.99999)

    def test_options(self):
        got = self.client.feature_extraction(TEXTS[1], dimensions=64, normalize=True)
        self.assertEqual(got.shape, (1, 64))
        self.assertGreater(cosine(got[0], self.want[1][:64]), 0.99999)
        raw = self.client.feature_extraction(TEXTS[1], normalize=False)
        self.assertGreater(cosine(raw[0], native(TEXTS[1:], normalize=False)[0]), 0.99999)
        self.assertGreater(np.linalg.norm(raw[0]), 1.5)
        left = self.client.feature_extraction(LONG + "the end", truncation_direction="left")
        right = self.client.feature_extraction(LONG + "the end", truncation_direction="right")
        self.assertLess(cosine(left[0], right[0]), 0.9999)
        self.assertGreater(cosine(left[0], native([LONG + "the end"], truncation_direction="left")[0]), 0.99999)

    def test_truncate_false_refuses_long_input(self):
        with self.assertRaises(HfHubHTTPError) as caught:
            self.client.feature_extraction(LONG, truncate=False)
        # TEI answers its validation errors (an input over max_seq_length) with 413.
        self.assertEqual(caught.exception.response.status_code, 413)
        self.assertEqual(caught.exception.response.json()["error_type"], "Validation")


if __name__ == "__main__":
    unittest.main(verbosity=2)

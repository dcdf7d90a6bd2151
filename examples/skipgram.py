"""Skip-gram word2vec on a small corpus, both ways: the readable model (NCE, jitted step) and the fast kernel.

    python examples/skipgram.py [--corpus lee|enwiki-test|text8|PATH] [--steps 2000]
"""
from __future__ import annotations

import argparse

import jitnet as jn
from jitnet.data import word2vec as W
from jitnet.models import skipgram as S
from jitnet.models import skipgram_cli as CLI


def main():
    """Train with the model path for a few steps, then with the fast path; print neighbours of a few words."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="lee")
    p.add_argument("--steps", type=int, default=2000)
    a = p.parse_args()
    jn.random.seed(0)
    sentences, src = CLI.load_corpus(a.corpus)
    vocab = W.Vocab.build(sentences, min_count=5)
    ids, bounds, raw = W.encode_sentences(vocab, sentences)
    print(f"{src}: {raw} words, vocabulary {len(vocab)}")

    sg = S.SkipGram(vocab, dim=64, init="tf")
    model = S.SkipGramModel(sg, loss="nce", num_sampled=64, lr=1.0)
    losses = S.train_model(model, ids, epochs=100, batch_size=128, window=2, max_steps=a.steps, bounds=bounds)
    print(f"model path (NCE): {len(losses)} steps, loss {losses[0]:.2f} -> {sum(losses[-50:]) / 50:.2f}")

    fast = S.SkipGram(vocab, dim=64)
    st = fast.train_fast(ids, bounds, raw, epochs=10)
    print(f"fast path: {st['words_per_s']:,.0f} words/s")
    for name, m in (("model", sg), ("fast", fast)):
        for w in ("government", "police", "australia"):
            if w in vocab:
                print(f"  [{name}] {w}: " + ", ".join(x for x, _ in m.nearest(w, 5)))


if __name__ == "__main__":
    main()

"""Word-vector evaluation: word-similarity files (WordSim353, SimLex-999) scored by Spearman's rank correlation,
and analogy questions (``questions-words.txt``) scored by 3CosAdd, over a matrix of unit-length vectors."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["read_similarity_file", "read_analogy_file", "spearman", "similarity_score", "analogy_score"]


def read_similarity_file(path):
    """Return [(word1, word2, score)] from a tab/space separated similarity file ('#' lines are comments)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 3:
                continue
            try:
                out.append((parts[0].strip(), parts[1].strip(), float(parts[2])))
            except ValueError:          # a header line
                continue
    return out


def read_analogy_file(path):
    """Return [(section, a, b, c, d)] from a questions-words file (': section' headers, 'a b c d' lines)."""
    out, section = [], ""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith(":"):
                section = line[1:].strip()
                continue
            parts = line.split()
            if len(parts) == 4:
                out.append((section, *parts))
    return out


def _ranks(x):
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), np.float64)
    r[order] = np.arange(1, len(x) + 1)
    _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / cnt)[inv]


def spearman(x, y):
    """Return Spearman's rank correlation of x and y (tied values get their average rank)."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    d = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / d) if d > 0 else float("nan")


def similarity_score(normed, index, pairs):
    """Return {spearman, pairs, covered, coverage}: cosine vs human scores over pairs whose words are known."""
    human, model = [], []
    for a, b, s in pairs:
        a, b = a.lower(), b.lower()
        if a in index and b in index:
            human.append(s)
            model.append(float(normed[index[a]] @ normed[index[b]]))
    n = len(pairs)
    return {"spearman": spearman(human, model), "pairs": n, "covered": len(human),
            "coverage": len(human) / n if n else 0.0}


def analogy_score(normed, index, questions, restrict=300000):
    """Return {accuracy, questions, covered, coverage, sections}: 3CosAdd over the first ``restrict`` words."""
    qs = []
    for sec, *ws in questions:
        ids = [index.get(w.lower(), -1) for w in ws]
        if all(0 <= i < restrict for i in ids):
            qs.append((sec, ids))
    e = normed[:restrict]
    correct, per = 0, {}
    for start in range(0, len(qs), 512):
        part = qs[start:start + 512]
        ids = np.array([q[1] for q in part], np.int64)
        q = e[ids[:, 1]] - e[ids[:, 0]] + e[ids[:, 2]]
        sims = q @ e.T
        rows = np.arange(len(part))
        for col in range(3):
            sims[rows, ids[:, col]] = -np.inf
        pred = np.argmax(sims, axis=1)
        for (sec, qi), p in zip(part, pred):
            ok = int(p == qi[3])
            correct += ok
            c = per.setdefault(sec, [0, 0])
            c[0] += ok
            c[1] += 1
    n = len(questions)
    return {"accuracy": correct / len(qs) if qs else float("nan"), "questions": n, "covered": len(qs),
            "coverage": len(qs) / n if n else 0.0, "sections": {k: v[0] / v[1] for k, v in per.items()}}
